"""``treeckpt.dcp.utils``: the public helpers of ``torch.distributed.checkpoint.utils``.

``find_tensor_shard`` and ``find_state_dict_object`` look an item of a plan up
in a state dict (by FQN, and by offset for a sharded tensor); a storage
plugin's ``resolve_data`` uses them. They read the state dict only, so they
are torch's own functions, re-exported.
"""

from torch.distributed.checkpoint.utils import find_state_dict_object, find_tensor_shard

__all__ = ["find_state_dict_object", "find_tensor_shard"]

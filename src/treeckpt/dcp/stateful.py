"""The ``Stateful`` protocol, as in ``torch.distributed.checkpoint.stateful``.

Any value of the state dict with ``state_dict()`` / ``load_state_dict()`` is
saved as its state dict and receives it back on load.
"""

from torch.distributed.checkpoint.stateful import Stateful, StatefulT

__all__ = ["Stateful", "StatefulT"]

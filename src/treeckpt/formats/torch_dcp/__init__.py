"""torch's DCP format: read and write it without running a pickle from the checkpoint.

- :mod:`~treeckpt.formats.torch_dcp.metadata`: the ``.metadata`` file, through an
  allow-listed unpickler, checked field by field into frozen records;
- :mod:`~treeckpt.formats.torch_dcp.reader`: tensor regions and values
  (``torch.load(weights_only=True)``), whole restores, in-place loads and the
  ``StorageReader`` :class:`TorchDcpReader`;
- :mod:`~treeckpt.formats.torch_dcp.writer`: DCP checkpoints and ``torch.save``
  files written a tensor at a time from a lazy tree;
- :mod:`~treeckpt.formats.torch_dcp.protocol`: the storage-plugin pieces every
  ``StorageReader`` shares (values as bytes, reads committed into the planner).
"""

from treeckpt.formats.torch_dcp.metadata import (
    MAX_METADATA_BYTES,
    METADATA_NAME,
    DcpCheckpoint,
    DcpItem,
    DcpTensor,
    fs_and_root,
    is_dcp_checkpoint,
    read_dcp_metadata,
)
from treeckpt.formats.torch_dcp.reader import (
    MAX_VALUE_BYTES,
    TorchDcpReader,
    dcp_flatten,
    dcp_metadata,
    load_dcp,
    nest,
    read_dcp_tensor,
    read_dcp_value,
    restore_dcp,
    unpickling_reason,
)
from treeckpt.formats.torch_dcp.writer import LazyTensor, open_lazy, write_dcp, write_torch_save

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_VALUE_BYTES",
    "METADATA_NAME",
    "DcpCheckpoint",
    "DcpItem",
    "DcpTensor",
    "LazyTensor",
    "TorchDcpReader",
    "dcp_flatten",
    "dcp_metadata",
    "fs_and_root",
    "is_dcp_checkpoint",
    "load_dcp",
    "nest",
    "open_lazy",
    "read_dcp_metadata",
    "read_dcp_tensor",
    "read_dcp_value",
    "restore_dcp",
    "unpickling_reason",
    "write_dcp",
    "write_torch_save",
]

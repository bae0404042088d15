"""Storage interfaces, as in ``torch.distributed.checkpoint.storage``.

:class:`StorageWriter` / :class:`StorageReader` are torch's abstract classes,
re-exported so a storage plugin written for DCP (to memory, to a service)
runs through ``treeckpt.dcp.save`` / ``load`` with DCP's call sequence. The
file-system storage with treeckpt's format is :mod:`treeckpt.dcp.filesystem`.
"""

from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

__all__ = ["StorageReader", "StorageWriter", "WriteResult"]

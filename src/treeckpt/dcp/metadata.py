"""Checkpoint metadata types, as in ``torch.distributed.checkpoint.metadata``.

These are torch's own plain data classes, re-exported: planners and storage
plugins written for DCP build and inspect them, and ``isinstance`` checks keep
working. treeckpt's own manifest is JSON; a :class:`Metadata` is the view of it
that DCP's extension points expect.
"""

from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

__all__ = [
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
]

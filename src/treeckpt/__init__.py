"""treeckpt: distributed checkpointing for PyTorch training state.

>>> import treeckpt  # doctest: +SKIP
>>> treeckpt.save({"model": model, "optim": optimizer, "step": 10}, "ckpt/")  # doctest: +SKIP
>>> state = treeckpt.load({"model": model, "optim": optimizer, "step": 0}, "ckpt/")  # doctest: +SKIP
"""

from treeckpt.api import (
    CheckpointInfo,
    TensorInfo,
    load,
    metadata,
    plan_reshard,
    read_tensor,
    restore,
    save,
)
from treeckpt.asyncsave import AsyncSaver, SaveFuture, async_save, free_host_buffers
from treeckpt.core.box import Box
from treeckpt.core.options import Compression, LoadOptions, SaveOptions
from treeckpt.core.plan import LoadPlan, ReadItem, plan_load
from treeckpt.core.plan_table import SavePlan, WriteItem, plan_save
from treeckpt.core.specs import ShardSpec
from treeckpt.core.tree import is_stateful
from treeckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CollectiveError,
    CorruptChunkError,
    FQNCollisionError,
    IncompleteCheckpointError,
    LeafNotFoundError,
    LoadMismatchError,
    ManifestError,
    OptionsError,
    PlanError,
    RankConflictError,
    RankFailureError,
    UnsupportedLeafError,
)
from treeckpt.explore import open
from treeckpt.manager import CheckpointManager
from treeckpt.shell.save import SaveResult

__version__ = "0.1.0"

__all__ = [
    "AsyncSaver",
    "Box",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "CollectiveError",
    "Compression",
    "CorruptChunkError",
    "FQNCollisionError",
    "IncompleteCheckpointError",
    "LeafNotFoundError",
    "LoadMismatchError",
    "LoadOptions",
    "LoadPlan",
    "ManifestError",
    "OptionsError",
    "PlanError",
    "RankConflictError",
    "RankFailureError",
    "ReadItem",
    "SaveFuture",
    "SaveOptions",
    "SavePlan",
    "SaveResult",
    "ShardSpec",
    "TensorInfo",
    "UnsupportedLeafError",
    "WriteItem",
    "__version__",
    "async_save",
    "free_host_buffers",
    "is_stateful",
    "load",
    "metadata",
    "open",
    "plan_load",
    "plan_reshard",
    "plan_save",
    "read_tensor",
    "restore",
    "save",
]

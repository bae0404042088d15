"""``load`` and ``load_state_dict``, as in ``torch.distributed.checkpoint.state_dict_loader``."""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch.distributed.checkpoint.planner import LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader

from treeckpt.dcp._engine import coordinator, run_load, storage_reader_for
from treeckpt.errors import OptionsError

__all__ = ["load", "load_state_dict"]


def load(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_reader: StorageReader | None = None,
    planner: LoadPlanner | None = None,
    process_group: Any | None = None,
    no_dist: bool = False,
) -> None:
    """Load a checkpoint into ``state_dict`` in place, in SPMD style: every rank calls it.

    Tensors (plain, DTensor, ShardedTensor) are filled in place from any
    sharding the checkpoint was saved with; non-tensor values are replaced in
    ``state_dict``; top-level ``Stateful`` values get ``load_state_dict``.
    Keys of ``state_dict`` the checkpoint lacks are an error (unless the
    planner has ``allow_partial_load``), and so is a shape mismatch, or a dtype
    the stored one does not convert to exactly (bfloat16 into float32 is
    made; float32 into bfloat16 only where the planner's
    ``allows_lossy_cast`` consents).

    Raises:
        CheckpointException: the load failed on some rank (every rank raises it).
    """
    reader = storage_reader_for(storage_reader, checkpoint_id)
    run_load(state_dict, reader, planner, coordinator(process_group, no_dist))


def load_state_dict(
    state_dict: dict[str, Any],
    storage_reader: StorageReader,
    process_group: Any | None = None,
    coordinator_rank: int = 0,
    no_dist: bool = False,
    planner: LoadPlanner | None = None,
) -> None:
    """Deprecated form of :func:`load` (as in DCP); ``coordinator_rank`` other than 0 is refused."""
    warnings.warn(
        "`load_state_dict` is deprecated and will be removed in future versions. "
        "Please use `load` instead.",
        FutureWarning,
        stacklevel=2,
    )
    _load_state_dict(state_dict, storage_reader, process_group, coordinator_rank, no_dist, planner)


def _load_state_dict(
    state_dict: dict[str, Any],
    storage_reader: StorageReader,
    process_group: Any | None = None,
    coordinator_rank: int = 0,
    no_dist: bool = False,
    planner: LoadPlanner | None = None,
) -> None:
    """:func:`load_state_dict` without its deprecation warning, as torch's private
    ``_load_state_dict`` (Lightning's ``_load_distributed_checkpoint`` calls it)."""
    if coordinator_rank != 0:
        raise OptionsError(
            f"coordinator_rank={coordinator_rank}: treeckpt coordinates from rank 0 of the group"
        )
    run_load(state_dict, storage_reader, planner, coordinator(process_group, no_dist))

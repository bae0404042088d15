"""``save``, ``async_save`` and ``save_state_dict``, as in ``torch.distributed.checkpoint.state_dict_saver``."""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.checkpoint.storage import StorageWriter

from treeckpt.dcp._async import async_save
from treeckpt.dcp._engine import coordinator, run_save, storage_writer_for
from treeckpt.shell.coord import LocalCoordinator

__all__ = [
    "AsyncCheckpointerType",
    "AsyncSaveResponse",
    "async_save",
    "save",
    "save_state_dict",
]


def save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: StorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: Any | None = None,
    no_dist: bool = False,
    use_collectives: bool = True,
) -> Metadata:
    """Save a distributed state dict in SPMD style: every rank calls it.

    With the default ``FileSystemWriter`` the checkpoint is treeckpt's format
    (checksummed, compressed where it pays, committed atomically); a user's
    ``storage_writer`` or ``planner`` is driven through DCP's documented call
    sequence. Top-level ``Stateful`` values are saved as their ``state_dict()``.

    Args:
        checkpoint_id: a directory path or an fsspec URL (or the storage's own key).
        no_dist: save from this process alone, even in a process group.
        use_collectives: ``False`` makes each rank's call an independent save
            with no cross-rank synchronisation (give each rank its own path).

    Returns:
        The checkpoint's DCP :class:`Metadata` on every rank.

    Raises:
        CheckpointException: the save failed on some rank (every rank raises
            it; the previous checkpoint at the path is intact).
    """
    writer = storage_writer_for(storage_writer, checkpoint_id)
    coord = coordinator(process_group, no_dist) if use_collectives else LocalCoordinator()
    return run_save(state_dict, writer, planner, coord, use_collectives)


def save_state_dict(
    state_dict: dict[str, Any],
    storage_writer: StorageWriter,
    process_group: Any | None = None,
    coordinator_rank: int = 0,
    no_dist: bool = False,
    planner: SavePlanner | None = None,
) -> Metadata:
    """Deprecated form of :func:`save` (as in DCP); ``coordinator_rank`` other than 0 is refused."""
    warnings.warn(
        "`save_state_dict` is deprecated and will be removed in future versions."
        "Please use `save` instead.",
        FutureWarning,
        stacklevel=2,
    )
    _check_coordinator_rank(coordinator_rank)
    coord = coordinator(process_group, no_dist)
    return run_save(state_dict, storage_writer, planner, coord)


def _check_coordinator_rank(coordinator_rank: int) -> None:
    from treeckpt.errors import OptionsError

    if coordinator_rank != 0:
        raise OptionsError(
            f"coordinator_rank={coordinator_rank}: treeckpt coordinates from rank 0 of the group"
        )

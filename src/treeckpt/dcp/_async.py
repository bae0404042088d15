"""``async_save``: stage into host memory now, save in the background.

THREAD runs the save in a background thread of this process; its
collectives use treeckpt's gloo group, created here before the thread
starts. PROCESS runs it in a separate process when this process is not part
of a multi-rank group; in a group it uses a background thread too (the
collectives of a save need this process's group).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageWriter

from treeckpt.dcp._engine import coordinator, run_save, storage_writer_for
from treeckpt.dcp.staging import AsyncStager, DefaultStager, StagingOptions
from treeckpt.shell.coord import LocalCoordinator

__all__ = ["async_save"]


def _save_in_process(
    state_dict: dict[str, Any], writer: StorageWriter, planner: SavePlanner | None
) -> Metadata:
    return run_save(state_dict, writer, planner, LocalCoordinator())


def async_save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: StorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: Any | None = None,
    async_checkpointer_type: AsyncCheckpointerType = AsyncCheckpointerType.THREAD,
    async_stager: AsyncStager | None = None,
    no_dist: bool = False,
    use_collectives: bool = True,
) -> Future[Any] | AsyncSaveResponse:
    """Stage ``state_dict`` into host memory, then save it in the background.

    Returns a ``Future`` whose ``result()`` is the checkpoint's ``Metadata``
    (or raises the save's ``CheckpointException``); when the stager stages
    asynchronously, an ``AsyncSaveResponse`` with ``staging_completion`` and
    ``upload_completion`` futures. Training may change the original tensors as
    soon as staging is complete.
    """
    writer = storage_writer_for(storage_writer, checkpoint_id)
    owned: AsyncStager | None = None
    stager = async_stager
    if stager is None:
        if isinstance(storage_writer, AsyncStager):
            stager = storage_writer
        else:
            stager = owned = DefaultStager(StagingOptions(False, False, False, False))
    state_dict = {
        k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()
    }
    staged = stager.stage(state_dict)
    coord = coordinator(process_group, no_dist) if use_collectives else LocalCoordinator()

    def wait_staged() -> dict[str, Any]:
        return staged.result() if isinstance(staged, Future) else staged

    upload: Future[Any]
    if async_checkpointer_type == AsyncCheckpointerType.PROCESS and coord.world_size == 1:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        upload = pool.submit(_save_in_process, wait_staged(), writer, planner)
        upload.add_done_callback(lambda _: pool.shutdown(wait=False))
    else:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="treeckpt-dcp-save")
        upload = thread.submit(
            lambda: run_save(wait_staged(), writer, planner, coord, use_collectives)
        )
        upload.add_done_callback(lambda _: thread.shutdown(wait=False))
    if owned is not None:
        upload.add_done_callback(lambda _: owned.close())
    if isinstance(staged, Future):
        staging_done: Future[None] = Future()

        def staged_cb(f: Future[Any]) -> None:
            exc = f.exception()
            if exc is not None:
                staging_done.set_exception(exc)
            else:
                staging_done.set_result(None)

        staged.add_done_callback(staged_cb)
        return AsyncSaveResponse(staging_completion=staging_done, upload_completion=upload)
    return upload

"""``async_save``: stage into host memory now, save in the background.

With the default planner and ``FileSystemWriter`` this is
:func:`treeckpt.async_save`: the save is planned on the calling thread, only
the tensors this rank writes are copied into host buffers reused from one
save to the next, and a background thread writes and commits.

Otherwise (a user's planner, storage plugin or stager) the stager copies the
state dict and the DCP call sequence runs in a background thread, on a
process group of treeckpt's own. PROCESS runs it in a separate process when
this process is not part of a multi-rank group; in a group, each rank's
save runs in a checkpoint process of its own, the processes joined by a
process group of their own (``_process.py``).

Either way, a later save or load over the same ranks waits for the running
save first, so their collectives never interleave.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageWriter

from treeckpt.asyncsave import async_save as treeckpt_async_save
from treeckpt.dcp._engine import coordinator, fast_save, run_save, storage_writer_for
from treeckpt.dcp._process import Packed, SharedArena, checkpoint_process, packed, unpacked
from treeckpt.dcp._view import metadata_from_plan, metadata_of
from treeckpt.dcp.api import CheckpointException, wrap_failure
from treeckpt.dcp.default_planner import DefaultSavePlanner
from treeckpt.dcp.filesystem import FileSystemWriter
from treeckpt.dcp.staging import AsyncStager, DefaultStager, StagingOptions
from treeckpt.errors import CheckpointError
from treeckpt.shell import inflight
from treeckpt.shell.coord import LocalCoordinator
from treeckpt.shell.load import read_stored
from treeckpt.shell.save import SaveResult
from treeckpt.store.backends import open_backend
from treeckpt.store.reader import read_manifest

__all__ = ["async_save"]

# Background threads of treeckpt's saves carry this prefix: they never wait for
# themselves when a save or load waits for the ones in flight.
_THREAD_NAME = "treeckpt-async-save-dcp"


def _same(a: object, b: object) -> bool:
    return a is b


def _save_in_process(pack: Packed, writer: StorageWriter, planner: SavePlanner | None) -> Metadata:
    """The save, in the checkpoint process; its error crosses back as plain messages."""
    try:
        return run_save(unpacked(pack), writer, planner, LocalCoordinator())
    except CheckpointException as exc:
        failures = {
            rank: (CheckpointError(f"{type(e).__name__}: {e}"), traceback.StackSummary())
            for rank, (e, _) in exc.failures.items()
        }
        raise CheckpointException(str(exc), failures) from None


def _read_metadata(result: SaveResult) -> Metadata:
    """The Metadata of a committed save: from the plan on rank 0, read back elsewhere."""
    backend = open_backend(result.path)
    try:
        manifest = read_manifest(backend)
        if result.plan is not None:
            return metadata_from_plan(manifest, result.plan)
        return metadata_of(manifest, read_stored(backend, manifest))
    finally:
        backend.close()


def _via_treeckpt(
    state_dict: dict[str, Any], writer: FileSystemWriter, process_group: Any, rank: int
) -> Future[Any]:
    """``treeckpt.async_save``, its result turned into DCP's ``Metadata``."""
    out: Future[Any] = Future()
    saving = treeckpt_async_save(
        state_dict, writer.path, options=writer.options, process_group=process_group
    )

    def done(f: Future[Any]) -> None:
        try:
            result = f.result()
            out.set_result(_read_metadata(result))
        except CheckpointException as exc:
            out.set_exception(exc)
        except Exception as exc:
            out.set_exception(wrap_failure(exc, rank))

    saving.add_done_callback(done)
    return out


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
    default_planner = DefaultSavePlanner() if planner is None else planner
    if (
        async_checkpointer_type == AsyncCheckpointerType.THREAD
        and (async_stager is None or _same(async_stager, storage_writer))
        and fast_save(default_planner, writer)
        and isinstance(writer, FileSystemWriter)
        and writer.overwrite
        and use_collectives
        and not no_dist
    ):
        rank = dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0
        return _via_treeckpt(state_dict, writer, process_group, rank)
    return _staged_then_saved(
        state_dict,
        writer,
        planner,
        process_group,
        async_checkpointer_type,
        async_stager,
        no_dist,
        use_collectives,
    )


def _staged_then_saved(
    state_dict: dict[str, Any],
    writer: StorageWriter,
    planner: SavePlanner | None,
    process_group: Any,
    async_checkpointer_type: AsyncCheckpointerType,
    async_stager: AsyncStager | None,
    no_dist: bool,
    use_collectives: bool,
) -> Future[Any] | AsyncSaveResponse:
    owned: AsyncStager | None = None
    arena = SharedArena() if async_checkpointer_type == AsyncCheckpointerType.PROCESS else None
    stager = async_stager
    if stager is None:
        if isinstance(writer, AsyncStager):
            stager = writer
        else:
            stager = owned = DefaultStager(StagingOptions(False, False, False, False))
            if arena is not None:
                # Staged into shared memory: the checkpoint process maps it, no copy.
                owned.alloc = arena.alloc
    state_dict = {
        k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()
    }
    coord = (
        coordinator(process_group, no_dist, private=True) if use_collectives else LocalCoordinator()
    )
    staged = stager.stage(state_dict)

    def wait_staged() -> dict[str, Any]:
        return staged.result() if isinstance(staged, Future) else staged

    upload: Future[Any]
    if async_checkpointer_type == AsyncCheckpointerType.PROCESS and coord.world_size > 1:
        # Every rank's save in its checkpoint process, on a process group of their own.
        try:
            worker = checkpoint_process(coord)
        except CheckpointException:
            raise
        except Exception as exc:
            raise wrap_failure(exc, coord.rank) from exc
        upload = worker.submit(packed(wait_staged(), arena), writer, planner, use_collectives)
        inflight.track(upload)
    elif async_checkpointer_type == AsyncCheckpointerType.PROCESS:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        upload = pool.submit(_save_in_process, packed(wait_staged(), arena), writer, planner)
        upload.add_done_callback(lambda _: pool.shutdown(wait=False))
    else:
        upload = Future()
        upload.set_running_or_notify_cancel()

        def run() -> None:
            try:
                upload.set_result(run_save(wait_staged(), writer, planner, coord, use_collectives))
            except BaseException as exc:
                upload.set_exception(exc)

        inflight.track(upload)
        # Not a daemon: the interpreter waits for a running save at exit.
        threading.Thread(target=run, name=_THREAD_NAME, daemon=False).start()
    if owned is not None:
        closing = owned
        upload.add_done_callback(lambda _: closing.close())
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

"""Asynchronous saves: training goes on while the checkpoint is written.

``async_save`` does, on the calling thread, everything that must see the
state as it is now, and nothing more:

1. flatten the tree (``state_dict()`` of every ``Stateful`` is taken now),
   describe the shards and plan the save with the other ranks, so a bad
   tree fails at once, on every rank;
2. copy the tensors this rank will write (not the replicas another rank
   writes) into host buffers kept from one save to the next; CUDA tensors
   go to pinned buffers, every copy issued on a side stream (after the work
   queued on the tensors' stream) before any is waited for
   (``shell/transfer.py``).

The plan of a layout saved before is reused (``shell/plancache.py``), so a
training run's later saves block for little more than the copy.

It then returns a :class:`SaveFuture`. A background thread does the rest,
exactly as :func:`treeckpt.save` does: it makes a new checkpoint
directory's entry durable, writes, agrees with the other ranks, reads the
manifest being replaced, commits and removes the replaced files. The same
atomicity, the same error on every rank, on the future.

A second save (asynchronous or not) and any load over the same process
group wait for the running one first, so staging buffers are never
overwritten while being written and collectives never interleave.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from typing import Any

from treeckpt.core.incremental import ReuseTable
from treeckpt.core.options import SaveOptions
from treeckpt.errors import CheckpointError
from treeckpt.shell import inflight
from treeckpt.shell.ranks import check_user_metadata, coordinator, make_save_dir, sync_new_dir
from treeckpt.shell.save import SaveResult, commit_save, prepare_save
from treeckpt.shell.staging import StagingPool
from treeckpt.shell.transfer import HOST_POOL
from treeckpt.store.backends import open_backend

__all__ = ["AsyncSaver", "SaveFuture", "async_save", "free_host_buffers"]


class SaveFuture(Future[SaveResult]):
    """The outcome of an asynchronous save: ``result()`` is the :class:`SaveResult`.

    ``result()`` raises the save's :class:`~treeckpt.CheckpointError` if it
    failed on any rank (nothing is committed then). Figures about the
    blocking part are attributes:

    - ``blocked_s``: seconds ``async_save`` held the caller (plan and copy);
    - ``copy_s``: of which copying to host memory;
    - ``staged_bytes``: bytes this rank copied to host memory;
    - ``host_bytes``: host memory the staging buffers hold (kept for the next save).
    """

    blocked_s: float = 0.0
    copy_s: float = 0.0
    staged_bytes: int = 0
    host_bytes: int = 0


class AsyncSaver:
    """Asynchronous saves sharing one set of staging buffers, one save at a time.

    :func:`async_save` uses a process-wide instance; make your own to give
    different states their own buffers, and ``close()`` it to free them.
    """

    def __init__(self) -> None:
        self._pool = StagingPool()
        self._lock = threading.Lock()
        self._running: SaveFuture | None = None

    @property
    def host_bytes(self) -> int:
        """Host memory held by the staging buffers."""
        return self._pool.nbytes

    def wait(self) -> None:
        """Block until the running save (if any) has finished; its errors stay on its future."""
        running = self._running
        if running is not None:
            futures_wait([running])

    def close(self) -> None:
        """Wait for the running save, then release the staging buffers."""
        self.wait()
        self._pool.clear()

    def save(
        self,
        tree: Any,
        path: Any,
        *,
        options: SaveOptions | None = None,
        allow_pickle: bool = False,
        user_metadata: dict[str, Any] | None = None,
        process_group: Any = None,
        reuse: ReuseTable | None = None,
    ) -> SaveFuture:
        """Stage ``tree`` and write it to ``path`` in the background; see :func:`async_save`.

        ``reuse``: chunks of sibling checkpoints to reference (incremental saves).
        """
        with self._lock:
            self.wait()
            future = SaveFuture()
            future.set_running_or_notify_cancel()
            start = time.perf_counter()
            try:
                options = options or SaveOptions()
                check_user_metadata(user_metadata)
                coord = coordinator(process_group, options.timeout_s, private=True)
                backend = open_backend(str(path))
            except Exception as exc:
                future.set_exception(exc)
                return future
            try:
                new_dir = make_save_dir(backend, options)
            except Exception as exc:
                backend.close()
                future.set_exception(exc)
                return future
            try:
                prepared = prepare_save(
                    tree, backend, options=options, coord=coord, allow_pickle=allow_pickle
                )
            except Exception as exc:
                backend.close()
                future.set_exception(exc)
                return future
            # The other ranks are committed to this save now: a failure to
            # stage here is reported to them when the ranks agree on the writes.
            failed: BaseException | None = None
            copy_start = time.perf_counter()
            try:
                prepared, future.staged_bytes = self._pool.stage(prepared)
            except Exception as exc:
                failed = exc
            future.blocked_s = time.perf_counter() - start
            future.copy_s = time.perf_counter() - copy_start
            # The pool holds exactly what was staged (computed after the clock stops).
            future.host_bytes = future.staged_bytes if failed is None else self._pool.nbytes

            def finish() -> None:
                nonlocal failed
                try:
                    if new_dir and failed is None:
                        # The new directory's entry is made durable here, before
                        # the commit: an fsync need not hold training.
                        try:
                            sync_new_dir(backend)
                        except Exception as exc:
                            failed = exc
                    result = commit_save(
                        prepared,
                        backend,
                        options=options,
                        coord=coord,
                        user_metadata=user_metadata,
                        failed=failed,
                        reuse=reuse,
                    )
                except BaseException as exc:
                    if not isinstance(exc, CheckpointError):
                        exc = CheckpointError(
                            f"{backend.root}: asynchronous save failed: {type(exc).__name__}: {exc}"
                        ).with_traceback(exc.__traceback__)
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                finally:
                    backend.close()

            self._running = future
            inflight.track(future)
            # Not a daemon: the interpreter waits for a running save at exit.
            threading.Thread(target=finish, name="treeckpt-async-save", daemon=False).start()
            return future


_default: AsyncSaver | None = None
_default_lock = threading.Lock()


def async_save(
    tree: Any,
    path: Any,
    *,
    options: SaveOptions | None = None,
    allow_pickle: bool = False,
    user_metadata: dict[str, Any] | None = None,
    process_group: Any = None,
) -> SaveFuture:
    """Save like :func:`treeckpt.save`, returning as soon as the state is staged in host memory.

    The tree is flattened and planned now, the tensors this rank writes are
    copied to host buffers (reused by the next save; pinned for CUDA), and a
    background thread writes and commits. Mutating the model or optimizer
    after this returns does not change what is saved.

    Returns:
        A :class:`SaveFuture`: ``result()`` waits for the commit and returns
        the :class:`SaveResult`, or raises the save's error (every rank gets
        it; nothing is committed; the previous checkpoint is intact). Errors
        found while planning (an unsupported leaf, trees that differ between
        ranks) are on the future too, already set.

    A second ``async_save`` waits for the first to finish before staging.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = AsyncSaver()
        saver = _default
    return saver.save(
        tree,
        path,
        options=options,
        allow_pickle=allow_pickle,
        user_metadata=user_metadata,
        process_group=process_group,
    )


def free_host_buffers() -> int:
    """Release the host memory kept between saves and loads; returns the bytes released.

    That is the staging buffers of :func:`async_save` (once its running save
    has finished) and the pooled buffers that device tensors are copied
    through by :func:`treeckpt.save` and :func:`treeckpt.load` (pinned for
    CUDA). The next save or load allocates what it needs again.
    """
    freed = HOST_POOL.nbytes
    HOST_POOL.clear()
    with _default_lock:
        saver = _default
    if saver is not None:
        freed += saver.host_bytes
        saver.close()
    return freed

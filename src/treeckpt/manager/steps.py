"""Checkpoints of a training loop: ``CheckpointManager`` saves, lists and restores steps.

Every step is a plain treeckpt checkpoint under the root (``treeckpt.manager.root``
describes the layout): ``treeckpt.load(step_path)`` reads it, incremental or
not. Decisions (what is due, what to keep) are the pure functions of
``treeckpt.manager.policy``; deletion is ``treeckpt.manager.retention``; the
one-manager-per-root lock is ``treeckpt.manager.lock``. With several ranks,
rank 0 lists, locks and deletes, and every rank gets its decisions or its
error (``treeckpt.shell.ranks.on_coordinator``).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
import weakref
from typing import Any, Literal

from treeckpt import api
from treeckpt.asyncsave import AsyncSaver, SaveFuture
from treeckpt.core.incremental import ReuseTable
from treeckpt.core.options import LoadOptions, SaveOptions
from treeckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    LeafNotFoundError,
    LoadMismatchError,
    OptionsError,
    UnsupportedLeafError,
)
from treeckpt.manager import retention
from treeckpt.manager.lock import RootLock
from treeckpt.manager.policy import KeepPolicy, SavePolicy, check_metrics
from treeckpt.manager.root import META_KEY, StepInfo, StepRoot, step_dir
from treeckpt.shell.coord import Coordinator
from treeckpt.shell.ranks import check_user_metadata, coordinator, on_coordinator
from treeckpt.shell.save import save_tree

__all__ = ["CheckpointManager", "StepInfo", "StepSkippedWarning", "step_dir"]

# Errors that say "this template or call is wrong", not "this step is damaged".
_CALLER_ERRORS = (LoadMismatchError, UnsupportedLeafError, OptionsError, LeafNotFoundError)


class StepSkippedWarning(UserWarning):
    """A partial or damaged step was skipped while looking for the latest good one."""


class CheckpointManager:
    """Save a training loop's state every few steps, keep some, resume from the latest good one.

    Args:
        root: directory path or fsspec URL (``s3://bucket/run``, ``memory://``)
            holding one sub-checkpoint per step.
        max_to_keep: keep the newest N steps (``None``: all).
        keep_best: also keep the N best steps by ``best_metric`` (``best_mode``
            ``"max"`` or ``"min"``).
        save_every_steps / save_every_seconds: the save interval policy; ``save``
            skips steps that are not due (``force=True`` saves anyway).
        incremental: reference chunks whose raw bytes the previous committed
            step already stores instead of rewriting them.
        options / load_options: passed to every save and load.
        process_group: the ranks taking part (default: the default group when
            ``torch.distributed`` is initialised, else this process alone).
        stale_lock_s: a lock held from another host whose heartbeat is older
            than this is stale (see ``treeckpt.manager.lock``).
        async_save: ``save`` returns once the state is staged in host memory
            (``treeckpt.async_save``); the write, the commit and then retention
            finish in the background. The next ``save``, ``restore``,
            ``wait_until_finished`` or ``close`` waits for it and raises its error.

    Raises:
        RootLockedError: another live manager uses ``root``.
    """

    def __init__(
        self,
        root: Any,
        *,
        max_to_keep: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
        save_every_steps: int | None = None,
        save_every_seconds: float | None = None,
        incremental: bool = True,
        options: SaveOptions | None = None,
        load_options: LoadOptions | None = None,
        process_group: Any = None,
        stale_lock_s: float = 300.0,
        async_save: bool = False,
    ) -> None:
        self.root = os.fspath(root).rstrip("/") if not isinstance(root, str) else root.rstrip("/")
        self.keep = KeepPolicy(
            max_to_keep=max_to_keep,
            keep_best=keep_best,
            best_metric=best_metric,
            best_mode=best_mode,
        )
        self.interval = SavePolicy(every_steps=save_every_steps, every_seconds=save_every_seconds)
        self.incremental = incremental
        self.options = options or SaveOptions()
        self.load_options = load_options or LoadOptions()
        self.process_group = process_group
        #: the step the last ``restore`` returned (after skipping damaged ones)
        self.restored_step: int | None = None
        self._last_save_time: float | None = None
        #: steps ``restore`` found damaged: a new save of that step replaces them
        self._damaged: set[int] = set()
        self._root = StepRoot(self.root)
        self._lock: RootLock | None = None
        self._async = async_save
        self._saver: AsyncSaver | None = AsyncSaver() if async_save else None
        self._pending: tuple[int, SaveFuture] | None = None
        coord = self._coord()

        def open_root() -> None:
            self._root.backend.makedirs("")
            self._lock = RootLock(self._root.backend, stale_after_s=stale_lock_s)
            self._lock.acquire()
            # A manager dropped without close(): release its lock when collected.
            weakref.finalize(self, _release_quietly, self._lock)

        on_coordinator(coord, "manager-open", open_root)

    # ------------------------------------------------------------ plumbing

    def _coord(self) -> Coordinator:
        """The ranks of this manager, once every save running in the background is done."""
        return coordinator(self.process_group, self.options.timeout_s)

    def step_path(self, step: int) -> str:
        """The path or URL of ``step``'s checkpoint (loadable with ``treeckpt.load``)."""
        return self._root.step_path(step)

    # ------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first (a step appears only once committed)."""
        return on_coordinator(self._coord(), "manager-list", lambda: self._root.scan().committed)

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``. ``restore`` also checks it is undamaged."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_info(self, step: int) -> StepInfo:
        """Time, metrics and user metadata of a committed step."""
        return self._root.step_info(step)

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write under the interval policy.

        Local to this rank (no collective): exact for ``save_every_steps``; with
        ``save_every_seconds`` it reads this rank's clock, while ``save`` decides
        on rank 0 for every rank.
        """
        return self.interval.is_due(step, last_save_time=self._last_save_time, now=time.time())

    # ---------------------------------------------------------------- save

    def save(
        self,
        step: int,
        tree: Any,
        metrics: dict[str, float] | None = None,
        *,
        user_metadata: dict[str, Any] | None = None,
        force: bool = False,
        allow_pickle: bool = False,
    ) -> bool:
        """Save ``tree`` as ``step`` if the interval policy says it is due; apply retention.

        The step becomes visible only when its manifest is committed; older
        steps are deleted only after that, and only those retention lets go.
        Returns whether a step was saved.

        Raises:
            RootLockedError: another manager took this root over.
            CheckpointError: the step is already committed, or the save failed
                (every committed step is intact).
        """
        if type(step) is not int or step < 0:
            raise OptionsError(f"step must be a non-negative int, got {step!r}")
        check_metrics(metrics)
        meta = {
            META_KEY: {"step": step, "time": 0.0, "metrics": dict(metrics or {})},
            **(user_metadata or {}),
        }
        if META_KEY in (user_metadata or {}):
            raise OptionsError(f"user_metadata key {META_KEY!r} is reserved")
        check_user_metadata(meta)
        self.wait_until_finished()
        coord = self._coord()
        prepared = on_coordinator(coord, "manager-prepare", lambda: self._prepare(step, force))
        if prepared is None:
            return False
        reuse, now = prepared
        meta[META_KEY]["time"] = now
        if self._saver is not None:
            future = self._saver.save(
                tree,
                self.step_path(step),
                options=self.options,
                allow_pickle=allow_pickle,
                user_metadata=meta,
                process_group=self.process_group,
                reuse=reuse,
            )
            self._last_save_time = now  # rank 0's clock, on every rank
            self._pending = (step, future)
            if future.done() and future.exception() is not None:
                self.wait_until_finished()  # planning failed: raise now
            return True
        backend = self._root.open_step(step)
        try:
            save_tree(
                tree,
                backend,
                options=self.options,
                coord=coord,
                allow_pickle=allow_pickle,
                user_metadata=meta,
                reuse=reuse,
            )
        except BaseException:
            if coord.is_coordinator:
                self._root.discard_uncommitted(step)
            raise
        finally:
            backend.close()
        self._last_save_time = now  # rank 0's clock, on every rank
        on_coordinator(coord, "manager-retain", lambda: self._retain(step))
        return True

    def _prepare(self, step: int, force: bool) -> tuple[ReuseTable | None, float] | None:
        """Rank 0: is the step due, is the root still ours, where does it go, what to reuse."""
        now = time.time()
        if not force and not self.interval.is_due(
            step, last_save_time=self._last_save_time, now=now
        ):
            return None
        assert self._lock is not None
        self._lock.check()
        scan = self._root.scan()
        if step in scan.committed:
            if step not in self._damaged and self._root.readable(step):
                raise CheckpointError(
                    f"{self.step_path(step)}: step {step} is already saved; save a new step"
                )
            others = [s for s in scan.committed if s != step]
            retention.retire(
                self._root, [step], retention.in_use(self._root, others), sync=self.options.sync
            )
        if step in scan.retired or self._root.is_retired(step):
            raise CheckpointError(
                f"{self.step_path(step)}: step {step} was deleted but newer steps still read "
                "its data files; save under a new step number"
            )
        if step in scan.partial:
            self._root.remove_step(step)  # a crashed save: nothing reads it
        reuse = (
            self._root.reuse_table([s for s in scan.committed if s != step], self._damaged)
            if self.incremental
            else None
        )
        self._root.make_step_dir(step, self.options)
        return reuse, now

    def wait_until_finished(self) -> None:
        """Wait for a running asynchronous save, then apply retention; raise its error."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        coord = self._coord()
        try:
            future.result()
        except BaseException:
            if coord.is_coordinator:
                self._root.discard_uncommitted(step)
            raise
        on_coordinator(coord, "manager-retain", lambda: self._retain(step))

    def _retain(self, newest: int) -> None:
        """Rank 0, after ``newest`` committed: apply the keep policy (``manager.retention``)."""
        retention.retain(self._root, newest, self.keep, sync=self.options.sync)

    # ------------------------------------------------------------- restore

    def restore(
        self,
        step: int | None = None,
        tree: Any = None,
        *,
        strict: bool = True,
        allow_pickle: bool = False,
    ) -> Any:
        """Load ``step`` (default: the newest step that loads) into ``tree``, or build it.

        With ``step=None``, partial steps (no manifest) newer than the step
        restored and damaged steps (a manifest, index or chunk that fails its
        checks) are skipped with a ``StepSkippedWarning`` naming them; the
        step restored is ``self.restored_step``. With ``tree``, tensors are
        loaded in place as ``treeckpt.load`` does; without, the saved tree is
        rebuilt as ``treeckpt.restore`` does.

        Raises:
            CheckpointNotFoundError: no step (or not ``step``) is committed, or none loads.
            LoadMismatchError: the template does not match the step.
        """
        self.wait_until_finished()
        coord = self._coord()

        candidates, partial = on_coordinator(
            coord, "manager-choose", lambda: self._root.candidates(step)
        )
        for s in partial:
            warnings.warn(
                f"{self.step_path(s)}: step {s} is partial (its save never committed); skipped",
                StepSkippedWarning,
                stacklevel=2,
            )
        if not candidates:
            raise CheckpointNotFoundError(f"{self.root}: no committed step to restore")
        last: CheckpointError | None = None
        for s in candidates:
            path = self.step_path(s)
            try:
                if tree is None:
                    result = api.restore(
                        path,
                        allow_pickle=allow_pickle,
                        options=self.load_options,
                        process_group=self.process_group,
                    )
                else:
                    result = api.load(
                        tree,
                        path,
                        strict=strict,
                        allow_pickle=allow_pickle,
                        options=self.load_options,
                        process_group=self.process_group,
                    )
            except _CALLER_ERRORS:
                raise
            except CheckpointError as exc:
                if step is not None:
                    raise
                warnings.warn(
                    f"{path}: step {s} is damaged and was skipped ({exc})",
                    StepSkippedWarning,
                    stacklevel=2,
                )
                last = exc
                self._damaged.add(s)
                continue
            self.restored_step = s
            return result
        raise CheckpointNotFoundError(
            f"{self.root}: no committed step could be restored (all damaged)"
        ) from last

    # ------------------------------------------------------------- closing

    def close(self) -> None:
        """Finish a running save, then release the root (the lock); the manager saves no more."""
        try:
            self.wait_until_finished()
        finally:
            if self._saver is not None:
                self._saver.close()
            if self._lock is not None:
                self._lock.release()
            self._root.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_quietly(lock: RootLock) -> None:
    """Best-effort release at collection or exit: never raise from a finalizer."""
    with contextlib.suppress(Exception):
        lock.release()

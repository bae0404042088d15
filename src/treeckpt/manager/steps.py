"""Checkpoints of a training loop: steps under one root, retention, resume.

Layout::

    <root>/
      manager.lock                 the lock of the manager using the root
      step-0000000100/             one treeckpt checkpoint per step
        manifest.json              the step exists (committed) only through it
        data-<save_id>/...
      step-0000000090/
        retired                    a deleted step whose data files a kept step still reads
        data-<save_id>/r0-0.bin

Every step is a plain treeckpt checkpoint: ``treeckpt.load(step_path)`` reads
it, incremental or not. Decisions (what is due, what to keep) are the pure
functions of ``treeckpt.manager.policy``; with several ranks, rank 0 lists,
locks and deletes, and broadcasts what the others need.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import fsspec

from treeckpt import api
from treeckpt.asyncsave import AsyncSaver, SaveFuture
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.incremental import ReuseTable, build_reuse_table, files_in_use
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.options import LoadOptions, SaveOptions
from treeckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    LeafNotFoundError,
    LoadMismatchError,
    OptionsError,
    UnsupportedLeafError,
)
from treeckpt.manager.lock import RootLock
from treeckpt.manager.policy import KeepPolicy, SavePolicy, StepRecord, steps_to_keep
from treeckpt.shell.coord import Coordinator, LocalCoordinator
from treeckpt.shell.dist import DistCoordinator, distributed_active
from treeckpt.shell.save import save_tree
from treeckpt.store import layout
from treeckpt.store.backends import open_backend
from treeckpt.store.reader import read_indexes, read_manifest

__all__ = ["CheckpointManager", "StepInfo", "StepSkippedWarning"]

T = TypeVar("T")
_STEP_DIR = re.compile(r"step-([0-9]{10,18})")
RETIRED = "retired"
_META_KEY = "treeckpt.manager"
# Errors that say "this template or call is wrong", not "this step is damaged".
_CALLER_ERRORS = (LoadMismatchError, UnsupportedLeafError, OptionsError, LeafNotFoundError)


class StepSkippedWarning(UserWarning):
    """A partial or damaged step was skipped while looking for the latest good one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInfo:
    """The metadata of one committed step (stored in its manifest)."""

    step: int
    path: str
    time: float
    metrics: dict[str, float] = field(default_factory=dict)
    user_metadata: dict[str, Any] = field(default_factory=dict)


def step_dir(step: int) -> str:
    """The directory name of ``step`` (zero-padded, so names sort like numbers)."""
    return f"step-{step:010d}"


@dataclass(slots=True)
class _Scan:
    committed: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)


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
        self._local = "://" not in self.root or self.root.startswith("file://")
        self._fs, self._path = fsspec.core.url_to_fs(self.root)
        self._lock: RootLock | None = None
        self._async = async_save
        self._saver: AsyncSaver | None = AsyncSaver() if async_save else None
        self._pending: tuple[int, SaveFuture] | None = None
        coord = self._coord()

        def open_root() -> None:
            self._fs.makedirs(self._path, exist_ok=True)
            self._lock = RootLock(
                self._fs, self._path, stale_after_s=stale_lock_s, local=self._local
            )
            self._lock.acquire()
            # A manager dropped without close(): release its lock when collected.
            weakref.finalize(self, _release_quietly, self._lock)

        self._on_root(coord, "manager-open", open_root)

    # ------------------------------------------------------------ plumbing

    def _coord(self) -> Coordinator:
        if distributed_active(self.process_group):
            return DistCoordinator(self.process_group, timeout_s=self.options.timeout_s)
        return LocalCoordinator()

    @staticmethod
    def _on_root(coord: Coordinator, phase: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0; every rank gets its result or raises its error."""
        got: tuple[bool, Any] | None = None
        if coord.is_coordinator:
            try:
                got = (True, fn())
            except Exception as exc:
                got = (False, exc)
        got = coord.broadcast(got, phase)
        assert got is not None
        if not got[0]:
            raise got[1]
        return got[1]

    def step_path(self, step: int) -> str:
        """The path or URL of ``step``'s checkpoint (loadable with ``treeckpt.load``)."""
        return f"{self.root}/{step_dir(step)}"

    def _abs(self, name: str) -> str:
        return f"{self._path}/{name}"

    def _scan(self) -> _Scan:
        scan = _Scan()
        try:
            entries = self._fs.ls(self._path, detail=False)
        except FileNotFoundError:
            return scan
        for entry in entries:
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_DIR.fullmatch(name)
            if m is None:
                continue
            inside = {
                str(e).rstrip("/").rsplit("/", 1)[-1] for e in self._fs.ls(entry, detail=False)
            }
            step = int(m.group(1))
            if RETIRED in inside:
                scan.retired.append(step)
            elif layout.MANIFEST in inside:
                scan.committed.append(step)
            else:
                scan.partial.append(step)
        for steps in (scan.committed, scan.partial, scan.retired):
            steps.sort()
        return scan

    # ------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first (a step appears only once committed)."""
        return self._on_root(self._coord(), "manager-list", lambda: self._scan().committed)

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``. ``restore`` also checks it is undamaged."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_info(self, step: int) -> StepInfo:
        """Time, metrics and user metadata of a committed step."""
        backend = open_backend(self.step_path(step))
        try:
            meta = read_manifest(backend).user_metadata
        finally:
            backend.close()
        mine = meta.get(_META_KEY, {}) if isinstance(meta.get(_META_KEY), dict) else {}
        return StepInfo(
            step=step,
            path=self.step_path(step),
            time=float(mine.get("time", math.nan)),
            metrics=dict(mine.get("metrics", {})),
            user_metadata={k: v for k, v in meta.items() if k != _META_KEY},
        )

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
        _check_metrics(metrics)
        meta = {
            _META_KEY: {"step": step, "time": 0.0, "metrics": dict(metrics or {})},
            **(user_metadata or {}),
        }
        if _META_KEY in (user_metadata or {}):
            raise OptionsError(f"user_metadata key {_META_KEY!r} is reserved")
        api._check_user_metadata(meta)
        self.wait_until_finished()
        coord = self._coord()
        prepared = self._on_root(coord, "manager-prepare", lambda: self._prepare(step, force))
        if prepared is None:
            return False
        reuse, now = prepared
        meta[_META_KEY]["time"] = now
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
        backend = open_backend(self.step_path(step))
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
                self._discard_uncommitted(step)
            raise
        finally:
            backend.close()
        self._last_save_time = now  # rank 0's clock, on every rank
        self._on_root(coord, "manager-retain", lambda: self._retain(step))
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
        scan = self._scan()
        name = step_dir(step)
        if step in scan.committed:
            if step not in self._damaged and self._readable(step):
                raise CheckpointError(
                    f"{self.step_path(step)}: step {step} is already saved; save a new step"
                )
            self._retire([step], self._in_use([s for s in scan.committed if s != step]))
        if step in scan.retired or self._fs.exists(self._abs(f"{name}/{RETIRED}")):
            raise CheckpointError(
                f"{self.step_path(step)}: step {step} was deleted but newer steps still read "
                "its data files; save under a new step number"
            )
        if step in scan.partial:
            self._fs.rm(self._abs(name), recursive=True)  # a crashed save: nothing reads it
        reuse = self._reuse_table([s for s in scan.committed if s != step])
        backend = open_backend(self.step_path(step))
        try:
            backend.makedirs("")
            if self.options.sync and backend.supports_fsync:
                backend.sync_dir("..")
        finally:
            backend.close()
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
                self._discard_uncommitted(step)
            raise
        self._on_root(coord, "manager-retain", lambda: self._retain(step))

    def _discard_uncommitted(self, step: int) -> None:
        """After a failed save: remove the step's directory unless its manifest got committed."""
        name = step_dir(step)
        with contextlib.suppress(Exception):
            if not self._fs.exists(self._abs(f"{name}/{layout.MANIFEST}")):
                self._fs.rm(self._abs(name), recursive=True)

    def _readable(self, step: int) -> bool:
        """Whether a committed step's manifest and chunk indexes are intact."""
        backend = open_backend(self.step_path(step))
        try:
            read_indexes(backend, read_manifest(backend))
        except CheckpointError:
            return False
        finally:
            backend.close()
        return True

    def _reuse_table(self, committed: list[int]) -> ReuseTable | None:
        """The chunks of the newest readable committed step (it also names every older
        chunk it reuses), or an empty table: an incremental save records digests."""
        if not self.incremental:
            return None
        for step in reversed(committed):
            if step in self._damaged:
                continue  # restore() found a bad chunk in it: reuse nothing of it
            backend = open_backend(self.step_path(step))
            try:
                manifest = read_manifest(backend)
                indexes = read_indexes(backend, manifest)
            except CheckpointError:
                continue  # damaged: try an older one
            finally:
                backend.close()
            sizes = {
                fqn: dtype_info(r.dtype).itemsize
                for fqn, r in manifest.records.items()
                if isinstance(r, TensorLeaf)
            }
            return build_reuse_table([(step_dir(step), indexes)], sizes)
        return ReuseTable()

    # ----------------------------------------------------------- retention

    def _in_use(self, kept: list[int]) -> set[str] | None:
        """Data files (relative to the root) the ``kept`` steps read; ``None`` if unknown."""
        used: set[str] = set()
        for step in kept:
            backend = open_backend(self.step_path(step))
            try:
                used |= files_in_use(step_dir(step), read_indexes(backend, read_manifest(backend)))
            except CheckpointError:
                return None  # a damaged kept step: delete no data file this time
            finally:
                backend.close()
        return used

    def _retain(self, newest: int) -> None:
        """Rank 0, after ``newest`` committed: retire what the policy drops, free unused files."""
        scan = self._scan()
        records = []
        for step in scan.committed:
            metrics: dict[str, float] = {}
            if self.keep.best_metric is not None:  # only then are manifests read
                with contextlib.suppress(CheckpointError):
                    metrics = self.step_info(step).metrics
            records.append(StepRecord(step=step, metrics=metrics))
        keep = steps_to_keep(records, self.keep) | {newest}
        drop = [s for s in scan.committed if s not in keep]
        # Leftovers of crashed saves older than the newest step, and retired steps
        # whose files nothing reads any more.
        leftovers = [s for s in scan.partial if s < newest] + scan.retired
        if not drop and not leftovers:
            return  # nothing to delete: read no chunk index
        in_use = self._in_use(sorted(keep))
        self._retire(drop, in_use)
        self._sweep(leftovers, in_use)

    def _retire(self, steps: list[int], in_use: set[str] | None) -> None:
        """Delete ``steps``: the marker first (the step is gone), then the manifest, then
        every file no kept step reads."""
        for step in steps:
            name = step_dir(step)
            self._fs.pipe_file(self._abs(f"{name}/{RETIRED}"), b"")
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(self._abs(f"{name}/{layout.MANIFEST}"))
        self._sweep(steps, in_use)

    def _sweep(self, steps: list[int], in_use: set[str] | None) -> None:
        if in_use is None:
            return
        for step in steps:
            name = step_dir(step)
            files = [str(f) for f in self._fs.find(self._abs(name))]
            prefix = f"{self._path}/"
            rel = [f[len(prefix) :] if f.startswith(prefix) else f for f in files]
            if not any(r in in_use for r in rel):
                self._fs.rm(self._abs(name), recursive=True)
                continue
            for r in rel:
                if r not in in_use and not r.endswith(f"/{RETIRED}"):
                    with contextlib.suppress(FileNotFoundError):
                        self._fs.rm_file(self._abs(r))

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

        def choose() -> tuple[list[int], list[int]]:
            scan = self._scan()
            if step is not None:
                if step not in scan.committed:
                    raise CheckpointNotFoundError(
                        f"{self.step_path(step)}: step {step} is not a committed step "
                        f"(committed: {scan.committed[-8:]})"
                    )
                return [step], []
            newest = scan.committed[-1] if scan.committed else -1
            return sorted(scan.committed, reverse=True), [s for s in scan.partial if s > newest]

        candidates, partial = self._on_root(coord, "manager-choose", choose)
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

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_quietly(lock: RootLock) -> None:
    """Best-effort release at collection or exit: never raise from a finalizer."""
    with contextlib.suppress(Exception):
        lock.release()


def _check_metrics(metrics: dict[str, float] | None) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str)
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        for k, v in metrics.items()
    ):
        raise OptionsError(f"metrics must map str to finite numbers, got {metrics!r}")

"""The storage of a manager root: its step directories, what state each is in, their backends.

Layout::

    <root>/
      manager.lock                 the lock of the manager using the root
      step-0000000100/             one treeckpt checkpoint per step
        manifest.json              the step exists (committed) only through it
        data-<save_id>/...
      step-0000000090/
        retired                    a deleted step whose data files a kept step still reads
        data-<save_id>/r0-0.bin

Everything goes through a :class:`~treeckpt.store.backends.Backend`: the
root's own for listing, markers and removals, one per step for its
checkpoint. Only rank 0 calls the methods that list or change the root.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from treeckpt.core.dtypes import dtype_info
from treeckpt.core.incremental import ReuseTable, build_reuse_table
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import ChunkIndex, Manifest
from treeckpt.core.options import SaveOptions
from treeckpt.errors import CheckpointError, CheckpointNotFoundError
from treeckpt.shell.ranks import open_save_dir
from treeckpt.store import layout
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.reader import read_indexes, read_manifest

__all__ = ["RETIRED", "Scan", "StepInfo", "StepRoot", "step_dir"]

_STEP_DIR = re.compile(r"step-([0-9]{10,18})")
#: the marker of a deleted step whose data files a kept step still reads
RETIRED = "retired"
#: the manager's own key in a step's ``user_metadata``
META_KEY = "treeckpt.manager"


def step_dir(step: int) -> str:
    """The directory name of ``step`` (zero-padded, so names sort like numbers)."""
    return f"step-{step:010d}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInfo:
    """The metadata of one committed step (stored in its manifest)."""

    step: int
    path: str
    time: float
    metrics: dict[str, float] = field(default_factory=dict)
    user_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Scan:
    """The step directories of a root by state, each list sorted."""

    committed: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)


class StepRoot:
    """The step directories under one manager root (a path or fsspec URL)."""

    def __init__(self, root: str) -> None:
        self.root = root
        #: the root's backend: listings, markers, removals, the lock
        self.backend = open_backend(root)

    def step_path(self, step: int) -> str:
        """The path or URL of ``step``'s checkpoint (loadable with ``treeckpt.load``)."""
        return f"{self.root}/{step_dir(step)}"

    def open_step(self, step: int) -> Backend:
        """The backend of ``step``'s checkpoint (the caller closes it)."""
        return open_backend(self.step_path(step))

    def close(self) -> None:
        self.backend.close()

    # ------------------------------------------------------------- listing

    def scan(self) -> Scan:
        """Every step directory, as committed, partial (no manifest) or retired."""
        scan = Scan()
        for name in self.backend.listdir():
            m = _STEP_DIR.fullmatch(name)
            if m is None:
                continue
            inside = set(self.backend.listdir(name))
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

    def candidates(self, step: int | None) -> tuple[list[int], list[int]]:
        """The steps a restore tries, newest first, and the partial steps newer than them.

        Raises:
            CheckpointNotFoundError: ``step`` is given and not committed.
        """
        scan = self.scan()
        if step is not None:
            if step not in scan.committed:
                raise CheckpointNotFoundError(
                    f"{self.step_path(step)}: step {step} is not a committed step "
                    f"(committed: {scan.committed[-8:]})"
                )
            return [step], []
        newest = scan.committed[-1] if scan.committed else -1
        return sorted(scan.committed, reverse=True), [s for s in scan.partial if s > newest]

    def is_retired(self, step: int) -> bool:
        return self.backend.exists(f"{step_dir(step)}/{RETIRED}")

    # ------------------------------------------------------------- reading

    def read(self, step: int) -> tuple[Manifest, list[ChunkIndex]]:
        """``step``'s manifest and chunk indexes, validated (``CheckpointError`` if damaged)."""
        backend = self.open_step(step)
        try:
            manifest = read_manifest(backend)
            return manifest, read_indexes(backend, manifest)
        finally:
            backend.close()

    def step_info(self, step: int) -> StepInfo:
        """Time, metrics and user metadata of a committed step, from its manifest."""
        backend = self.open_step(step)
        try:
            meta = read_manifest(backend).user_metadata
        finally:
            backend.close()
        mine = meta.get(META_KEY, {}) if isinstance(meta.get(META_KEY), dict) else {}
        return StepInfo(
            step=step,
            path=self.step_path(step),
            time=float(mine.get("time", math.nan)),
            metrics=dict(mine.get("metrics", {})),
            user_metadata={k: v for k, v in meta.items() if k != META_KEY},
        )

    def readable(self, step: int) -> bool:
        """Whether a committed step's manifest and chunk indexes are intact."""
        try:
            self.read(step)
        except CheckpointError:
            return False
        return True

    def reuse_table(self, committed: list[int], damaged: set[int]) -> ReuseTable:
        """The chunks of the newest readable committed step (it also names every older
        chunk it reuses), or an empty table: an incremental save records digests."""
        for step in reversed(committed):
            if step in damaged:
                continue  # restore() found a bad chunk in it: reuse nothing of it
            try:
                manifest, indexes = self.read(step)
            except CheckpointError:
                continue  # damaged: try an older one
            sizes = {
                fqn: dtype_info(r.dtype).itemsize
                for fqn, r in manifest.records.items()
                if isinstance(r, TensorLeaf)
            }
            return build_reuse_table([(step_dir(step), indexes)], sizes)
        return ReuseTable()

    # ------------------------------------------------------------- changing

    def make_step_dir(self, step: int, options: SaveOptions) -> None:
        """Create ``step``'s directory, durably when new (before its save commits)."""
        backend = self.open_step(step)
        try:
            open_save_dir(backend, options)
        finally:
            backend.close()

    def remove_step(self, step: int) -> None:
        """Remove ``step``'s directory and everything in it."""
        self.backend.remove_tree(step_dir(step))

    def discard_uncommitted(self, step: int) -> None:
        """After a failed save: remove the step's directory unless its manifest got committed."""
        name = step_dir(step)
        with contextlib.suppress(Exception):
            if not self.backend.exists(f"{name}/{layout.MANIFEST}"):
                self.backend.remove_tree(name)

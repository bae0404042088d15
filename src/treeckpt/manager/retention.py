"""Retention: after a step commits, delete what the keep policy lets go, reference-safely.

What to keep is decided by the pure :func:`treeckpt.manager.policy.steps_to_keep`;
this module carries it out on rank 0. Steps of an incremental run read data
files of older steps, so deleting a step is three moves:

1. write the step's ``retired`` marker: from then on the step is gone (it is
   never listed, restored, nor saved again under its number);
2. remove its manifest;
3. remove every file of it that no kept step reads; a retired directory whose
   files a kept step still reads stays until the last such step is deleted.

When a kept step cannot be read (damaged), what it reads is unknown and no
data file is removed in that round.
"""

from __future__ import annotations

import contextlib

from treeckpt.core.incremental import files_in_use
from treeckpt.errors import CheckpointError
from treeckpt.manager.policy import KeepPolicy, StepRecord, steps_to_keep
from treeckpt.manager.root import RETIRED, StepRoot, step_dir
from treeckpt.store import layout

__all__ = ["in_use", "retain", "retire", "sweep"]


def retain(root: StepRoot, newest: int, keep: KeepPolicy, *, sync: bool) -> None:
    """Rank 0, after ``newest`` committed: retire what ``keep`` drops, free unused files.

    ``newest`` is always kept. ``sync``: make each ``retired`` marker durable
    before the manifest it stands for is removed.
    """
    scan = root.scan()
    records = []
    for step in scan.committed:
        metrics: dict[str, float] = {}
        if keep.best_metric is not None:  # only then are manifests read
            with contextlib.suppress(CheckpointError):
                metrics = root.step_info(step).metrics
        records.append(StepRecord(step=step, metrics=metrics))
    kept = steps_to_keep(records, keep) | {newest}
    drop = [s for s in scan.committed if s not in kept]
    # Leftovers of crashed saves older than the newest step, and retired steps
    # whose files nothing reads any more.
    leftovers = [s for s in scan.partial if s < newest] + scan.retired
    if not drop and not leftovers:
        return  # nothing to delete: read no chunk index
    used = in_use(root, sorted(kept))
    retire(root, drop, used, sync=sync)
    sweep(root, leftovers, used)


def in_use(root: StepRoot, kept: list[int]) -> set[str] | None:
    """Data files (relative to the root) the ``kept`` steps read; ``None`` if unknown."""
    used: set[str] = set()
    for step in kept:
        try:
            _, indexes = root.read(step)
        except CheckpointError:
            return None  # a damaged kept step: delete no data file this time
        used |= files_in_use(step_dir(step), indexes)
    return used


def retire(root: StepRoot, steps: list[int], used: set[str] | None, *, sync: bool) -> None:
    """Delete ``steps``: the retired marker first (the step is gone), then the
    ``.metadata`` marker (tools looking for DCP's file no longer take the step for a
    checkpoint), then the manifest, then every file no kept step reads."""
    for step in steps:
        name = step_dir(step)
        root.backend.commit_file(f"{name}/{RETIRED}", b"", sync=sync)
        root.backend.remove(f"{name}/{layout.DCP_MARKER}")
        root.backend.remove(f"{name}/{layout.MANIFEST}")
    sweep(root, steps, used)


def sweep(root: StepRoot, steps: list[int], used: set[str] | None) -> None:
    """Remove the files of ``steps`` that no kept step reads (nothing when ``used`` is unknown)."""
    if used is None:
        return
    for step in steps:
        files = root.backend.list_files(step_dir(step))
        if not any(f in used for f in files):
            root.remove_step(step)
            continue
        for f in files:
            if f not in used and not f.endswith(f"/{RETIRED}"):
                root.backend.remove(f)

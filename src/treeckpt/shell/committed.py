"""Reading one committed checkpoint while another save may replace it.

A save to a path that holds a checkpoint commits its new manifest, then
removes the old data files. A reader that read the old manifest may find
those files gone halfway through: the checkpoint was, at every instant,
the old or the new one, so the reader must return wholly one of them or say
it was replaced, never fail with "data file is missing" nor return a mix.

:func:`load_committed` runs one read (load, restore, ``read_tensor``) over
the manifest rank 0 read and broadcast. When it fails anywhere, rank 0
reads the manifest again and broadcasts what it found, so every rank makes
the same decision: the same save id means the failure stands (a file the
committed manifest names really is missing or damaged); another save id
means the checkpoint was replaced, and the read runs once more, from the new
manifest, rewriting every tensor and value it filled from the old one. A
second failure is a :class:`~treeckpt.CheckpointReplacedError` naming the
path. The cost on success is nothing; on failure one more manifest read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import ChunkIndex, Manifest
from treeckpt.core.plan import StoredTensor
from treeckpt.errors import CheckpointError, CheckpointReplacedError, CollectiveError
from treeckpt.shell.coord import Coordinator, agreed
from treeckpt.shell.load import read_stored
from treeckpt.shell.ranks import on_coordinator
from treeckpt.store.backends import Backend
from treeckpt.store.reader import (
    StoredChunks,
    read_committed,
    read_indexes,
    replaced_error,
    replacement,
)

__all__ = ["Committed", "load_committed", "read_checkpoint"]

T = TypeVar("T")

#: a committed manifest and every tensor of it with its chunks
Committed = tuple[Manifest, Mapping[str, StoredTensor]]


def read_checkpoint(backend: Backend, coord: Coordinator) -> Committed:
    """Rank 0 reads and validates the manifest once; every rank gets it, or the error.

    Each rank then reads the chunk indexes its own reads need
    (``StoredChunks``), when the manifest records which writer holds what
    (``extents``) or there is one process. Otherwise (checkpoints without
    that map, loaded on several ranks) rank 0 reads every index once and
    every rank gets them all, as before the map existed.
    """
    several = coord.world_size > 1

    def indexes(m: Manifest) -> list[ChunkIndex]:
        return read_indexes(backend, m) if several and m.extents is None else []

    manifest, got = on_coordinator(coord, "manifest", lambda: read_committed(backend, indexes))
    return manifest, StoredChunks(backend, manifest, got)


def load_committed(
    backend: Backend,
    coord: Coordinator,
    phase: str,
    fn: Callable[[Manifest, Mapping[str, StoredTensor]], T],
    *,
    fills_in_place: bool = False,
    first: Committed | None = None,
) -> T:
    """``fn(manifest, stored)`` on every rank over one committed checkpoint, wholly.

    ``fills_in_place``: ``fn`` writes into the caller's tensors (a load into a
    template), so a retry from a new checkpoint is made only when that one
    has every tensor the old one had: each tensor the first try wrote is then
    rewritten. ``first``: the checkpoint as every rank already has it (read
    on rank 0 and broadcast), so it is not read again.

    Raises:
        CheckpointReplacedError: the checkpoint was replaced while being read
            and reading the new one failed too (replaced again, or it does
            not load).
        CheckpointError: any other failure, on every rank.
    """
    old = read_checkpoint(backend, coord) if first is None else first
    try:
        return agreed(coord, phase, lambda: fn(*old))
    except CollectiveError:
        raise  # a rank is gone: no more collectives
    except CheckpointReplacedError:
        raise
    except CheckpointError as exc:
        failure = exc
    new: Committed | None = on_coordinator(
        coord, f"{phase}:replaced", lambda: _replacement(backend, old[0])
    )
    if new is None:
        raise failure  # the checkpoint was not replaced: the failure stands
    if fills_in_place:
        lost = sorted(_tensors(old[0]) - _tensors(new[0]))
        if lost:
            shown = ", ".join(lost[:5]) + (
                f", ... (+{len(lost) - 5} more)" if len(lost) > 5 else ""
            )
            raise replaced_error(
                backend,
                old[0],
                new[0],
                f"the new one lacks tensors of the old one the load may have begun to "
                f"fill ({shown})",
            ) from failure
    try:
        return agreed(coord, phase, lambda: fn(*new))
    except CollectiveError:
        raise
    except CheckpointError as exc:
        raise replaced_error(
            backend, old[0], new[0], f"reading the new one failed too ({exc})"
        ) from exc


def _replacement(backend: Backend, manifest: Manifest) -> Committed | None:
    """Rank 0: the checkpoint that replaced ``manifest``'s, or ``None`` if it still stands."""
    newer = replacement(backend, manifest)
    if newer is None:
        return None
    try:
        return newer, read_stored(backend, newer)
    except CheckpointError as exc:
        raise replaced_error(
            backend, manifest, newer, f"reading the new one failed too ({exc})"
        ) from exc


def _tensors(manifest: Manifest) -> set[str]:
    return {f for f, r in manifest.records.items() if isinstance(r, TensorLeaf)}

"""Incremental saves: which stored chunks a new checkpoint may reference.

A checkpoint saved next to earlier ones (steps under one root) need not
rewrite a chunk whose raw bytes a committed sibling already stores: its chunk
index lists the sibling's data file as ``../<sibling>/data-<id>/r<rank>-<k>.bin``
and points into it. These pure functions decide what may be referenced and
which files the kept checkpoints still use; the store validates the names
and the shell moves the bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from treeckpt.core.manifest import ChunkIndex, ChunkRef

__all__ = ["ReuseTable", "build_reuse_table", "files_in_use", "reference_name"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReuseTable:
    """Chunks of committed sibling checkpoints by content, for one incremental save.

    ``chunks`` maps ``(digest, itemsize)`` to a stored chunk whose file name is
    already relative to the checkpoint being written (``../<sibling>/...``);
    the item size is part of the key because a shuffled chunk decodes with
    it. ``files`` gives the exact size of every data file a chunk names.
    An empty table makes a save record digests and reference nothing.
    """

    chunks: Mapping[tuple[str, int], ChunkRef] = field(default_factory=dict)
    files: Mapping[str, int] = field(default_factory=dict)

    def find(self, digest: str, itemsize: int, raw_length: int) -> ChunkRef | None:
        """The stored chunk with these raw bytes, or ``None``."""
        hit = self.chunks.get((digest, itemsize))
        return hit if hit is not None and hit.raw_length == raw_length else None


def reference_name(name: str, sibling: str) -> str:
    """A file name read in checkpoint ``sibling``, rewritten for a checkpoint next to it.

    A file of ``sibling`` itself gets the prefix ``../<sibling>/``; a reference
    (already ``../<other>/...``) reads the same from every sibling.
    """
    return name if name.startswith("../") else f"../{sibling}/{name}"


def build_reuse_table(
    siblings: Iterable[tuple[str, Sequence[ChunkIndex]]], itemsizes: Mapping[str, int]
) -> ReuseTable:
    """The chunks with digests of committed siblings ``(name, chunk indexes)``.

    ``itemsizes`` maps each FQN of those siblings to its item size. Later
    siblings win on equal content, so references point at the newest copy.
    """
    chunks: dict[tuple[str, int], ChunkRef] = {}
    files: dict[str, int] = {}
    for sibling, indexes in siblings:
        for ix in indexes:
            sizes = {f.name: f.size for f in ix.files}
            for c in ix.chunks:
                if not c.digest or c.fqn not in itemsizes:
                    continue
                name = reference_name(c.file, sibling)
                chunks[(c.digest, itemsizes[c.fqn])] = dataclasses.replace(c, file=name)
                files[name] = sizes[c.file]
    return ReuseTable(chunks=chunks, files=files)


def files_in_use(step: str, indexes: Sequence[ChunkIndex]) -> set[str]:
    """Every data file checkpoint ``step`` reads, as a path relative to the shared root."""
    used = set()
    for ix in indexes:
        for f in ix.files:
            used.add(f.name[3:] if f.name.startswith("../") else f"{step}/{f.name}")
    return used

"""The manifest's data model: the commit record and the per-writer chunk indexes.

Encoding, decoding and validation against untrusted bytes live in
``treeckpt.store.manifest``; these are the plain values both sides share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treeckpt.core.box import Box
from treeckpt.core.leaves import LeafRecord

__all__ = ["FORMAT_VERSION", "ChunkIndex", "ChunkRef", "DataFile", "IndexRef", "Manifest"]

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRef:
    """Where one stored chunk of tensor ``fqn`` lives and how to check it.

    ``box`` is the chunk's region of the global tensor. ``length`` bytes at
    ``offset`` of ``file`` hold it, encoded with ``codec``; decoding gives
    exactly ``raw_length`` bytes. ``checksum`` is taken over the stored bytes.

    A raw chunk may also carry ``blocks``: the checksums of its consecutive
    ``block_bytes``-byte pieces (the last one shorter), so a reader that needs
    only part of the chunk reads and verifies only the blocks holding it.
    """

    fqn: str
    box: Box
    file: str
    offset: int
    length: int
    codec: str
    raw_length: int
    checksum: str
    block_bytes: int = 0
    blocks: tuple[str, ...] = ()
    #: ``"xxh3-128:<hex>"`` of the raw (decoded) bytes, recorded by incremental
    #: saves so that a later save can reuse this chunk; empty when not recorded.
    digest: str = ""

    def block_range(self, start: int, stop: int) -> tuple[int, int]:
        """The byte range ``[start, stop)`` widened to whole blocks (the whole chunk without blocks)."""
        if not self.blocks:
            return 0, self.length
        bb = self.block_bytes
        return start - start % bb, min(self.length, -(-stop // bb) * bb)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataFile:
    """A data file written by one rank, with its exact size."""

    name: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkIndex:
    """Everything one writer rank stored in one save."""

    save_id: str
    rank: int
    files: tuple[DataFile, ...]
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexRef:
    """The root manifest's pointer to one writer's chunk index."""

    rank: int
    file: str
    size: int
    checksum: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The root record: the commit of one checkpoint.

    ``structure`` is the tree structure record (see ``treeckpt.core.tree``),
    ``records`` describes every leaf by FQN, ``indexes`` points to the chunk
    index of each writer rank.
    """

    format_version: int
    save_id: str
    world_size: int
    structure: dict[str, Any]
    records: dict[str, LeafRecord]
    indexes: tuple[IndexRef, ...]
    user_metadata: dict[str, Any]

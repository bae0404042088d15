"""The manifest's data model: the commit record and the per-writer chunk indexes.

Encoding, decoding and validation against untrusted bytes live in
``treeckpt.store.manifest``; these are the plain values both sides share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from treeckpt.core.box import Box
from treeckpt.core.extents import Extents
from treeckpt.core.leaves import LeafRecord

__all__ = [
    "FORMAT_VERSION",
    "ChunkIndex",
    "ChunkRef",
    "DataFile",
    "IndexRef",
    "Manifest",
]

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRef:
    """Where one stored chunk of tensor ``fqn`` lives and how to check it.

    ``box`` is the chunk's region of the global tensor. ``length`` bytes at
    ``offset`` of ``file`` hold it, encoded with ``codec``; decoding gives
    exactly ``raw_length`` bytes. ``checksum`` is taken over the stored bytes.

    A chunk may also be cut into blocks of ``block_bytes`` raw bytes (the last
    one shorter), each stored as one contiguous run with its own checksum in
    ``blocks``, so a reader that needs only part of the chunk reads, verifies
    and decodes only the blocks holding it. Block ``k`` holds raw bytes
    ``[k * block_bytes, min((k + 1) * block_bytes, raw_length))`` and is
    stored at ``[block_offsets[k], block_offsets[k + 1])`` of the chunk's
    stored bytes (``block_offsets`` has one entry per block and the end).

    ``codec_params`` and ``segments`` are the codec's own fields of the chunk
    index; only the codec (``treeckpt.store.codecs``) reads them, and it
    derives ``block_offsets`` from them (they are not stored), so this layer
    needs nothing but arithmetic on offsets.
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
    codec_params: str = ""
    segments: tuple[int, ...] = ()
    #: derived from the fields above by the codec, so not part of equality
    block_offsets: tuple[int, ...] = field(default=(), compare=False)
    #: ``"xxh3-128:<hex>"`` of the raw (decoded) bytes, recorded by incremental
    #: saves so that a later save can reuse this chunk; empty when not recorded.
    digest: str = ""

    def raw_block_range(self, start: int, stop: int) -> tuple[int, int]:
        """The raw byte range ``[start, stop)`` widened to whole blocks (the whole chunk without blocks)."""
        if not self.blocks:
            return 0, self.raw_length
        bb = self.block_bytes
        return start - start % bb, min(self.raw_length, -(-stop // bb) * bb)

    def stored_range(self, raw_start: int, raw_stop: int) -> tuple[int, int]:
        """Where the whole blocks holding raw bytes ``[raw_start, raw_stop)`` are stored."""
        if not self.blocks:
            return 0, self.length
        starts = self.block_offsets
        bb = self.block_bytes
        return starts[raw_start // bb], starts[-(-raw_stop // bb)]


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
    index of each writer rank. ``holders`` maps each FQN that only some of the
    saving ranks held (a per-rank key, see ``treeckpt.core.merge``) to those
    ranks; an FQN every rank held is absent from it. ``extents`` (``None``
    when the save did not record it) says which writers' indexes hold which
    boxes of each tensor (see ``treeckpt.core.extents``).
    """

    format_version: int
    save_id: str
    world_size: int
    structure: dict[str, Any]
    records: dict[str, LeafRecord]
    indexes: tuple[IndexRef, ...]
    user_metadata: dict[str, Any]
    holders: dict[str, tuple[int, ...]] = field(default_factory=dict)
    extents: Extents | None = None

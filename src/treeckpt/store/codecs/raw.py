"""``raw``: the bytes as they are in memory (row-major, little-endian).

A raw chunk larger than ``Compression.raw_chunk_block_bytes`` also gets one
checksum per block of that many bytes, so a partial load reads and verifies
only the blocks it needs. Index block field (optional):
``[block_bytes, [checksum, ...]]``, at least two blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from treeckpt.core.manifest import ChunkRef
from treeckpt.errors import CorruptChunkError, ManifestError
from treeckpt.store.codecs._base import (
    Bytes1D,
    BytesLike,
    Decoding,
    Encoded,
    IndexFields,
    Workspace,
    read_block_checksums,
    uniform_block_offsets,
)

__all__ = ["RAW", "RawCodec"]


class RawCodec:
    """Stores raw bytes; every chunk that no other codec takes ends here."""

    id = "raw"
    stored_as_raw = True

    def encode(self, raw: Bytes1D, itemsize: int, ws: Workspace) -> Encoded:
        n = raw.nbytes
        bb = ws.compression.raw_chunk_block_bytes
        if bb <= 0 or n <= bb:
            return Encoded(self.id, raw.data)
        return Encoded(
            self.id, raw.data, block_bytes=bb, block_offsets=uniform_block_offsets(n, bb)
        )

    def decode_into(
        self, stored: BytesLike, chunk: ChunkRef, first: int, stop: int, out: Bytes1D, ctx: Decoding
    ) -> None:
        if len(stored) != out.nbytes:
            raise CorruptChunkError(
                f"{ctx.where}: raw chunk holds {len(stored)} bytes, expected {out.nbytes}"
            )
        out[...] = np.frombuffer(stored, dtype=np.uint8)

    def write_fields(self, chunk: ChunkRef) -> list[Any] | None:
        return [chunk.block_bytes, list(chunk.blocks)] if chunk.blocks else None

    def read_fields(
        self, field: Any, *, length: int, raw_length: int, dtype: str, itemsize: int, where: str
    ) -> IndexFields:
        if length != raw_length:
            raise ManifestError(f"{where}: raw chunk of {length} bytes, expected {raw_length}")
        if field is None:
            return {}
        bb, checks = read_block_checksums(field, 2, length, 2, where)
        return {
            "block_bytes": bb,
            "blocks": checks,
            "block_offsets": uniform_block_offsets(length, bb),
        }


RAW = RawCodec()

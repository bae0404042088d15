"""The one chunk decoder: the checks and decoding of stored chunk bytes, for loads and ``verify``.

A load and ``treeckpt verify`` run exactly these steps on the stored bytes
they read, so a chunk ``verify`` passes is one a load accepts:

1. the checksum over the stored bytes (the whole chunk's, or each block's
   when only some blocks were read) matches the chunk index;
2. the codec decodes them to exactly the declared raw bytes (no more is ever
   produced: decompression bombs are refused before they expand).
"""

from __future__ import annotations

import numpy as np
import zstandard

from treeckpt.core.manifest import ChunkRef
from treeckpt.errors import CorruptChunkError
from treeckpt.store.checksum import checksum
from treeckpt.store.codecs import Bytes1D, BytesLike, Decoding, codec_for

__all__ = ["ChunkDecoder"]


class ChunkDecoder:
    """One thread's decoder: its zstandard context and reusable buffers (no allocation per chunk)."""

    def __init__(self) -> None:
        self.dctx = zstandard.ZstdDecompressor()
        self._stored = np.empty(0, dtype=np.uint8)
        self._decoded = np.empty(0, dtype=np.uint8)

    def stored(self, n: int) -> memoryview:
        """A buffer for ``n`` stored bytes, valid until the next call."""
        if self._stored.nbytes < n:
            self._stored = np.empty(n, dtype=np.uint8)
        return self._stored[:n].data.cast("B")

    def decoded(self, n: int) -> Bytes1D:
        """A buffer for ``n`` raw bytes, valid until the next call."""
        if self._decoded.nbytes < n:
            self._decoded = np.empty(n, dtype=np.uint8)
        return self._decoded[:n]

    @staticmethod
    def check(stored: BytesLike, c: ChunkRef, where: str) -> None:
        """The whole chunk's stored bytes match its checksum."""
        if checksum(stored) != c.checksum:
            raise CorruptChunkError(f"{where}: checksum mismatch (the data file is damaged)")

    @staticmethod
    def check_blocks(stored: memoryview, c: ChunkRef, first: int, stop: int, where: str) -> None:
        """Blocks ``[first, stop)``, stored from the start of ``stored``, match their checksums."""
        starts = c.block_offsets
        base = starts[first]
        for k in range(first, stop):
            if checksum(stored[starts[k] - base : starts[k + 1] - base]) != c.blocks[k]:
                raise CorruptChunkError(
                    f"{where}: checksum mismatch in block {k} (the data file is damaged)"
                )

    def decode(
        self,
        stored: BytesLike,
        c: ChunkRef,
        first: int,
        stop: int,
        *,
        itemsize: int,
        where: str,
        out: Bytes1D | None = None,
    ) -> Bytes1D:
        """Decode blocks ``[first, stop)`` of ``c`` (``0, 1`` without blocks) from their stored bytes.

        Into ``out`` when given; otherwise into this decoder's buffer (valid
        until the next call), or, for a codec that stores raw bytes as they
        are, a view of ``stored`` itself (no copy). Returns the raw bytes.
        """
        codec = codec_for(c.codec, where)
        bb = c.block_bytes if c.blocks else c.raw_length
        n = min(stop * bb, c.raw_length) - first * bb
        if out is None:
            if codec.stored_as_raw and len(stored) == n:
                return np.frombuffer(stored, dtype=np.uint8)
            out = self.decoded(n)
        codec.decode_into(stored, c, first, stop, out, Decoding(itemsize, self.dctx, where))
        return out

"""Chunk codecs: each an object behind :class:`Codec`, found in one closed table.

``CODECS`` maps every codec id the format knows to its codec:

- ``raw`` (:mod:`.raw`): the bytes as they are, optionally with a checksum
  per block;
- ``planes`` (:mod:`.planes`): what treeckpt writes for a compressed chunk,
  byte planes per block, each stored raw or as one zstandard frame;
- ``zstd`` and ``shuffle-zstd`` (:mod:`.zstd`): the single-frame codecs of
  checkpoints written before ``planes``, read only.

A save tries the codecs of ``WRITE_ORDER`` in turn; the first that returns an
encoding wins (``raw`` always does). Every codec validates its own fields of
the chunk index and decodes its own blocks; nothing outside this package
compares codec ids.

Adding a codec takes one new module here, with an object satisfying
:class:`Codec`, and one entry in ``_ALL`` (and in ``WRITE_ORDER`` when saves
should write it). A new id is a format change: bump ``format_version``, add a
golden checkpoint and document it in ``docs/format.md``.

Decoding never produces more than the declared raw length: every zstandard
frame's content size must equal what it decodes to before anything is
decompressed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from treeckpt.core.options import Compression
from treeckpt.errors import CorruptChunkError
from treeckpt.store.codecs._base import (
    Bytes1D,
    BytesLike,
    Codec,
    Decoding,
    Encoded,
    Workspace,
)
from treeckpt.store.codecs.planes import PLANES
from treeckpt.store.codecs.raw import RAW
from treeckpt.store.codecs.zstd import SHUFFLE_ZSTD, ZSTD

__all__ = [
    "CODECS",
    "WRITE_ORDER",
    "Bytes1D",
    "BytesLike",
    "ChunkEncoder",
    "Codec",
    "Decoding",
    "Encoded",
    "Workspace",
    "codec_for",
]

_ALL: tuple[Codec, ...] = (RAW, ZSTD, SHUFFLE_ZSTD, PLANES)
#: every codec id the format knows (read-only view, built once)
CODECS: Mapping[str, Codec] = MappingProxyType({c.id: c for c in _ALL})
#: the codecs a save tries, in order; the last must accept every chunk
WRITE_ORDER: tuple[Codec, ...] = (PLANES, RAW)


def codec_for(codec_id: str, where: str) -> Codec:
    """The codec of a stored chunk; CorruptChunkError naming ``where`` for an unknown id."""
    codec = CODECS.get(codec_id)
    if codec is None:
        raise CorruptChunkError(f"{where}: unknown codec {codec_id!r}")
    return codec


class ChunkEncoder:
    """One writer thread's encoder; it keeps its compressor and buffers across chunks.

    :meth:`encode` may return a view of the encoder's own output buffer,
    valid until the next call: write it before encoding the next chunk.
    """

    def __init__(self, compression: Compression) -> None:
        self._ws = Workspace(compression)

    def encode(self, raw: Bytes1D, itemsize: int, *, compress: bool = True) -> Encoded:
        """Encode one chunk's raw bytes (a contiguous 1-d uint8 array) with the first codec that takes it.

        ``compress=False`` stores it raw (the save's codec policy found that
        compressing it would not pay).
        """
        if not compress:
            return RAW.encode(raw, itemsize, self._ws)
        for codec in WRITE_ORDER:
            enc = codec.encode(raw, itemsize, self._ws)
            if enc is not None:
                return enc
        raise AssertionError("the last codec of WRITE_ORDER takes every chunk")

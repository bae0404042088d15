"""The ``planes`` codec: per-plane choice, independent blocks, partial decoding, strictness."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from treeckpt.core.box import Box
from treeckpt.core.manifest import ChunkRef
from treeckpt.core.options import Compression
from treeckpt.errors import CorruptChunkError
from treeckpt.store.codecs import ChunkEncoder, Decoding, Encoded
from treeckpt.store.codecs._base import compressor
from treeckpt.store.codecs.planes import PLANES, planes_block_offsets

WHERE = "data-0123456789abcdef/r0-0.bin at offset 0 (tensor 'w')"


def _encoder(mode: str = "auto", block_bytes: int = 4096, min_ratio: float = 1.3) -> ChunkEncoder:
    return ChunkEncoder(
        Compression(mode=mode, level=1, min_ratio=min_ratio, block_bytes=block_bytes)  # type: ignore[arg-type]
    )


def _ref(enc: Encoded, raw_length: int) -> ChunkRef:
    itemsize = len(enc.codec_params)
    return ChunkRef(
        fqn="w",
        box=Box(offsets=(0,), sizes=(raw_length // itemsize,)),
        file="data-0123456789abcdef/r0-0.bin",
        offset=0,
        length=len(enc.payload),
        codec="planes",
        raw_length=raw_length,
        checksum="",
        block_bytes=enc.block_bytes,
        blocks=("",) * (len(enc.block_offsets) - 1),
        codec_params=enc.codec_params,
        segments=enc.segments,
        block_offsets=enc.block_offsets,
    )


def _decode(stored: bytes, c: ChunkRef, first: int, stop: int) -> np.ndarray:
    bb = c.block_bytes
    out = np.empty(min(stop * bb, c.raw_length) - first * bb, dtype=np.uint8)
    ctx = Decoding(len(c.codec_params), zstandard.ZstdDecompressor(), WHERE)
    PLANES.decode_into(stored, c, first, stop, out, ctx)
    return out


def _data(kind: str, itemsize: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = itemsize * count
    if kind == "zeros":
        return np.zeros(n, dtype=np.uint8)
    if kind == "random":
        return rng.integers(0, 256, n, dtype=np.uint8)
    if kind == "normal" and itemsize in (2, 4, 8):
        dtype = {2: np.float16, 4: np.float32, 8: np.float64}[itemsize]
        return (rng.standard_normal(count) * 0.02).astype(dtype).view(np.uint8)
    return (np.arange(n, dtype=np.uint64) // 7 % 251).astype(np.uint8)  # low-entropy ramp


@settings(max_examples=150, deadline=None)
@given(
    itemsize=st.sampled_from([1, 2, 4, 8, 16]),
    count=st.integers(1, 3000),
    block_bytes=st.sampled_from([0, 1, 7, 64, 1000, 4096]),
    mode=st.sampled_from(["auto", "always"]),
    kind=st.sampled_from(["zeros", "random", "normal", "ramp"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_round_trip_whole_and_any_block_range(
    itemsize: int,
    count: int,
    block_bytes: int,
    mode: str,
    kind: str,
    seed: int,
    data: st.DataObject,
) -> None:
    raw = _data(kind, itemsize, count, seed)
    enc = _encoder(mode, block_bytes).encode(raw, itemsize)
    if enc.codec != "planes":
        assert enc.codec == "raw" and bytes(enc.payload) == raw.tobytes()
        return
    stored = bytes(enc.payload)  # the encoder's buffer is reused by its next chunk
    assert len(stored) < raw.nbytes
    assert len(enc.codec_params) == itemsize and "z" in enc.codec_params
    assert enc.block_bytes % itemsize == 0
    c = _ref(enc, raw.nbytes)
    # the index fields alone give the block offsets the encoder wrote
    assert planes_block_offsets(c.raw_length, c.block_bytes, c.codec_params, c.segments) == (
        enc.block_offsets
    )
    nblocks = len(c.blocks)
    assert _decode(stored, c, 0, nblocks).tobytes() == raw.tobytes()

    # any raw byte range: the blocks holding it decode on their own to the same bytes
    start = data.draw(st.integers(0, raw.nbytes - 1))
    stop = data.draw(st.integers(start + 1, raw.nbytes))
    lo, hi = c.raw_block_range(start, stop)
    assert lo <= start < stop <= hi and lo % c.block_bytes == 0
    s_lo, s_hi = c.stored_range(lo, hi)
    part = _decode(stored[s_lo:s_hi], c, lo // c.block_bytes, -(-hi // c.block_bytes))
    assert part.tobytes() == raw[lo:hi].tobytes()


def test_auto_compresses_only_the_planes_that_pay() -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(1 << 18) * 0.02).astype(np.float32)
    # the sign-and-exponent byte compresses 3x; the mantissa bytes are noise: the
    # chunk shrinks 1.2x, below the default min_ratio (1.3), so it stays raw ...
    assert _encoder(block_bytes=256 << 10).encode(weights.view(np.uint8), 4).codec == "raw"
    # ... and with a lower one, only that plane is compressed
    enc = _encoder(block_bytes=256 << 10, min_ratio=1.15).encode(weights.view(np.uint8), 4)
    assert enc.codec == "planes" and enc.codec_params == "rrrz"
    assert 0.78 < len(enc.payload) / weights.nbytes < 0.88

    bf16 = weights.view(np.uint16)[1::2].copy()  # the top half of each float: bfloat16
    enc = _encoder(block_bytes=256 << 10).encode(bf16.view(np.uint8), 2)
    assert enc.codec == "planes" and enc.codec_params == "rz"

    enc = _encoder().encode(rng.integers(0, 256, 1 << 16, dtype=np.uint8), 4)
    assert enc.codec == "raw"

    enc = _encoder().encode(np.zeros(1 << 16, dtype=np.uint8), 4)
    assert enc.codec == "planes" and enc.codec_params == "zzzz"
    assert len(enc.payload) < (1 << 16) // 50


def test_min_ratio_applies_per_plane() -> None:
    weights = (np.random.default_rng(1).standard_normal(1 << 16) * 0.02).astype(np.float32)
    assert _encoder(min_ratio=1e9).encode(weights.view(np.uint8), 4).codec == "raw"
    enc = _encoder(min_ratio=0.5).encode(weights.view(np.uint8), 4)
    assert enc.codec == "planes" and enc.codec_params == "zzzz"
    # a plane that shrinks 3x does not make a chunk compress when the rest does not pay
    mixed = _encoder(min_ratio=2.0).encode(weights.view(np.uint8), 4)
    assert mixed.codec == "raw"


def test_never_and_ragged_lengths_store_raw() -> None:
    zeros = np.zeros(4096, dtype=np.uint8)
    assert _encoder("never").encode(zeros, 4).codec == "raw"
    assert _encoder("always").encode(zeros[:4095], 4).codec == "raw"
    assert _encoder("always").encode(zeros[:0], 4).codec == "raw"


def test_always_stores_incompressible_chunks_raw() -> None:
    raw = np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8)
    enc = _encoder("always").encode(raw, 2)
    assert enc.codec == "raw" and bytes(enc.payload) == raw.tobytes()


# ------------------------------------------------------------- strict decoding


def _zeros_chunk(n: int = 4096, block_bytes: int = 1024) -> tuple[bytes, ChunkRef]:
    enc = _encoder("always", block_bytes).encode(np.zeros(n, dtype=np.uint8), 4)
    assert enc.codec == "planes"
    return bytes(enc.payload), _ref(enc, n)


def test_a_frame_declaring_another_size_is_refused_naming_the_block() -> None:
    stored, c = _zeros_chunk()
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(257))
    forged = frame + stored[c.segments[0] :]
    bad = _forged(c, length=len(forged), segments=(len(frame), *c.segments[1:]))
    with pytest.raises(CorruptChunkError, match="block 0: frame declares 257 bytes") as info:
        _decode(forged, bad, 0, len(c.blocks))
    assert WHERE in str(info.value)


def test_garbage_and_bombs_are_refused_within_the_plane_size() -> None:
    stored, c = _zeros_chunk()
    garbage = b"\x00" * c.segments[0] + stored[c.segments[0] :]
    with pytest.raises(CorruptChunkError, match="block 0: not a zstandard frame"):
        _decode(garbage, c, 0, len(c.blocks))
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 24))
    forged = bomb + stored[c.segments[0] :]
    bad = _forged(c, length=len(forged), segments=(len(bomb), *c.segments[1:]))
    with pytest.raises(CorruptChunkError, match="block 0"):
        _decode(forged, bad, 0, len(c.blocks))


def test_stored_bytes_must_match_the_blocks_exactly() -> None:
    stored, c = _zeros_chunk()
    with pytest.raises(CorruptChunkError, match="expected"):
        _decode(stored[:-1], c, 0, len(c.blocks))
    with pytest.raises(CorruptChunkError, match="expected"):
        _decode(stored + b"\x00", c, 0, len(c.blocks))


def _forged(c: ChunkRef, *, length: int, segments: tuple[int, ...]) -> ChunkRef:
    """``c`` with other segment lengths, its block offsets derived from them as an index read does."""
    offsets = planes_block_offsets(c.raw_length, c.block_bytes, c.codec_params, segments)
    return dataclasses.replace(c, length=length, segments=segments, block_offsets=offsets)


def test_negative_levels_still_entropy_code_the_exponent_plane() -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(1 << 16) * 0.02).astype(np.float32)
    bf16_hi = np.ascontiguousarray(weights.view(np.uint8)[3::4])  # sign and exponent byte
    for level in (-7, -1, 0, 1):
        z = compressor(level).compress(bf16_hi.data)
        assert len(z) * 2 < bf16_hi.nbytes, level  # the sign-and-exponent byte shrinks > 2x

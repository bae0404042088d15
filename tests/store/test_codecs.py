"""Chunk codecs: the closed table, the legacy single-frame codecs, and strict decoding.

Decoding goes through the one decoder a load and ``verify`` use.
"""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tests.store.legacy_codecs import encode, shuffle
from treeckpt.core.box import Box
from treeckpt.core.manifest import ChunkRef
from treeckpt.errors import CheckpointError, CorruptChunkError
from treeckpt.store.codecs import CODECS, WRITE_ORDER
from treeckpt.store.codecs.zstd import unshuffle_into
from treeckpt.store.decode import ChunkDecoder

WHERE = "data-0123456789abcdef/r0-0.bin at offset 0 (tensor 'w')"


def _cctx() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=1, write_content_size=True)


def _encode(raw: np.ndarray, itemsize: int, mode: str, min_ratio: float = 1.08):
    return encode(raw, itemsize=itemsize, mode=mode, min_ratio=min_ratio, cctx=_cctx())


def _decode(payload, codec: str, itemsize: int, n: int) -> np.ndarray:
    """A whole chunk without blocks, decoded as a load does (its checksum aside)."""
    chunk = ChunkRef(
        fqn="w",
        box=Box(offsets=(0,), sizes=(max(1, n),)),
        file="r0-0.bin",
        offset=0,
        length=len(payload),
        codec=codec,
        raw_length=n,
        checksum="",
    )
    out = np.empty(n, dtype=np.uint8)
    ChunkDecoder().decode(payload, chunk, 0, 1, itemsize=itemsize, where=WHERE, out=out)
    return out


def _random(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _smooth_floats(n: int) -> np.ndarray:
    return np.linspace(0, 1, n, dtype=np.float32).view(np.uint8)


def test_codec_table_is_closed() -> None:
    assert tuple(CODECS) == ("raw", "zstd", "shuffle-zstd", "planes")
    assert all(CODECS[k].id == k for k in CODECS)
    with pytest.raises(TypeError):
        CODECS["lz4"] = CODECS["raw"]  # type: ignore[index]
    # saves write planes where it pays, raw otherwise; the legacy codecs are read only
    assert [c.id for c in WRITE_ORDER] == ["planes", "raw"]


@given(
    itemsize=st.sampled_from([1, 2, 4, 8, 16]),
    count=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_shuffle_unshuffle_round_trip(itemsize: int, count: int, seed: int) -> None:
    raw = _random(itemsize * count, seed)
    shuffled = shuffle(raw, itemsize)
    assert shuffled.nbytes == raw.nbytes
    if count > 1 and itemsize > 1:
        # byte j of element i lands at j * count + i
        assert shuffled[1 * count + 0] == raw[1]
        assert shuffled[0 * count + 1] == raw[itemsize]
    out = np.empty_like(raw)
    unshuffle_into(shuffled, itemsize, out)
    assert out.tobytes() == raw.tobytes()


def test_shuffle_groups_bytes_by_position() -> None:
    raw = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.uint8)
    assert shuffle(raw, 4).tolist() == [1, 5, 2, 6, 3, 7, 4, 8]
    assert shuffle(raw, 2).tolist() == [1, 3, 5, 7, 2, 4, 6, 8]


@pytest.mark.parametrize("mode", ["never", "always", "auto"])
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["zeros", "random", "smooth", "empty"])
def test_encode_decode_round_trip(mode: str, itemsize: int, kind: str) -> None:
    n = 64 * 1024 if kind != "empty" else 0
    raw = {
        "zeros": np.zeros(n, dtype=np.uint8),
        "random": _random(n),
        "smooth": _smooth_floats(n // 4),
        "empty": np.zeros(0, dtype=np.uint8),
    }[kind]
    enc = _encode(raw, itemsize, mode)
    assert enc.codec in CODECS
    if mode == "never" or n == 0:
        assert enc.codec == "raw"
    if enc.codec == "raw":
        assert bytes(enc.payload) == raw.tobytes()
    else:
        assert len(enc.payload) < raw.nbytes
        assert enc.codec == ("shuffle-zstd" if itemsize > 1 else "zstd")
    out = _decode(enc.payload, enc.codec, itemsize, raw.nbytes)
    assert out.tobytes() == raw.tobytes()


def test_auto_stores_random_bytes_raw_and_compresses_zeros() -> None:
    big = 1 << 20  # larger than the three sample windows
    for n in (4096, big):
        assert _encode(_random(n), 4, "auto").codec == "raw"
        enc = _encode(np.zeros(n, dtype=np.uint8), 4, "auto")
        assert enc.codec == "shuffle-zstd"
        assert len(enc.payload) < n // 50


def test_auto_respects_min_ratio() -> None:
    raw = _smooth_floats(16 * 1024)
    assert _encode(raw, 4, "auto", min_ratio=1.0).codec == "shuffle-zstd"
    assert _encode(raw, 4, "auto", min_ratio=1e9).codec == "raw"


def test_always_falls_back_to_raw_when_zstd_grows() -> None:
    raw = _random(1000)
    enc = _encode(raw, 1, "always")
    assert enc.codec == "raw"
    assert bytes(enc.payload) == raw.tobytes()


def test_shuffle_skipped_when_length_is_not_a_multiple_of_itemsize() -> None:
    raw = np.zeros(4097, dtype=np.uint8)
    enc = _encode(raw, 4, "always")
    assert enc.codec == "zstd"
    assert _decode(enc.payload, "zstd", 4, raw.nbytes).tobytes() == raw.tobytes()


def test_encode_raw_is_zero_copy_view() -> None:
    raw = _random(100)
    enc = _encode(raw, 1, "never")
    assert isinstance(enc.payload, memoryview)
    raw[0] ^= 0xFF
    assert bytes(enc.payload)[0] == raw[0]


# ------------------------------------------------------------- strict decoding


def _zstd(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(data)


def _rejects(payload, codec: str, n: int, match: str, itemsize: int = 1) -> None:
    with pytest.raises(CorruptChunkError, match=match) as info:
        _decode(payload, codec, itemsize, n)
    assert WHERE in str(info.value)
    assert isinstance(info.value, CheckpointError)


def test_decode_rejects_frame_declaring_another_size() -> None:
    _rejects(_zstd(bytes(100)), "zstd", 99, "declares 100 bytes")
    _rejects(_zstd(bytes(100)), "zstd", 101, "declares 100 bytes")
    _rejects(_zstd(bytes(1 << 20)), "shuffle-zstd", 64, "declares", itemsize=4)


def test_decode_rejects_frame_without_content_size() -> None:
    _rejects(_zstd(bytes(100), content_size=False), "zstd", 100, "declares")


def test_decode_rejects_truncated_payload() -> None:
    payload = _zstd(_random(5000).tobytes())
    for cut in (1, 4, 10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CorruptChunkError) as info:
            _decode(payload[:cut], "zstd", 1, 5000)
        assert WHERE in str(info.value)


def test_decode_rejects_garbage() -> None:
    for garbage in (b"", b"\x00" * 32, b"not a zstd frame at all", _random(64).tobytes()):
        with pytest.raises(CorruptChunkError):
            _decode(garbage, "zstd", 1, 32)


def test_decode_rejects_frame_whose_header_lies_small() -> None:
    """A frame whose header claims n bytes but whose blocks hold far more."""
    payload = bytearray(_zstd(bytes(1 << 20)))
    fhd = payload[4]
    assert fhd >> 6 == 2  # a 4-byte frame content size field
    at = 5 + (0 if fhd & 0x20 else 1) + (0, 1, 2, 4)[fhd & 3]
    payload[at : at + 4] = (64).to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(payload)) == 64
    _rejects(bytes(payload), "zstd", 64, "decompress")


def test_decode_raw_length_mismatch() -> None:
    _rejects(b"abc", "raw", 4, "raw chunk holds 3 bytes, expected 4")
    _rejects(b"abcde", "raw", 4, "raw chunk holds 5 bytes")


def test_decode_unknown_codec() -> None:
    _rejects(b"abcd", "lz4", 4, "unknown codec 'lz4'")


def test_decode_shuffle_with_bad_item_size() -> None:
    _rejects(_zstd(bytes(10)), "shuffle-zstd", 10, "not a multiple of the item size", itemsize=4)


def test_decode_ignores_nothing_beyond_the_declared_frame_size() -> None:
    """Trailing frames are never decoded past the destination (bounded output)."""
    first = _zstd(b"x" * 64)
    bomb = _zstd(bytes(16 << 20))
    out = _decode(first + bomb, "zstd", 1, 64)
    assert out.tobytes() == b"x" * 64


def test_no_module_outside_the_codecs_package_names_a_codec() -> None:
    """Adding a codec takes one module and one table entry: nothing else compares codec ids."""
    import ast
    from pathlib import Path

    import treeckpt

    root = Path(treeckpt.__file__).parent
    package = root / "store" / "codecs"
    ids = set(CODECS)
    found = []
    for path in sorted(root.rglob("*.py")):
        if package in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            # "raw" is also a plain word (a column of raw sizes); a codec id is
            # compared with or passed as one; the other ids are never plain words
            named = (
                [node.value]
                if isinstance(node, ast.Constant) and node.value in ids - {"raw"}
                else []
            )
            if isinstance(node, ast.Compare):
                named += [
                    c.value
                    for c in (node.left, *node.comparators)
                    if isinstance(c, ast.Constant) and c.value in ids
                ]
            if (
                isinstance(node, ast.keyword)
                and node.arg == "codec"
                and isinstance(node.value, ast.Constant)
                and node.value.value in ids
            ):
                named.append(node.value.value)
            found += [f"{path.relative_to(root)}:{node.lineno}: {v!r}" for v in named]  # type: ignore[attr-defined]
    assert not found, found

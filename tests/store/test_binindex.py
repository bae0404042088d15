"""The binary chunk index: round trips, and every damaged or forged form refused."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zstandard

import treeckpt
from tests.adversarial.forge import same, sample_tree, template_of
from treeckpt.core.manifest import ChunkIndex, IndexRef, Manifest
from treeckpt.errors import ManifestError
from treeckpt.store import layout
from treeckpt.store.backends import open_backend
from treeckpt.store.binindex import decode_binary_index, encode_binary_index
from treeckpt.store.checksum import checksum, content_digest
from treeckpt.store.manifest import decode_index, encode_index
from treeckpt.store.reader import read_index, read_manifest

OPTIONS = treeckpt.SaveOptions(
    chunk_bytes=4096,
    io_threads=2,
    compression=treeckpt.Compression(
        mode="auto", block_bytes=1024, raw_chunk_block_bytes=512, min_ratio=1.1
    ),
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, ChunkIndex, bytes]:
    path = tmp_path_factory.mktemp("bin") / "ck"
    treeckpt.save(sample_tree(0), str(path), options=OPTIONS)
    b = open_backend(str(path))
    m = read_manifest(b)
    (ref,) = m.indexes
    assert ref.file == layout.binary_index_file(m.save_id, 0)
    ix = read_index(b, m, ref)
    # raw chunks with and without blocks, planes chunks, a 0-d tensor
    assert {c.codec for c in ix.chunks} == {"raw", "planes"}
    assert any(c.codec == "raw" and c.blocks for c in ix.chunks)
    assert any(c.codec == "raw" and not c.blocks for c in ix.chunks)
    assert any(c.box.ndim == 0 for c in ix.chunks)
    return m, ix, b.read_file(ref.file, ref.size)


def _ref(m: Manifest, blob: bytes, binary: bool = True) -> IndexRef:
    name = (layout.binary_index_file if binary else layout.index_file)(m.save_id, 0)
    return IndexRef(rank=0, file=name, size=len(blob), checksum=checksum(blob))


def test_round_trip_is_exact_and_equals_the_json_form(saved: Any) -> None:
    m, ix, blob = saved
    assert encode_binary_index(ix) == blob
    assert decode_index(blob, _ref(m, blob), m) == ix
    js = encode_index(ix)
    from_json = decode_index(js, _ref(m, js, binary=False), m)
    assert from_json == ix
    for a, b in zip(from_json.chunks, ix.chunks, strict=True):
        assert a.block_offsets == b.block_offsets  # derived, not compared by ==


def test_digests_round_trip(saved: Any) -> None:
    m, ix, _ = saved
    chunks = tuple(
        dataclasses.replace(c, digest=content_digest(str(n).encode()))
        for n, c in enumerate(ix.chunks)
    )
    with_digests = dataclasses.replace(ix, chunks=chunks)
    blob = encode_binary_index(with_digests)
    got = decode_index(blob, _ref(m, blob), m)
    assert [c.digest for c in got.chunks] == [c.digest for c in chunks]


def test_every_truncation_and_bit_flip_is_refused(saved: Any) -> None:
    """Through the manifest's record, and through the file's own trailer alone."""
    m, _, blob = saved
    ref = _ref(m, blob)
    for n in range(len(blob)):
        with pytest.raises(ManifestError, match=r"index-r0\.idx"):
            decode_index(blob[:n], ref, m)
        with pytest.raises(ManifestError, match=r"index-r0\.idx"):
            decode_binary_index(blob[:n], 0, m, ref.file)
    for bit in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ManifestError, match=r"index-r0\.idx"):
            decode_index(bytes(bad), ref, m)
        with pytest.raises(ManifestError, match=r"index-r0\.idx"):
            decode_binary_index(bytes(bad), 0, m, ref.file)


# ----------------------------------------------------------- forged indexes


@dataclasses.dataclass
class Parts:
    head: dict[str, Any]
    table: np.ndarray
    sums: np.ndarray
    coords: np.ndarray
    blocks: np.ndarray
    segments: np.ndarray
    digests: np.ndarray | None
    version: int = 1
    magic: bytes = b"TCKINDEX"


def _split(blob: bytes) -> Parts:
    magic, version, hl = struct.unpack_from("<8sII", blob)
    head = json.loads(blob[16 : 16 + hl])
    raw = zstandard.ZstdDecompressor().decompress(blob[16 + hl : -8])
    words = np.frombuffer(raw, dtype="<i8")
    n, c, b, s = head["counts"]
    pos = [0]

    def take(k: int) -> np.ndarray:
        out = words[pos[0] : pos[0] + k].copy()
        pos[0] += k
        return out

    table = np.cumsum(take(10 * n).reshape(10, n), axis=1).T.copy()
    sums, coords, blocks, segs = take(n), take(c), take(b), take(s)
    digests = take(2 * n) if head["digests"] else None
    assert pos[0] == len(words)
    return Parts(head, table, sums, coords, blocks, segs, digests, version, magic)


def _frame(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)


def _join(p: Parts, fix_counts: bool = True, frame: Callable[[bytes], bytes] = _frame) -> bytes:
    if fix_counts:
        p.head["counts"] = [len(p.table), len(p.coords), len(p.blocks), len(p.segments)]
    text = json.dumps(p.head, separators=(",", ":")).encode()
    out = struct.pack("<8sII", p.magic, p.version, len(text)) + text
    table = np.asarray(p.table, dtype=np.int64)
    raw = np.diff(table.T, axis=1, prepend=0).astype("<i8").tobytes()
    for arr in (p.sums, p.coords, p.blocks, p.segments, p.digests):
        if arr is not None:
            raw += np.asarray(arr, dtype="<i8").tobytes()
    out += frame(raw)
    return out + struct.pack("<Q", xxhash.xxh3_64_intdigest(out))


def _forge(
    saved: Any,
    edit: Callable[[Parts], Any],
    fix_counts: bool = True,
    frame: Callable[[bytes], bytes] = _frame,
) -> str:
    m, _, blob = saved
    p = _split(blob)
    edit(p)
    forged = _join(p, fix_counts, frame)
    with pytest.raises(ManifestError) as info:
        decode_index(forged, _ref(m, forged), m)
    assert "index-r0.idx" in str(info.value)
    return str(info.value)


def test_split_and_join_reproduce_the_file(saved: Any) -> None:
    assert _join(_split(saved[2])) == saved[2]


COL = {
    c: k
    for k, c in enumerate(
        [
            "tensor",
            "file",
            "offset",
            "length",
            "codec",
            "raw_length",
            "block_bytes",
            "blocks",
            "params",
            "segments",
        ]
    )
}


def _first(p: Parts, codec: str, blocks: bool | None = None) -> int:
    cid = p.head["codecs"].index(codec)
    rows = [
        i
        for i, r in enumerate(p.table)
        if r[COL["codec"]] == cid and (blocks is None or bool(r[COL["blocks"]]) == blocks)
    ]
    return rows[0]


def _set(col: str, value: int, codec: str = "raw", blocks: bool | None = None) -> Any:
    def edit(p: Parts) -> None:
        p.table[_first(p, codec, blocks), COL[col]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("tensor", 99), "tensor number out of range"),
        (_set("file", 9), "file number out of range"),
        (_set("codec", 9), "codec number out of range"),
        (_set("params", 9, "planes"), "codec parameters"),
        (_set("offset", -1), "out of range"),
        (_set("length", 2**62), "out of range"),
        (_set("offset", 2**40), "beyond the end"),
        (_set("raw_length", 7), "raw_length does not match"),
        (_set("length", 5, blocks=False), "raw chunk of 5 bytes"),
        (_set("block_bytes", 0, blocks=True), "block_bytes without blocks"),
        (_set("block_bytes", 3, "planes"), "planes|cover"),
        (_set("segments", 1, blocks=False), "add up|without blocks"),
        (_set("params", 1, blocks=False), "codec fields without blocks"),
        (_set("params", 1, "raw", blocks=True), "does not have"),
        (lambda p: p.head.update(save_id="0" * 16), "another save"),
        (lambda p: p.head.update(rank=1), "another save"),
        (lambda p: p.head.update(codecs=["lz4", *p.head["codecs"][1:]]), "unknown codec"),
        (lambda p: p.head["tensors"].__setitem__(0, "step"), "not a tensor"),
        (lambda p: p.head["tensors"].__setitem__(0, "nope"), "not a tensor"),
        (lambda p: p.head["files"][0].__setitem__(0, "../../x.bin"), "is not one of this save's"),
        (lambda p: p.head["files"][0].__setitem__(1, -3), "size"),
        (lambda p: p.head.pop("params"), "head lacks"),
        (lambda p: p.head.update(digests=1), "digests"),
        (lambda p: p.head.update(params=[1]), "list of strings"),
        (lambda p: setattr(p, "magic", b"TCKINDEY"), "bad magic"),
        (lambda p: setattr(p, "version", 2), "upgrade"),
        (lambda p: setattr(p, "version", 0), "bad format version"),
        (lambda p: setattr(p, "coords", p.coords[:-1]), "dimensions"),
        (lambda p: setattr(p, "blocks", p.blocks[:-1]), "add up|cover"),
        (lambda p: setattr(p, "segments", p.segments[:-1]), "add up|cover"),
        (lambda p: p.coords.__setitem__(0, 10**6), "outside the tensor shape"),
        (lambda p: p.coords.__setitem__(0, -1), "out of range"),
        (lambda p: p.segments.__setitem__(0, 0), "segment"),
        (lambda p: p.segments.__setitem__(0, p.segments[0] + 1), "add up"),
    ],
)
def test_forged_fields_are_refused(saved: Any, edit: Any, match: str) -> None:
    msg = _forge(saved, edit)
    assert re.search(match, msg), msg


def test_counts_that_disagree_with_the_length_are_refused(saved: Any) -> None:
    msg = _forge(saved, lambda p: p.head.update(counts=[len(p.table) + 1, 0, 0, 0]), False)
    assert "head describes" in msg


def test_zero_sized_box_is_refused(saved: Any) -> None:
    def edit(p: Parts) -> None:
        row = next(i for i, t in enumerate(p.table[:, COL["tensor"]]) if _ndim(p, t))
        starts = np.cumsum([0] + [2 * _ndim(p, t) for t in p.table[:, COL["tensor"]]])
        p.coords[starts[row] + _ndim(p, p.table[row, COL["tensor"]])] = 0  # its first size

    msg = _forge(saved, edit)
    assert "outside the tensor shape or is empty" in msg


_NDIM = {"w": 2, "w2": 2, "z": 2, "i": 1, "u8": 1, "s": 0, "np": 2}


def _ndim(p: Parts, t: int) -> int:
    return _NDIM[p.head["tensors"][int(t)]]


def test_a_checkpoint_with_a_binary_index_loads_bit_exactly(tmp_path: Path) -> None:
    tree = sample_tree(3)
    treeckpt.save(tree, str(tmp_path / "ck"), options=OPTIONS)
    assert same(tree, treeckpt.restore(str(tmp_path / "ck")))
    assert same(tree, treeckpt.load(template_of(tree), str(tmp_path / "ck")))
    part = treeckpt.read_tensor(str(tmp_path / "ck"), "w2", (slice(3, 40),))
    assert torch.equal(part.view(torch.int32), tree["w2"][3:40].view(torch.int32))


def test_block_counts_that_would_wrap_their_sum_are_refused(saved: Any) -> None:
    def edit(p: Parts) -> None:
        rows = [i for i, r in enumerate(p.table) if r[COL["blocks"]]]
        p.table[rows[0], COL["blocks"]] += 2**61
        p.table[rows[1], COL["blocks"]] += 2**61
        p.table[rows[2], COL["blocks"]] += 2**61
        p.table[rows[3], COL["blocks"]] += 2**61  # 4 x 2^61 overflows an int64 sum

    msg = _forge(saved, edit)
    assert "more block checksums" in msg


def test_a_form_that_does_not_match_its_name_is_refused(saved: Any) -> None:
    """JSON bytes under the binary name, binary bytes under the JSON name: ManifestError."""
    m, ix, blob = saved
    js = encode_index(ix)
    as_bin = IndexRef(
        rank=0, file=layout.binary_index_file(m.save_id, 0), size=len(js), checksum=checksum(js)
    )
    with pytest.raises(ManifestError, match=r"index-r0\.idx: not a treeckpt binary chunk index"):
        decode_index(js, as_bin, m)
    as_json = IndexRef(
        rank=0, file=layout.index_file(m.save_id, 0), size=len(blob), checksum=checksum(blob)
    )
    with pytest.raises(ManifestError, match=r"index-r0\.json: not valid JSON"):
        decode_index(blob, as_json, m)


def _no_content_size(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False).compress(raw)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (_no_content_size, r"columns hold -1 bytes, but its head describes \d+"),
        (lambda raw: _frame(raw) + _frame(b""), "not exactly one zstd frame"),
        (lambda raw: _frame(raw) + b"\0", "not exactly one zstd frame"),
        (lambda raw: _frame(raw)[:-3], "not a valid zstd frame|not exactly one zstd frame"),
        (lambda raw: b"\0" * 8 + _frame(raw), "not a valid zstd frame"),
        (lambda raw: _frame(raw[:-8]), r"columns hold \d+ bytes, but its head describes"),
    ],
)
def test_columns_that_are_not_one_exact_frame_are_refused(
    saved: Any, frame: Callable[[bytes], bytes], match: str
) -> None:
    msg = _forge(saved, lambda p: None, frame=frame)
    assert re.search(match, msg), msg


def test_columns_that_would_inflate_too_far_are_refused(saved: Any) -> None:
    """Counts of 2^39 chunks: refused before anything is inflated or allocated."""
    msg = _forge(saved, lambda p: p.head.update(counts=[1 << 39, 0, 0, 0]), False)
    assert re.search(r"describes \d+ bytes of columns, too many for \d+ stored bytes", msg), msg


def test_delta_coded_columns_are_small(saved: Any) -> None:
    """Offsets that grow by the chunk lengths cost about nothing: the checksums dominate."""
    _, ix, blob = saved
    n = len(ix.chunks)
    stored = len(blob) - 16 - struct.unpack_from("<8sII", blob)[2] - 8
    words = sum(_split(blob).head["counts"]) + 10 * n + (2 * n if ix.chunks[0].digest else 0)
    assert stored < 8 * words // 2, (stored, 8 * words)

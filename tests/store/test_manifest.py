"""Manifest and chunk index encoding: round trips, the envelope, validation."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import pytest

from treeckpt.core.box import Box
from treeckpt.core.leaves import PickleLeaf, TensorLeaf, ValueLeaf
from treeckpt.core.manifest import ChunkIndex, ChunkRef, DataFile, IndexRef, Manifest
from treeckpt.errors import ManifestError
from treeckpt.store import layout
from treeckpt.store.checksum import checksum
from treeckpt.store.manifest import (
    decode_index,
    decode_manifest,
    decode_record,
    encode_index,
    encode_manifest,
    encode_record,
)

SAVE_ID = "0123456789abcdef"


def _values() -> dict[str, Any]:
    return {
        "none": None,
        "t": True,
        "f": False,
        "zero": 0,
        "big": 2**200,
        "neg": -(2**200) - 1,
        "pi": math.pi,
        "negzero": -0.0,
        "inf": math.inf,
        "ninf": -math.inf,
        "nan": struct.unpack(">d", bytes.fromhex("7ff8000000000abc"))[0],
        "str": "héllo \u2603 \U0001f600 \x00",
        "surrogate": "a\ud800b",
        "bytes": bytes(range(256)),
        "empty_bytes": b"",
    }


def _manifest() -> tuple[Manifest, ChunkIndex]:
    records: dict[str, Any] = {
        "w": TensorLeaf(lib="torch", dtype="bfloat16", shape=(4, 3)),
        "a": TensorLeaf(lib="numpy", dtype="int64", shape=(0,)),
        "s": TensorLeaf(lib="numpy-scalar", dtype="float64", shape=()),
        "p": PickleLeaf(data=b"\x80\x05N."),
    }
    for k, v in _values().items():
        records[f"v.{k}"] = ValueLeaf(value=v)
    structure = {
        "type": "dict",
        "keys": ["w", "a", "s", "p", "v"],
        "children": [
            {"leaf": "w"},
            {"leaf": "a"},
            {"leaf": "s"},
            {"leaf": "p"},
            {
                "type": "dict",
                "keys": list(_values()),
                "children": [{"leaf": f"v.{k}"} for k in _values()],
            },
        ],
    }
    data = layout.data_file(SAVE_ID, 0, 0)
    chunks = (
        ChunkRef(
            fqn="w",
            box=Box(offsets=(0, 0), sizes=(2, 3)),
            file=data,
            offset=0,
            length=12,
            codec="raw",
            raw_length=12,
            checksum=checksum(b"a"),
        ),
        ChunkRef(
            fqn="w",
            box=Box(offsets=(2, 0), sizes=(2, 3)),
            file=data,
            offset=12,
            length=9,
            codec="shuffle-zstd",
            raw_length=12,
            checksum=checksum(b"b"),
        ),
        ChunkRef(
            fqn="s",
            box=Box(offsets=(), sizes=()),
            file=data,
            offset=21,
            length=8,
            codec="raw",
            raw_length=8,
            checksum=checksum(b"c"),
        ),
    )
    index = ChunkIndex(
        save_id=SAVE_ID, rank=0, files=(DataFile(name=data, size=29),), chunks=chunks
    )
    blob = encode_index(index)
    m = Manifest(
        format_version=1,
        save_id=SAVE_ID,
        world_size=2,
        structure=structure,
        records=records,
        indexes=(
            IndexRef(
                rank=0, file=layout.index_file(SAVE_ID, 0), size=len(blob), checksum=checksum(blob)
            ),
        ),
        user_metadata={"run": "x", "n": [1, 2, {"a": None}]},
    )
    return m, index


def _bits(v: Any) -> Any:
    return struct.pack(">d", v) if isinstance(v, float) else (type(v), v)


def test_manifest_round_trip() -> None:
    m, _ = _manifest()
    data = encode_manifest(m)
    assert data.isascii()
    back = decode_manifest(data)
    assert back.save_id == m.save_id
    assert back.world_size == m.world_size
    assert back.structure == m.structure
    assert back.indexes == m.indexes
    assert back.user_metadata == m.user_metadata
    assert list(back.records) == list(m.records)
    for fqn, rec in m.records.items():
        got = back.records[fqn]
        if isinstance(rec, ValueLeaf):
            assert isinstance(got, ValueLeaf)
            assert _bits(got.value) == _bits(rec.value), fqn
        else:
            assert got == rec
    assert encode_manifest(back) == data


def test_index_round_trip() -> None:
    m, index = _manifest()
    blob = encode_index(index)
    back = decode_index(blob, m.indexes[0], m)
    assert back == index
    assert encode_index(back) == blob


def test_envelope_format_and_checksum() -> None:
    m, _ = _manifest()
    doc = json.loads(encode_manifest(m))
    assert list(doc) == ["magic", "format_version", "checksum", "body"]
    assert doc["magic"] == "treeckpt"
    assert doc["format_version"] == 1
    text = json.dumps(doc["body"], separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    assert doc["checksum"] == checksum(text.encode())
    _, index = _manifest()
    idoc = json.loads(encode_index(index))
    assert idoc["magic"] == "treeckpt-index"


def test_manifest_has_no_floats_and_no_pickle_by_default() -> None:
    m, _ = _manifest()
    doc = json.loads(encode_manifest(m), parse_float=lambda s: pytest.fail(f"float {s}"))
    assert doc["body"]["leaves"]["v.nan"] == {"kind": "float", "value": "7ff8000000000abc"}
    assert doc["body"]["leaves"]["v.big"] == {"kind": "int", "value": str(2**200)}


@pytest.mark.parametrize(
    "raw",
    [
        {"kind": "float", "value": 1.5},
        {"kind": "float", "value": "7FF8000000000000"},
        {"kind": "float", "value": "00"},
        {"kind": "int", "value": 3},
        {"kind": "int", "value": "1e5"},
        {"kind": "int", "value": "9" * 4301},
        {"kind": "bool", "value": 1},
        {"kind": "bytes", "value": "!!!"},
        {"kind": "pickle", "data": 3},
        {"kind": "tensor", "lib": "jax", "dtype": "float32", "shape": []},
        {"kind": "tensor", "lib": "torch", "dtype": "float128", "shape": []},
        {"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [-1]},
        {"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [1.0]},
        {"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [True]},
        {"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [2**62]},
        {"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [2**31, 2**31]},
        {"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [1] * 65},
        {"kind": "tensor", "lib": "numpy-scalar", "dtype": "float32", "shape": [1]},
        {"kind": "module", "value": "os.system"},
        "none",
        None,
    ],
)
def test_decode_record_rejects(raw: Any) -> None:
    with pytest.raises(ManifestError, match="leaf 'x'"):
        decode_record(raw, "leaf 'x'")


@pytest.mark.parametrize("value", list(_values().values()), ids=list(_values()))
def test_record_round_trip(value: Any) -> None:
    rec = ValueLeaf(value=value)
    enc = encode_record(rec)
    json.dumps(enc, allow_nan=False)
    back = decode_record(json.loads(json.dumps(enc)), "here")
    assert isinstance(back, ValueLeaf)
    assert _bits(back.value) == _bits(value)


def _with_blocks(index: ChunkIndex, blocks: tuple[str, ...], block_bytes: int) -> ChunkIndex:
    c = dataclasses.replace(index.chunks[-1], block_bytes=block_bytes, blocks=blocks)
    return dataclasses.replace(index, chunks=(*index.chunks[:-1], c))


def _decode_alone(m: Manifest, index: ChunkIndex) -> ChunkIndex:
    blob = encode_index(index)
    ref = IndexRef(
        rank=0, file=layout.index_file(SAVE_ID, 0), size=len(blob), checksum=checksum(blob)
    )
    return decode_index(blob, ref, dataclasses.replace(m, indexes=(ref,)))


def test_block_checksums_round_trip_and_are_validated() -> None:
    m, index = _manifest()
    good = _with_blocks(index, (checksum(b"1"), checksum(b"2")), 4)  # 8-byte raw chunk
    assert _decode_alone(m, good) == good
    for blocks, bb in [
        ((checksum(b"1"),), 4),  # does not cover the chunk
        ((checksum(b"1"), checksum(b"2"), checksum(b"3")), 4),  # too many
        ((checksum(b"1"), "crc:00"), 4),  # not a checksum
        ((checksum(b"1"), checksum(b"2")), 0),  # no block size
    ]:
        with pytest.raises(ManifestError, match="block"):
            _decode_alone(m, _with_blocks(index, blocks, bb))


def _as_planes(index: ChunkIndex, **fields: Any) -> ChunkIndex:
    """Chunk 1 (6 bfloat16 values, 9 stored bytes) as a ``planes`` chunk of two blocks."""
    base: dict[str, Any] = {
        "codec": "planes",
        "block_bytes": 8,
        "blocks": (checksum(b"p0"), checksum(b"p1")),
        "codec_params": "rz",
        "segments": (2, 1),  # block 0: 4 raw + 2; block 1: 2 raw + 1 = 9 bytes
    }
    c = dataclasses.replace(index.chunks[1], **{**base, **fields})
    return dataclasses.replace(index, chunks=(index.chunks[0], c, *index.chunks[2:]))


def test_planes_chunks_round_trip_and_are_validated() -> None:
    m, index = _manifest()
    good = _as_planes(index)
    back = _decode_alone(m, good)
    assert back == good
    assert back.chunks[1].stored_range(0, 8) == (0, 6)
    assert back.chunks[1].stored_range(8, 12) == (6, 9)
    assert back.chunks[1].raw_block_range(9, 10) == (8, 12)
    for fields, match in [
        ({"codec_params": "rzz"}, "one 'r' or 'z' per byte of bfloat16"),
        ({"codec_params": "rr"}, "malformed planes chunk"),
        ({"segments": (3, 1)}, "do not add up to the stored length 9"),
        ({"segments": (3,)}, "segments do not cover"),
        ({"block_bytes": 3}, "do not cover|malformed planes"),
        ({"blocks": (checksum(b"p0"),)}, "block checksums do not cover"),
        ({"blocks": ()}, "needs its block list"),
    ]:
        with pytest.raises(ManifestError, match=match):
            _decode_alone(m, _as_planes(index, **fields))


# ------------------------------------------- tensor flags and typed values


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"requires_grad": 1}, "bad requires_grad"),
        ({"requires_grad": "true"}, "bad requires_grad"),
        ({"parameter": None}, "bad parameter"),
        ({"lib": "numpy", "requires_grad": True}, "bad requires_grad"),
        ({"lib": "numpy", "parameter": True}, "bad parameter"),
        ({"dtype": "int64", "requires_grad": True}, "bad requires_grad"),
    ],
)
def test_tensor_flags_are_validated(fields: dict[str, Any], match: str) -> None:
    raw = {"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [2], **fields}
    with pytest.raises(ManifestError, match=rf"leaf 'x': {match} \(a bool, true only for floating"):
        decode_record(raw, "leaf 'x'")


def test_tensor_flags_round_trip_and_are_absent_by_default() -> None:
    plain = TensorLeaf(lib="torch", dtype="float32", shape=(2,))
    assert encode_record(plain) == {
        "kind": "tensor",
        "lib": "torch",
        "dtype": "float32",
        "shape": [2],
    }
    assert decode_record(encode_record(plain), "x") == plain
    flagged = TensorLeaf(
        lib="torch", dtype="bfloat16", shape=(2,), requires_grad=True, parameter=True
    )
    assert decode_record(json.loads(json.dumps(encode_record(flagged))), "x") == flagged


def test_a_bad_value_record_in_a_manifest_names_file_and_leaf() -> None:
    m, _ = _manifest()
    doc = json.loads(encode_manifest(m))
    doc["body"]["leaves"]["v.none"] = {"kind": "torch-dtype", "value": "os.system"}
    text = json.dumps(doc["body"], separators=(",", ":"))
    doc["checksum"] = checksum(text.encode())
    with pytest.raises(
        ManifestError, match=r"^manifest\.json: leaf 'v\.none': torch dtype 'os\.system' is not"
    ):
        decode_manifest(json.dumps(doc, separators=(",", ":")).encode())


def test_enum_members_of_one_manifest_share_their_types() -> None:
    import enum

    class Mode(enum.Enum):
        A = 1
        B = 2

    m, _ = _manifest()
    records = {
        **m.records,
        "e1": ValueLeaf(value=Mode.A),
        "e2": ValueLeaf(value={Mode.B, 3}),
        "e3": ValueLeaf(value=Mode.A),
    }
    structure = {
        **m.structure,
        "keys": [*m.structure["keys"], "e1", "e2", "e3"],
        "children": [*m.structure["children"], {"leaf": "e1"}, {"leaf": "e2"}, {"leaf": "e3"}],
    }
    back = decode_manifest(
        encode_manifest(dataclasses.replace(m, records=records, structure=structure))
    )
    e1, e2, e3 = (back.records[k].value for k in ("e1", "e2", "e3"))  # type: ignore[union-attr]
    (b,) = (x for x in e2 if x != 3)
    assert e1 is e3 and type(b) is type(e1) and b.name == "B" and type(e1).__name__ == "Mode"


# ----------------------------------------------------- per-rank keys (holders)


def _with_holders(raw: Any) -> bytes:
    """The test manifest (world size 2) with its body's ``holders`` set to ``raw``."""
    m, _ = _manifest()
    doc = json.loads(encode_manifest(m))
    doc["body"]["holders"] = raw
    text = json.dumps(doc["body"], separators=(",", ":"), ensure_ascii=True)
    doc["checksum"] = checksum(text.encode())
    return json.dumps(doc).encode()


def test_holders_round_trip_and_are_absent_when_every_rank_held_every_key() -> None:
    m, _ = _manifest()
    assert "holders" not in json.loads(encode_manifest(m))["body"]
    assert decode_manifest(encode_manifest(m)).holders == {}
    fqn = next(iter(m.records))
    with_holders = dataclasses.replace(m, holders={fqn: (1,)})
    data = encode_manifest(with_holders)
    assert json.loads(data)["body"]["holders"] == {fqn: [1]}
    assert decode_manifest(data).holders == {fqn: (1,)}
    assert decode_manifest(_with_holders({fqn: [0]})).holders == {fqn: (0,)}


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ([], "holders must be an object"),
        ({"nope": [0]}, "holders of 'nope': not a leaf of this checkpoint"),
        ({"FQN": []}, "holders of 'FQN': expected a list of 1 to world_size - 1 ranks"),
        ({"FQN": [0, 1]}, "holders of 'FQN': expected a list of 1 to world_size - 1 ranks"),
        ({"FQN": 0}, "holders of 'FQN': expected a list of 1 to world_size - 1 ranks"),
        ({"FQN": [2]}, r"holders of 'FQN': expected an integer in \[0, 2\), got '2'"),
        ({"FQN": [-1]}, r"holders of 'FQN': expected an integer in \[0, 2\), got '-1'"),
        ({"FQN": ["0"]}, r"holders of 'FQN': expected an integer in \[0, 2\), got '0'"),
    ],
)
def test_holders_are_validated(raw: Any, error: str) -> None:
    m, _ = _manifest()
    fqn = next(iter(m.records))
    if isinstance(raw, dict):
        raw = {fqn if k == "FQN" else k: v for k, v in raw.items()}
        error = error.replace("FQN", fqn)
    with pytest.raises(ManifestError, match="^manifest.json: " + error + "$"):
        decode_manifest(_with_holders(raw))

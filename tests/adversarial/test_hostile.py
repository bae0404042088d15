"""Hostile checkpoints: forged manifests and indexes with valid checksums.

A checkpoint is untrusted input. Every forged field must be rejected with a
``CheckpointError`` naming the file (and the tensor for chunk fields), before
any path outside the checkpoint is touched, any code runs, or any large
allocation is made.
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import treeckpt
import treeckpt.api as api
from tests.adversarial.forge import (
    MANIFEST,
    SAVE_OPTIONS,
    Ckpt,
    copy,
    same,
    sample_tree,
    seal,
    template_of,
)
from treeckpt import (
    CheckpointError,
    CorruptChunkError,
    LoadMismatchError,
    ManifestError,
    PlanError,
    UnsupportedLeafError,
)
from treeckpt.store.backends import open_backend
from treeckpt.testing.faults import FaultyBackend

TREE = sample_tree(0)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "ckpt"
    treeckpt.save(TREE, str(path), options=SAVE_OPTIONS)
    return path


@pytest.fixture
def ck(pristine: Path, tmp_path: Path) -> Ckpt:
    return copy(pristine, tmp_path / "ckpt")


def rejects(ck: Ckpt, exc: type[Exception] = CheckpointError, match: str | None = None) -> str:
    """Both restore and a template load raise ``exc``; returns the message."""
    with pytest.raises(exc, match=match) as info:
        treeckpt.restore(str(ck.path))
    with pytest.raises(exc, match=match):
        treeckpt.load(template_of(TREE), str(ck.path))
    with pytest.raises(CheckpointError):
        treeckpt.load(template_of(TREE), str(ck.path), strict=False)
    return str(info.value)


def test_forge_round_trip_is_faithful(ck: Ckpt) -> None:
    """The forging tools themselves change nothing when nothing is edited."""
    ck.edit_manifest(lambda body: None)
    ck.edit_index(lambda body: None)
    assert same(TREE, treeckpt.restore(str(ck.path)))


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    "name",
    [
        "../x.json",
        "/etc/passwd",
        "data-{id}/../../x.json",
        "data-{id}/../manifest.json",
        "data-{id}/index-r0.json/../../../x.json",
        "data-{id}//index-r0.json",
        "./data-{id}/index-r0.json",
        "data-{id}/index-r1.json",
        "data-0000000000000000/index-r0.json",
        "data-{id}/index-r0.json\x00",
        "data-{id}\\..\\..\\x.json",
        "",
    ],
)
def test_index_name_escapes_are_refused(
    ck: Ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    name = name.replace("{id}", ck.save_id)
    # a perfectly valid index waits at the escaped location
    (tmp_path / "x.json").write_bytes(ck.read(ck.index_name()))
    ck.edit_manifest(lambda body: body["indexes"][0].update(file=name))
    fb = FaultyBackend(open_backend(str(ck.path)))
    monkeypatch.setattr(api, "_backend", lambda path: fb)
    with pytest.raises(ManifestError, match=r"indexes\[0\]") as info:
        treeckpt.restore(str(ck.path))
    assert MANIFEST in str(info.value)
    with pytest.raises(ManifestError):
        treeckpt.load(template_of(TREE), str(ck.path))
    assert {c.name for c in fb.reads} == {MANIFEST}


@pytest.mark.parametrize(
    "name",
    [
        "../x.bin",
        "/etc/passwd",
        "data-{id}/../../x.bin",
        "data-{id}/r0-0.bin/../../../x.bin",
        "data-{id}/../data-{id}/r0-0.bin",
        "data-0000000000000000/r0-0.bin",
        "data-{id}/r1-0.bin",
        "data-{id}/r0-00.bin",
        "data-{id}/r0--1.bin",
        "data-{id}/r0-0.bin\x00",
        "data-{id}/r0-0.bin\n",
        "data-{id}/sub/r0-0.bin",
        "data-{id}/index-r0.json",
        "manifest.json",
        7,
        None,
    ],
)
def test_data_file_name_escapes_are_refused(
    ck: Ckpt, monkeypatch: pytest.MonkeyPatch, name: Any
) -> None:
    if isinstance(name, str):
        name = name.replace("{id}", ck.save_id)

    def edit(body: dict[str, Any]) -> None:
        body["files"][0][0] = name

    ck.edit_index(edit)
    fb = FaultyBackend(open_backend(str(ck.path)))
    monkeypatch.setattr(api, "_backend", lambda path: fb)
    with pytest.raises(ManifestError, match=r"files\[0\]") as info:
        treeckpt.restore(str(ck.path))
    assert "index-r0.json" in str(info.value)
    touched = {c.name for c in fb.reads}
    assert touched <= {MANIFEST, ck.index_name()}, touched


@pytest.mark.parametrize(
    "save_id", ["../../etc", "0123456789ABCDEF", "0123", "", 12, None, "a" * 17]
)
def test_bad_save_id(ck: Ckpt, save_id: Any) -> None:
    ck.edit_manifest(lambda body: body.update(save_id=save_id))
    msg = rejects(ck, ManifestError, "save_id")
    assert MANIFEST in msg


# ------------------------------------------------------------------ leaves


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"kind": "tensor", "lib": "torch", "dtype": "float128", "shape": [32, 32]}, "dtype"),
        ({"kind": "tensor", "lib": "torch", "dtype": "object", "shape": [32, 32]}, "dtype"),
        ({"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [2**62]}, "shape"),
        ({"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [2**61]}, "absurd"),
        ({"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [2**40, 2**40]}, "absurd"),
        ({"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": [-32, -32]}, "shape"),
        ({"kind": "tensor", "lib": "torch", "dtype": "float32", "shape": "32x32"}, "shape"),
        ({"kind": "tensor", "lib": "pickle", "dtype": "float32", "shape": [32, 32]}, "library"),
        ({"kind": "tensor", "lib": "torch", "dtype": "float32"}, "shape"),
        ({"kind": "module", "value": "os.system"}, "kind"),
        ({"kind": "int", "value": "0x10"}, "int"),
        ({"kind": "float", "value": "nan"}, "float"),
        ({"kind": "bytes", "value": "###"}, "bytes"),
        ([], "not an object"),
    ],
)
def test_bad_leaf_records(ck: Ckpt, record: Any, match: str) -> None:
    ck.edit_manifest(lambda body: body["leaves"].update(w=record))
    msg = rejects(ck, ManifestError, match)
    assert MANIFEST in msg and "'w'" in msg


def _huge_u8(ck: Ckpt) -> None:
    ck.edit_manifest(
        lambda body: body["leaves"].update(
            u8={"kind": "tensor", "lib": "torch", "dtype": "uint8", "shape": [2**61]}
        )
    )


def test_huge_shape_without_the_chunks_to_back_it(ck: Ckpt) -> None:
    """A forged shape under the 2**62-byte cap but far beyond the stored chunks."""
    _huge_u8(ck)
    with pytest.raises(CheckpointError):
        treeckpt.restore(str(ck.path))


def test_huge_shape_error_names_the_tensor(ck: Ckpt) -> None:
    _huge_u8(ck)
    with pytest.raises(CheckpointError, match="u8"):
        treeckpt.restore(str(ck.path))


def test_huge_shape_with_a_matching_template_is_refused_cleanly(ck: Ckpt) -> None:
    """With a template, shapes come from the template: a forged shape is a mismatch."""
    ck.edit_manifest(
        lambda body: body["leaves"].update(
            u8={"kind": "tensor", "lib": "torch", "dtype": "uint8", "shape": [2**40]}
        )
    )
    with pytest.raises(LoadMismatchError, match="u8"):
        treeckpt.load(template_of(TREE), str(ck.path))


def test_pickle_payload_never_runs(ck: Ckpt, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    payload = base64.b64encode(pickle.dumps(Evil())).decode()
    assert b"open" in pickle.dumps(Evil())
    ck.edit_manifest(lambda body: body["leaves"].update(name={"kind": "pickle", "data": payload}))
    for call in (
        lambda: treeckpt.restore(str(ck.path)),
        lambda: treeckpt.load(template_of(TREE), str(ck.path)),
        lambda: treeckpt.load(template_of(TREE), str(ck.path), strict=False),
    ):
        with pytest.raises(UnsupportedLeafError, match=r"'name'.*pickle"):
            call()
        assert not marker.exists()
    info = treeckpt.metadata(str(ck.path))
    assert "pickled" in str(info.values["name"])
    # a template without the key never even looks at it
    t = template_of(TREE)
    del t["name"]
    out = treeckpt.load(t, str(ck.path), strict=False)
    assert same(TREE["w"], out["w"])
    assert not marker.exists()


def test_pickle_payload_cannot_hide_in_the_structure(ck: Ckpt) -> None:
    def edit(body: dict[str, Any]) -> None:
        body["tree"] = {
            "type": "ddict",
            "factory": "os.system",
            "keys": body["tree"]["keys"],
            "children": body["tree"]["children"],
        }

    ck.edit_manifest(edit)
    with pytest.raises(ManifestError, match="factory"):
        treeckpt.restore(str(ck.path))


LEAF_X = {"leaf": "x"}


@pytest.mark.parametrize(
    "node",
    [
        {"type": "namedtuple", "name": "__class__", "fields": ["a"], "children": [LEAF_X]},
        {"type": "namedtuple", "name": "P", "fields": ["__init__"], "children": [LEAF_X]},
        {"type": "namedtuple", "name": "P", "fields": ["class"], "children": [LEAF_X]},
        {"type": "dataclass", "name": "os.path", "fields": ["a"], "children": [LEAF_X]},
        {
            "type": "namedtuple",
            "name": "P",
            "fields": ["a", "a"],
            "children": [LEAF_X, {"type": "list", "children": []}],
        },
        {"type": "namedtuple", "name": "P", "fields": "a", "children": [LEAF_X]},
        {"type": "module", "children": [LEAF_X]},
        {"type": "dict", "keys": [{"int": "1e9"}], "children": [LEAF_X]},
        {"type": "dict", "keys": [{"int": "1", "x": 2}], "children": [LEAF_X]},
        {"type": "dict", "keys": [3], "children": [LEAF_X]},
        {"type": "dict", "keys": [], "children": [LEAF_X]},
        {"type": "deque", "maxlen": -1, "children": [LEAF_X]},
        {"type": "list", "children": LEAF_X},
        {"type": "list", "children": [LEAF_X, 3]},
        {"leaf": ["x"]},
        "x",
    ],
)
def test_bad_structure_nodes(tmp_path: Path, node: Any) -> None:
    path = tmp_path / "ckpt"
    treeckpt.save({"x": 1, "y": 2}, str(path))
    ck = Ckpt(path)
    ck.edit_manifest(lambda body: body["tree"]["children"].__setitem__(0, node))
    with pytest.raises(ManifestError, match=MANIFEST):
        treeckpt.restore(str(path))


def test_structure_and_leaves_disagree(ck: Ckpt) -> None:
    ck.edit_manifest(lambda body: body["leaves"].update(ghost={"kind": "none"}))
    rejects(ck, ManifestError, "different leaves")
    ck.edit_manifest(lambda body: body["leaves"].pop("ghost"))
    ck.edit_manifest(lambda body: body["tree"]["children"].append({"leaf": "w"}))
    rejects(ck, ManifestError, "different leaves")


def test_structure_too_deep(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    treeckpt.save({"x": 1}, str(path))
    ck = Ckpt(path)

    def edit(body: dict[str, Any]) -> None:
        node: dict[str, Any] = {"leaf": "x"}
        for _ in range(400):
            node = {"type": "list", "children": [node]}
        body["tree"] = node

    ck.edit_manifest(edit)
    with pytest.raises(ManifestError, match="deeper"):
        treeckpt.restore(str(path))


# ------------------------------------------------------------------ envelope


def test_newer_format_version(ck: Ckpt) -> None:
    ck.write_manifest(ck.manifest(), version=999)
    msg = rejects(ck, ManifestError, "newer")
    assert "999" in msg and "upgrade" in msg
    ck2 = Ckpt(ck.path)
    ck2.write_manifest(ck2.manifest(), version=1)
    ck2.write_index(ck2.index(), version=2)
    rejects(ck2, ManifestError, "newer")


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, None, True])
def test_bad_format_version(ck: Ckpt, version: Any) -> None:
    doc = json.loads(ck.read(MANIFEST))
    doc["format_version"] = version
    ck.write(MANIFEST, json.dumps(doc).encode())
    rejects(ck, ManifestError, "version")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"null",
        b"[]",
        b'"treeckpt"',
        b"\xff\xfe{}",
        b'{"magic": "treeckpt"}',
        b'{"magic": "torch", "format_version": 1, "checksum": "", "body": {}}',
        b'{"magic": "treeckpt", "format_version": 1, "body": []}',
        b'{"magic": "treeckpt", "format_version": 1, "body": {"x": NaN}}',
        b'{"magic": "treeckpt", "format_version": 1, "body": {"x": Infinity}}',
        b'{"magic": "treeckpt", "format_version": 1, "checksum": "xxh3-64:0000000000000000", "body": {}}',
    ],
)
def test_malformed_manifest_documents(ck: Ckpt, data: bytes) -> None:
    ck.write(MANIFEST, data)
    rejects(ck, ManifestError, "manifest.json")


def test_wrong_magic_for_each_document(ck: Ckpt) -> None:
    ck.write(MANIFEST, seal("treeckpt-index", ck.manifest()))
    rejects(ck, ManifestError, "magic")
    ck.write(MANIFEST, seal("treeckpt", ck.manifest()))
    ck.write_index(ck.index(), magic="treeckpt")
    rejects(ck, ManifestError, "magic")


@pytest.mark.parametrize("where", ["manifest", "index"])
def test_deep_json_nesting(ck: Ckpt, where: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    doc = (
        b'{"magic":"treeckpt","format_version":1,"checksum":"xxh3-64:0000000000000000","body":'
        + deep
        + b"}"
    )
    if where == "manifest":
        ck.write(MANIFEST, doc)
    else:
        ck.write_index(ck.index())
        name = ck.index_name()
        ck.write(name, doc)
        ck.edit_manifest(lambda body: body["indexes"][0].update(size=len(doc)))
    limit = sys.getrecursionlimit()
    with pytest.raises(ManifestError):
        treeckpt.restore(str(ck.path))
    assert sys.getrecursionlimit() == limit


def test_deep_json_inside_a_sealed_body(ck: Ckpt) -> None:
    """Depth the JSON parser accepts but the re-serialisation of the body may not."""
    deep: Any = 0
    for _ in range(900):
        deep = [deep]
    body = ck.manifest()
    body["user_metadata"] = {"deep": deep}
    text = json.dumps(body, separators=(",", ":"))
    from treeckpt.store.checksum import checksum

    data = (
        '{"magic":"treeckpt","format_version":1,'
        f'"checksum":"{checksum(text.encode())}","body":{text}}}'
    ).encode()
    ck.write(MANIFEST, data)
    try:
        got = treeckpt.restore(str(ck.path))
    except ManifestError:
        return
    assert same(TREE, got)


def test_manifest_over_the_size_cap(ck: Ckpt) -> None:
    from treeckpt.store.manifest import MAX_MANIFEST_BYTES

    with open(ck.path / MANIFEST, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ManifestError, match="cap"):
        treeckpt.restore(str(ck.path))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b.update(world_size=0), "world_size"),
        (lambda b: b.update(world_size=2**40), "world_size"),
        (lambda b: b.update(world_size="1"), "world_size"),
        (lambda b: b.update(indexes={}), "indexes"),
        (lambda b: b["indexes"].append(dict(b["indexes"][0])), "indexes"),
        (lambda b: b["indexes"][0].update(rank=1), "rank"),
        (lambda b: b["indexes"][0].update(rank=-1), "rank"),
        (lambda b: b["indexes"][0].update(size=-1), "size"),
        (lambda b: b["indexes"][0].update(size=2**40), "size"),
        (lambda b: b["indexes"][0].update(size=10), "10"),
        (lambda b: b["indexes"][0].update(checksum="md5:abc"), "checksum"),
        (lambda b: b["indexes"][0].update(checksum="xxh3-64:0000000000000000"), "checksum"),
        (lambda b: b["indexes"][0].pop("file"), "file"),
        (lambda b: b.update(indexes=[]), "cover"),
        (lambda b: b.update(user_metadata=[1]), "user_metadata"),
        (lambda b: b.pop("leaves"), "leaves"),
        (lambda b: b.pop("tree"), "tree"),
    ],
)
def test_bad_manifest_fields(ck: Ckpt, edit: Any, match: str) -> None:
    ck.edit_manifest(edit)
    rejects(ck, CheckpointError, match)


# ------------------------------------------------------------------ chunks

# chunk layout: [fqn, offsets, sizes, file_no, offset, length, codec, raw_length, checksum]
FQN, OFFS, SIZES, FILE, OFF, LEN, CODEC, RAW, CHK = range(9)


def _first_chunk(body: dict[str, Any], fqn: str, codec: str | None = None) -> list[Any]:
    return next(c for c in body["chunks"] if c[FQN] == fqn and (codec is None or c[CODEC] == codec))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (OFF, -1, "offset"),
        (OFF, 2**62, "offset"),
        (OFF, 2**70, "offset"),
        (OFF, 1.5, "offset"),
        (OFF, "0", "offset"),
        (OFF, 10**6, "beyond the end"),
        (LEN, -5, "length"),
        (LEN, 2**62 - 1, "beyond the end"),
        (LEN, 0, "raw chunk of 0 bytes"),
        (RAW, 2**40, "raw_length"),
        (RAW, -1, "raw_length"),
        (RAW, 4095, "does not match its box"),
        (CODEC, "lz4", "unknown codec"),
        (CODEC, "pickle", "unknown codec"),
        (CODEC, None, "unknown codec"),
        (FILE, 5, "file"),
        (FILE, -1, "file"),
        (FILE, True, "file"),
        (CHK, "crc32:00", "checksum"),
        (FQN, "name", "not a tensor"),
        (FQN, "nope", "not a tensor"),
        (FQN, ["w"], "not a tensor"),
        (OFFS, [0], "dimensions"),
        (OFFS, [0, -1], "offsets"),
        (OFFS, [0, 1], "outside the tensor"),
        (SIZES, [0, 32], "empty"),
        (SIZES, [33, 32], "outside the tensor"),
        (SIZES, [2**61, 32], "outside the tensor"),
    ],
)
def test_bad_chunk_fields(ck: Ckpt, field: int, value: Any, match: str) -> None:
    def edit(body: dict[str, Any]) -> None:
        _first_chunk(body, "w", "raw")[field] = value

    ck.edit_index(edit)
    msg = rejects(ck, ManifestError, match)
    assert "index-r0.json" in msg
    if field != FQN:
        assert "(w)" in msg


def test_chunk_row_malformed(ck: Ckpt) -> None:
    ck.edit_index(lambda body: body["chunks"][0].append(1))
    rejects(ck, ManifestError, "malformed")
    ck.edit_index(lambda body: body.update(chunks={}))
    rejects(ck, ManifestError, "chunks")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b.update(save_id="0" * 16), "another save"),
        (lambda b: b.update(rank=1), "another save or rank"),
        (lambda b: b["files"][0].__setitem__(1, -1), "size"),
        (lambda b: b["files"][0].__setitem__(1, 2**62), "size"),
        (lambda b: b["files"][0].append(0), "malformed"),
        (lambda b: b.update(files=None), "files"),
    ],
)
def test_bad_index_fields(ck: Ckpt, edit: Any, match: str) -> None:
    ck.edit_index(edit)
    rejects(ck, ManifestError, match)


def test_data_file_size_must_match_the_index(ck: Ckpt) -> None:
    def grow(body: dict[str, Any]) -> None:
        body["files"][0][1] += 1

    ck.edit_index(grow)
    msg = rejects(ck, CorruptChunkError, "the index recorded")
    assert "r0-0.bin" in msg


def test_duplicate_and_overlapping_chunks(ck: Ckpt) -> None:
    ck.edit_index(lambda body: body["chunks"].append(list(_first_chunk(body, "w"))))
    rejects(ck, PlanError, "w")


def test_chunk_missing_leaves_a_gap(ck: Ckpt) -> None:
    def drop(body: dict[str, Any]) -> None:
        body["chunks"].remove(_first_chunk(body, "w"))

    ck.edit_index(drop)
    rejects(ck, PlanError, "w")


def test_chunk_pointing_at_another_chunks_bytes(ck: Ckpt) -> None:
    """A forger who rewrites the index can alias one chunk's bytes (and checksum) for another
    of the same size: the values are the forger's to choose, which no checksum can prevent.
    What must hold: no crash, no read outside the file, a tensor of the recorded shape."""

    def alias(body: dict[str, Any]) -> None:
        w = [c for c in body["chunks"] if c[FQN] == "w"]
        a, b = w[0], w[1]
        b[FILE], b[OFF], b[LEN], b[CODEC], b[RAW], b[CHK] = (
            a[FILE],
            a[OFF],
            a[LEN],
            a[CODEC],
            a[RAW],
            a[CHK],
        )

    ck.edit_index(alias)
    out = treeckpt.restore(str(ck.path))
    assert out["w"].shape == TREE["w"].shape


def test_planes_chunk_relabelled_zstd(ck: Ckpt) -> None:
    def relabel(body: dict[str, Any]) -> None:
        c = _first_chunk(body, "z", "planes")
        c[CODEC] = "zstd"
        del c[9:]

    ck.edit_index(relabel)
    # the first segment is a whole zstd frame, of one plane of one block: it never
    # decodes to the chunk's raw length, so the chunk is refused, not misread
    msg = rejects(ck, CorruptChunkError, "declares")
    assert "tensor 'z'" in msg


def test_planes_chunk_relabelled_raw(ck: Ckpt) -> None:
    ck.edit_index(lambda body: _first_chunk(body, "z", "planes").__setitem__(CODEC, "raw"))
    rejects(ck, ManifestError, "(raw chunk|block checksums)")


def test_compressed_chunk_declaring_an_impossible_ratio(ck: Ckpt) -> None:
    def edit(body: dict[str, Any]) -> None:
        c = _first_chunk(body, "z", "planes")
        c[RAW] = c[LEN] * 65536 + (1 << 20) + 2

    ck.edit_index(edit)
    rejects(ck, ManifestError)


def _planes_edit(field: int, value: Any) -> Any:
    def edit(body: dict[str, Any]) -> None:
        _first_chunk(body, "w2", "planes")[9][field] = value

    return edit


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (0, 0, "block_bytes"),
        (0, 3, "block checksums do not cover|malformed planes"),
        (0, 1 << 40, "do not cover"),
        (1, [], "block checksums do not cover"),
        (1, ["crc32:00"], "bad block checksum|do not cover"),
        (2, "zzz", "one 'r' or 'z' per byte"),
        (2, "rrrr", "malformed planes chunk"),
        (2, "rrqz", "one 'r' or 'z' per byte"),
        (2, 5, "one 'r' or 'z' per byte"),
        (3, [], "segments do not cover"),
        (3, [0], "segment"),
        (3, [-1], "segment"),
        (3, ["7"], "segment"),
    ],
)
def test_bad_planes_fields(ck: Ckpt, field: int, value: Any, match: str) -> None:
    ck.edit_index(_planes_edit(field, value))
    msg = rejects(ck, ManifestError, match)
    assert "(w2)" in msg


def test_planes_segment_lengths_must_add_up(ck: Ckpt) -> None:
    def edit(body: dict[str, Any]) -> None:
        segs = _first_chunk(body, "w2", "planes")[9][3]
        segs[0] += 1  # the stored length no longer matches: refused before any read

    ck.edit_index(edit)
    rejects(ck, ManifestError, "do not add up")

    def swap(body: dict[str, Any]) -> None:
        segs = _first_chunk(body, "w2", "planes")[9][3]
        segs[0] -= 1
        segs[0], segs[-1] = segs[-1] + 1, segs[0] - 1  # same total, wrong split

    ck.edit_index(swap)
    msg = rejects(ck, CorruptChunkError)
    assert "'w2'" in msg


def test_planes_block_damage_names_the_block(ck: Ckpt) -> None:
    body = ck.index()
    c = _first_chunk(body, "w2", "planes")
    data = ck.path / body["files"][c[FILE]][0]
    raw = bytearray(data.read_bytes())
    raw[c[OFF] + c[LEN] - 1] ^= 0x55  # inside the last block
    data.write_bytes(bytes(raw))
    msg = rejects(ck, CorruptChunkError, "checksum mismatch")
    assert "'w2'" in msg


def test_unknown_tensor_library_in_restore(ck: Ckpt) -> None:
    ck.edit_manifest(lambda body: body["leaves"]["w"].update(lib="jax"))
    rejects(ck, ManifestError, "library")


def test_numpy_scalar_with_a_shape(ck: Ckpt) -> None:
    ck.edit_manifest(lambda body: body["leaves"]["s"].update(lib="numpy-scalar", shape=[2]))
    rejects(ck, ManifestError, "scalar")


@pytest.mark.parametrize("lib", ["numpy", "numpy-scalar"])
def test_numpy_leaf_with_a_dtype_numpy_lacks(tmp_path: Path, lib: str) -> None:
    """bfloat16 has no numpy dtype: a numpy leaf of it is refused, not an AssertionError."""
    path = tmp_path / "ckpt"
    treeckpt.save({"z": torch.zeros((), dtype=torch.bfloat16)}, str(path))
    ck = Ckpt(path)
    ck.edit_manifest(lambda body: body["leaves"]["z"].update(lib=lib))
    with pytest.raises(ManifestError, match="numpy"):
        treeckpt.restore(str(path))


def test_metadata_on_hostile_manifest_is_safe(ck: Ckpt) -> None:
    ck.edit_index(lambda body: _first_chunk(body, "w").__setitem__(CODEC, "lz4"))
    with pytest.raises(ManifestError):
        treeckpt.metadata(str(ck.path))


def test_dtype_mismatch_between_index_and_data_is_harmless(tmp_path: Path) -> None:
    """Changing a leaf's dtype to one of the same size: checksums still pass, so the bytes are
    reinterpreted. That is the forger's choice of values; but raw_length binds the item size."""
    path = tmp_path / "ckpt"
    treeckpt.save({"a": torch.arange(8, dtype=torch.int32)}, str(path))
    ck = Ckpt(path)
    ck.edit_manifest(lambda body: body["leaves"]["a"].update(dtype="int64"))
    with pytest.raises(ManifestError, match="raw_length"):
        treeckpt.restore(str(path))

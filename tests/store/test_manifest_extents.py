"""The root manifest's writers map (``extents``): round trip and validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.forge import seal
from tests.dist_utils import run_ranks
from treeckpt.core.box import Box
from treeckpt.core.extents import extents_of_plan
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import IndexRef, Manifest
from treeckpt.core.plan import plan_load, plan_save
from treeckpt.core.specs import ShardSpec
from treeckpt.errors import ManifestError
from treeckpt.store import layout
from treeckpt.store.backends import open_backend
from treeckpt.store.manifest import decode_manifest, encode_manifest
from treeckpt.store.reader import StoredChunks, read_manifest

SAVE_ID = "0123456789abcdef"


def _manifest() -> Manifest:
    specs = []
    for r in range(3):
        specs.append(
            [
                ShardSpec(
                    fqn="a",
                    dtype="float32",
                    shape=(6, 4),
                    boxes=(Box(offsets=(2 * r, 0), sizes=(2, 4)),),
                ),
                ShardSpec(
                    fqn="b",
                    dtype="int64",
                    shape=(3, 5),
                    boxes=(Box(offsets=(0, 0), sizes=(3, 5)),),
                ),
                ShardSpec(fqn="s", dtype="float32", shape=(), boxes=(Box(offsets=(), sizes=()),)),
            ]
        )
    ext = extents_of_plan(plan_save(specs, chunk_bytes=16))
    records: dict[str, Any] = {
        "a": TensorLeaf(lib="torch", dtype="float32", shape=(6, 4)),
        "b": TensorLeaf(lib="torch", dtype="int64", shape=(3, 5)),
        "s": TensorLeaf(lib="torch", dtype="float32", shape=()),
    }
    return Manifest(
        format_version=1,
        save_id=SAVE_ID,
        world_size=3,
        structure={
            "type": "dict",
            "keys": ["a", "b", "s"],
            "children": [{"leaf": "a"}, {"leaf": "b"}, {"leaf": "s"}],
        },
        records=records,
        indexes=tuple(
            IndexRef(
                rank=r,
                file=layout.binary_index_file(SAVE_ID, r),
                size=10,
                checksum="xxh3-64:0000000000000000",
            )
            for r in range(3)
        ),
        user_metadata={},
        extents=ext,
    )


def test_round_trip() -> None:
    m = _manifest()
    got = decode_manifest(encode_manifest(m))
    assert got == m
    assert got.extents is not None and got.extents.ranks == frozenset({0, 1, 2})


def test_absent_map_decodes_to_none() -> None:
    m = _manifest()
    body = json.loads(encode_manifest(m))["body"]
    del body["extents"]
    assert decode_manifest(seal("treeckpt", body)).extents is None


def test_layout_numbers_and_whole_dims_are_as_written() -> None:
    body = json.loads(encode_manifest(_manifest()))["body"]
    ext = body["extents"]
    a = ext["layouts"][ext["tensors"]["a"]]
    assert a == [[0, 1, 2], [[[0, 2, 4], [2, 2, 2]], None]]
    s = ext["layouts"][ext["tensors"]["s"]]
    assert len(s[0]) == 1 and s[1] == []  # a replica: written once, by one rank


def _edit(fn: Any) -> bytes:
    body = json.loads(encode_manifest(_manifest()))["body"]
    fn(body["extents"])
    return seal("treeckpt", body)


def _lay(ext: dict[str, Any], fqn: str) -> list[Any]:
    out: list[Any] = ext["layouts"][ext["tensors"][fqn]]
    return out


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda e: e.clear(), "layouts and tensors"),
        (lambda e: e.update(tensors=[]), "tensors must be an object"),
        (lambda e: e["tensors"].update(zz=0), "not a tensor"),
        (lambda e: e["tensors"].update(a=99), "layout of 'a'"),
        (lambda e: e["tensors"].update(a=True), "layout of 'a'"),
        (lambda e: e["tensors"].update(s=e["tensors"]["a"]), "does not fit its shape"),
        (lambda e: _lay(e, "a")[0].__setitem__(0, 7), "no chunk index"),
        (lambda e: _lay(e, "a")[0].__setitem__(0, -1), "ranks"),
        (lambda e: _lay(e, "a")[0].__setitem__(0, True), "ranks"),
        (lambda e: _lay(e, "a")[0].pop(), "offsets"),
        (lambda e: _lay(e, "a")[1][0][0].__setitem__(2, 5), "outside its shape"),
        (lambda e: _lay(e, "a")[1][0][1].__setitem__(0, 0), "sizes"),
        (lambda e: _lay(e, "a")[1][0][1].__setitem__(0, 2**70), "out of range"),
        (lambda e: _lay(e, "a")[1][0][1].__setitem__(0, 1.5), "integers"),
        (lambda e: _lay(e, "a")[1].__setitem__(0, [1]), "dimension 0"),
        (lambda e: _lay(e, "a").pop(), "malformed"),
        (lambda e: e["layouts"].append("x"), "malformed"),
    ],
)
def test_forged_maps_are_refused(edit: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as info:
        decode_manifest(_edit(edit))
    assert "extents" in str(info.value)


def _save_two(rank: int, world: int, path: str) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import treeckpt

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(12.0).reshape(6, 2), mesh, [Shard(0)])
    treeckpt.save({"w": w}, path)


@pytest.mark.distributed
def test_a_wrong_map_fails_the_load_and_never_returns_wrong_values(tmp_path: Path) -> None:
    """The map only decides what is read: one pointing at the wrong writer is a PlanError."""
    import torch

    import treeckpt

    path = tmp_path / "ck"
    run_ranks(2, _save_two, tmp_path, str(path))
    body = json.loads((path / "manifest.json").read_bytes())["body"]
    lay = body["extents"]["layouts"][body["extents"]["tensors"]["w"]]
    assert lay[0] == [0, 1]
    lay[0] = [1, 0]  # each half attributed to the other writer
    (path / "manifest.json").write_bytes(seal("treeckpt", body))
    b = open_backend(str(path))
    stored = StoredChunks(b, read_manifest(b))
    spec = ShardSpec(
        fqn="w", dtype="float32", shape=(6, 2), boxes=(Box(offsets=(0, 0), sizes=(2, 2)),)
    )
    view = stored.for_requests([spec])
    assert stored.opened == [layout.binary_index_file(read_manifest(b).save_id, 1)]
    with pytest.raises(treeckpt.PlanError, match="cover"):
        plan_load(view, [spec])
    # whole reads take every writer the map names: the values are right
    assert torch.equal(treeckpt.restore(str(path))["w"], torch.arange(12.0).reshape(6, 2))
    got = treeckpt.read_tensor(str(path), "w", (slice(0, 2),))
    assert torch.equal(got, torch.arange(4.0).reshape(2, 2))

"""A loading rank reads only the chunk indexes its boxes need (real ranks, real files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import treeckpt
from tests.adversarial.forge import seal
from tests.dist_utils import run_ranks
from treeckpt.store import reader
from treeckpt.store.backends import open_backend

pytestmark = pytest.mark.distributed


def _globals() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "w1": torch.randn(8, 5, generator=g),
        "w2": torch.randn(8, 3, generator=g).bfloat16(),
        "w3": torch.randint(0, 1000, (12,), generator=g),
    }


def _save(rank: int, world: int, path: str) -> bool:
    mesh = init_device_mesh("cpu", (world,))
    tree = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in _globals().items()}
    treeckpt.save({"t": tree, "step": 5}, path)
    return True


def _load(rank: int, world: int, path: str) -> list[str]:
    """Load Shard(0) on ``world`` ranks; return the index files this rank opened."""
    opened: list[str] = []
    real = reader.read_index

    def counting(backend: Any, manifest: Any, ref: Any) -> Any:
        opened.append(ref.file.rsplit("/", 1)[1])
        return real(backend, manifest, ref)

    reader.read_index = counting  # type: ignore[assignment]
    try:
        mesh = init_device_mesh("cpu", (world,))
        target = {
            k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)])
            for k, v in _globals().items()
        }
        out = treeckpt.load({"t": target, "step": 0}, path)
    finally:
        reader.read_index = real  # type: ignore[assignment]
    assert out["step"] == 5
    for k, v in _globals().items():
        full = out["t"][k].full_tensor()
        assert torch.equal(full.view(torch.uint8), v.view(torch.uint8)), k
    return sorted(opened)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("four")
    path = str(tmp / "ck")
    assert run_ranks(4, _save, tmp, path) == [True] * 4
    return path


def test_4_to_2_ranks_each_rank_opens_only_its_writers(four: str, tmp_path: Path) -> None:
    # rows 0-3 were written by ranks 0 and 1, rows 4-7 by ranks 2 and 3 (w3: 3 rows each)
    got = run_ranks(2, _load, tmp_path, four)
    assert got == [["index-r0.idx", "index-r1.idx"], ["index-r2.idx", "index-r3.idx"]]


def test_4_to_3_ranks(four: str, tmp_path: Path) -> None:
    # 8 rows: written 0-1, 2-3, 4-5, 6-7 and read 0-2, 3-5, 6-7;
    # 12 rows: written 0-2, 3-5, 6-8, 9-11 and read 0-3, 4-7, 8-11
    got = run_ranks(3, _load, tmp_path, four)
    assert got == [
        ["index-r0.idx", "index-r1.idx"],
        ["index-r1.idx", "index-r2.idx"],
        ["index-r2.idx", "index-r3.idx"],
    ]


def test_without_the_map_rank_0_reads_every_index_once(four: str, tmp_path: Path) -> None:
    """A checkpoint whose manifest has no map (written before it existed) still loads."""
    ck = tmp_path / "old"
    import shutil

    shutil.copytree(four, ck)
    body = json.loads((ck / "manifest.json").read_bytes())["body"]
    assert "extents" in body
    del body["extents"]
    (ck / "manifest.json").write_bytes(seal("treeckpt", body))
    got = run_ranks(2, _load, tmp_path, str(ck))
    every = [f"index-r{r}.idx" for r in range(4)]
    assert got == [every, []]


def test_one_process_reads_only_what_it_reads(four: str) -> None:
    b = open_backend(four)
    m = reader.read_manifest(b)
    stored = reader.StoredChunks(b, m)
    part = treeckpt.read_tensor(four, "t.w1", (slice(6, 8),))
    assert torch.equal(part, _globals()["w1"][6:8])
    from treeckpt.core.box import Box
    from treeckpt.core.specs import ShardSpec

    spec = ShardSpec(
        fqn="t.w1", dtype="float32", shape=(8, 5), boxes=(Box(offsets=(6, 0), sizes=(2, 5)),)
    )
    view = stored.for_requests([spec])
    assert stored.opened == [f"data-{m.save_id}/index-r3.idx"]
    assert [c.box for c in view["t.w1"].chunks] == [Box(offsets=(6, 0), sizes=(2, 5))]
    # the whole tensor: every writer of it
    assert len(stored["t.w1"].chunks) == 4
    assert len(stored.opened) == 4

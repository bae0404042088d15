"""Many ranks for real: sharded saves, resharding loads, DDP, FSDP2, ShardedTensor.

Every test runs real processes on gloo. Loaded values are compared bit-exactly
with the full tensors they came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import treeckpt
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.distributed


def _globals() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "a": torch.randn(7, 5, generator=g),  # uneven over 2, 3 and 4 ranks
        "b": torch.randn(4, 9, generator=g).bfloat16(),
        "c": torch.randint(0, 100, (3,), generator=g),  # fewer rows than 4 ranks: empty shards
        "d": torch.randn(6, 6, generator=g).double(),
    }


def _dtensors(world: int, placements: dict[str, Any]) -> dict[str, DTensor]:
    mesh = init_device_mesh("cpu", (world,))
    return {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in _globals().items()}


SAVE_PLACEMENTS = {"a": Shard(0), "b": Shard(1), "c": Shard(0), "d": Replicate()}
LOAD_PLACEMENTS = {"a": Shard(1), "b": Replicate(), "c": Shard(0), "d": Shard(0)}


def _save_dtensors(rank: int, world: int, path: str) -> list[int]:
    tree = {"t": _dtensors(world, SAVE_PLACEMENTS), "step": 3}
    res = treeckpt.save(tree, path)
    return list(res.plan.bytes_by_rank) if res.plan else []


def _load_dtensors(rank: int, world: int, path: str) -> bool:
    target = {k: torch.zeros_like(v) for k, v in _globals().items()}
    mesh = init_device_mesh("cpu", (world,))
    tree = {
        "t": {k: distribute_tensor(v, mesh, [LOAD_PLACEMENTS[k]]) for k, v in target.items()},
        "step": 0,
    }
    out = treeckpt.load(tree, path)
    assert out["step"] == 3
    for k, v in _globals().items():
        local = out["t"][k].to_local()
        assert local.data_ptr() == tree["t"][k].to_local().data_ptr()  # in place
        full = out["t"][k].full_tensor()
        assert torch.equal(full.view(torch.uint8), v.view(torch.uint8)), k
    return True


@pytest.fixture(scope="module")
def dtensor_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("dt")
    path = str(tmp / "ckpt")
    loads = run_ranks(2, _save_dtensors, tmp, path)
    # The replicated tensor "d" is written once; bytes are balanced across ranks.
    total = sum(loads[0])
    expected = sum(v.numel() * v.element_size() for v in _globals().values())
    assert total == expected
    return path


def test_save_on_2_restores_in_one_process(dtensor_ckpt: str) -> None:
    back = treeckpt.restore(dtensor_ckpt)
    for k, v in _globals().items():
        assert torch.equal(back["t"][k].view(torch.uint8), v.view(torch.uint8))
    info = treeckpt.metadata(dtensor_ckpt)
    assert info.world_size == 2


def test_save_on_2_load_into_plain_tensors(dtensor_ckpt: str) -> None:
    tree = {"t": {k: torch.zeros_like(v) for k, v in _globals().items()}, "step": 0}
    out = treeckpt.load(tree, dtensor_ckpt)
    for k, v in _globals().items():
        assert torch.equal(out["t"][k].view(torch.uint8), v.view(torch.uint8))


@pytest.mark.parametrize("world", [3, 4])
def test_save_on_2_load_on_other_world_sizes(dtensor_ckpt: str, tmp_path: Path, world: int) -> None:
    assert run_ranks(world, _load_dtensors, tmp_path, dtensor_ckpt) == [True] * world


def _mesh_2d(rank: int, world: int, path: str, mode: str) -> bool:
    g = _globals()
    if mode == "save":
        mesh = init_device_mesh("cpu", (2, 2))
        tree = {
            k: distribute_tensor(v, mesh, [Shard(0), Shard(1)]) for k, v in g.items() if k != "c"
        }
        tree["c"] = distribute_tensor(g["c"], mesh, [Shard(0), Replicate()])
        treeckpt.save(tree, path)
        return True
    mesh = init_device_mesh("cpu", (world,))
    tree = {
        k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1 if v.dim() > 1 else 0)])
        for k, v in g.items()
    }
    out = treeckpt.load(tree, path)
    return all(
        torch.equal(out[k].full_tensor().view(torch.uint8), v.view(torch.uint8))
        for k, v in g.items()
    )


def test_2d_mesh_save_on_4_load_on_2(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    assert run_ranks(4, _mesh_2d, tmp_path, path, "save") == [True] * 4
    assert run_ranks(2, _mesh_2d, tmp_path, path, "load") == [True] * 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _fsdp_train_save(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    treeckpt.save({"model": model, "optim": opt, "step": 2}, path)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            full[f"optim.{pid}.{name}"] = v.full_tensor() if isinstance(v, DTensor) else v
    return full


def _fsdp_load(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tree = {"model": model, "optim": opt, "step": 0}
    out = treeckpt.load(tree, path)
    assert out is tree and tree["step"] == 2  # in place
    # The fresh optimizer's state is laid out like its parameters (no step taken).
    params = list(model.parameters())
    for pid, st in opt.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            v, p = st[name], params[pid]
            assert isinstance(v, DTensor) and v.placements == p.placements, name
            assert v.to_local().shape == p.to_local().shape, name
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            full[f"optim.{pid}.{name}"] = v.full_tensor() if isinstance(v, DTensor) else v
    return full


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp2_save_on_2_load_on_1_and_3(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_ranks(2, _fsdp_train_save, tmp_path, path)[0]
    # One process, plain model and a fresh optimizer (no state yet).
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    treeckpt.load({"model": model, "optim": opt, "step": 0}, path)
    plain = dict(model.state_dict())
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            plain[f"optim.{pid}.{name}"] = v
    _same(saved, plain)
    # Three ranks, FSDP2 again (uneven shards of 16 and 3 rows).
    for got in run_ranks(3, _fsdp_load, tmp_path, path):
        _same(saved, got)


def _ddp_save(rank: int, world: int, path: str) -> bool:
    model = torch.nn.parallel.DistributedDataParallel(_model())
    treeckpt.save({"model": model.module}, path)
    return True


def test_ddp_replicas_written_once(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    run_ranks(2, _ddp_save, tmp_path, path)
    info = treeckpt.metadata(path)
    model = _model()
    raw = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert info.raw_bytes == raw
    assert sum(t.raw_bytes for t in info.tensors.values()) == raw
    back = treeckpt.restore(path)
    _same(dict(model.state_dict()), dict(back["model"]))


def _sharded_tensor(rank: int, world: int, path: str, mode: str) -> bool:
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    st = sharded_tensor.zeros(spec, 10, 4)
    g = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    if mode == "save":
        for shard in st.local_shards():
            o = shard.metadata.shard_offsets[0]
            shard.tensor.copy_(g[o : o + shard.tensor.shape[0]])
        treeckpt.save({"st": st}, path)
        return True
    treeckpt.load({"st": st}, path)
    for shard in st.local_shards():
        o = shard.metadata.shard_offsets[0]
        assert torch.equal(shard.tensor, g[o : o + shard.tensor.shape[0]])
    return True


def test_sharded_tensor_save_on_2_load_on_3_and_1(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    run_ranks(2, _sharded_tensor, tmp_path, path, "save")
    run_ranks(3, _sharded_tensor, tmp_path, path, "load")
    back = treeckpt.restore(path)
    assert torch.equal(back["st"], torch.arange(40, dtype=torch.float32).reshape(10, 4))


def test_collectives_per_save_do_not_grow_with_tensors(tmp_path: Path) -> None:
    counts = run_ranks(2, _count_collectives, tmp_path, str(tmp_path / "c"))
    assert counts[0][0] == counts[0][1]


def _count_collectives(rank: int, world: int, path: str) -> tuple[int, int]:
    calls = 0
    names = ["gather_object", "broadcast_object_list", "scatter_object_list", "all_gather_object"]
    originals = {n: getattr(dist, n) for n in names}

    def wrap(fn: Any) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            return fn(*a, **k)

        return inner

    for n in names:
        setattr(dist, n, wrap(originals[n]))
    out = []
    for ntensors in (2, 50):
        calls = 0
        treeckpt.save({f"t{i}": torch.full((4,), float(i)) for i in range(ntensors)}, path)
        out.append(calls)
    return out[0], out[1]

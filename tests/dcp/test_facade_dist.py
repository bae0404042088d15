"""DCP's documented usage patterns on real gloo ranks, with ``import treeckpt.dcp as dcp``:
the FSDP2 example (save on 2 ranks, load on 3), resharding through a custom
planner, partial load, async_save then wait, no_dist, failures on one rank."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import treeckpt.dcp as dcp
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.distributed


class AppState(dcp.Stateful):
    """The wrapper of torch's "Getting Started with DCP" tutorial."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state_dict, optimizer_state_dict = get_state_dict(self.model, self.optimizer)
        return {"model": model_state_dict, "optim": optimizer_state_dict}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


def _fsdp_model(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"optim.{pid}.{name}"] = v.full_tensor() if isinstance(v, DTensor) else v
    return out


def _fsdp_save(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    model, opt = _fsdp_model(world)
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    dcp.save({"app": AppState(model, opt)}, checkpoint_id=path)
    return _full(model, opt)


def _fsdp_load(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    model, opt = _fsdp_model(world)
    dcp.load({"app": AppState(model, opt)}, checkpoint_id=path)
    return _full(model, opt)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp2_tutorial_save_on_2_load_on_3(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_ranks(2, _fsdp_save, tmp_path, path)
    _same(saved[0], saved[1])
    for got in run_ranks(3, _fsdp_load, tmp_path, path):
        _same(saved[0], got)


def _sharded(world: int, value: torch.Tensor, dim: int = 0) -> DTensor:
    mesh = init_device_mesh("cpu", (world,))
    return distribute_tensor(value.clone(), mesh, [Shard(dim)])


def _global(rows: int = 10) -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(rows * 6, dtype=torch.float32).reshape(rows, 6),
        "b": torch.arange(7.0),
    }


class Prefix(dcp.DefaultSavePlanner):
    def set_up_planner(
        self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner({"v2": state_dict}, storage_meta, is_coordinator)


class UnPrefix(dcp.DefaultLoadPlanner):
    def set_up_planner(
        self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner({"v2": state_dict}, metadata, is_coordinator)


def _planner_save(rank: int, world: int, path: str, planner: str) -> bool:
    g = _global()
    sd = {"w": _sharded(world, g["w"]), "b": g["b"].clone(), "step": 3}
    chosen = {"prefix": Prefix(), "lowest": dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True)}
    dcp.save(sd, checkpoint_id=path, planner=chosen[planner])
    return True


def _planner_load(rank: int, world: int, path: str, planner: str) -> bool:
    g = _global()
    sd = {"w": _sharded(world, torch.zeros_like(g["w"]), dim=1), "b": torch.zeros(7), "step": 0}
    dcp.load(sd, checkpoint_id=path, planner=UnPrefix() if planner == "prefix" else None)
    assert torch.equal(sd["w"].full_tensor(), g["w"])
    assert torch.equal(sd["b"], g["b"])
    assert sd["step"] == 3
    return True


@pytest.mark.parametrize("planner", ["prefix", "lowest"])
def test_planner_save_on_2_reshard_on_3(tmp_path: Path, planner: str) -> None:
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, _planner_save, tmp_path, path, planner) == [True, True]
    assert run_ranks(3, _planner_load, tmp_path, path, planner) == [True] * 3


def _partial(rank: int, world: int, path: str) -> bool:
    g = _global()
    dcp.save({"w": _sharded(world, g["w"])}, checkpoint_id=path)
    sd = {"w": _sharded(world, torch.zeros_like(g["w"])), "extra": torch.ones(2)}
    with pytest.raises(dcp.CheckpointException, match="extra"):
        dcp.load(sd, checkpoint_id=path)
    assert torch.equal(sd["w"].full_tensor(), torch.zeros_like(g["w"]))
    dcp.load(sd, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(sd["w"].full_tensor(), g["w"])
    assert torch.equal(sd["extra"], torch.ones(2))
    return True


def test_partial_load_on_2(tmp_path: Path) -> None:
    assert run_ranks(2, _partial, tmp_path, str(tmp_path / "ckpt")) == [True, True]


def _async(rank: int, world: int, path: str) -> bool:
    g = _global()
    w = _sharded(world, g["w"])
    fut = dcp.async_save({"w": w, "step": 1}, checkpoint_id=path)
    with torch.no_grad():
        w.to_local().fill_(-1.0)  # training goes on: the staged copy is saved
    md = fut.result(timeout=60)
    assert isinstance(md, dcp.Metadata)
    back = _sharded(world, torch.zeros_like(g["w"]))
    dcp.load({"w": back, "step": 0}, checkpoint_id=path)
    assert torch.equal(back.full_tensor(), g["w"])
    # Through the planner path (a planner option), then a load right away:
    # the load waits for the save in flight instead of mixing collectives.
    w2 = _sharded(world, g["w"] * 2)
    other = os.path.join(path, "..", "planner-path")
    fut2 = dcp.async_save(
        {"w": w2},
        checkpoint_id=other,
        planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True),
    )
    with torch.no_grad():
        w2.to_local().zero_()
    dcp.load({"w": back}, checkpoint_id=other)
    assert fut2.done()
    assert torch.equal(back.full_tensor(), g["w"] * 2)
    return True


def test_async_save_then_wait_on_2(tmp_path: Path) -> None:
    assert run_ranks(2, _async, tmp_path, str(tmp_path / "ckpt")) == [True, True]


def _no_dist_and_failure(rank: int, world: int, path: str) -> str:
    # no_dist: each rank saves on its own, no collectives.
    own = os.path.join(path, f"rank{rank}")
    dcp.save({"x": torch.full((2,), float(rank))}, checkpoint_id=own, no_dist=True)
    out = {"x": torch.zeros(2)}
    dcp.load(out, checkpoint_id=own, no_dist=True)
    assert torch.equal(out["x"], torch.full((2,), float(rank)))
    dist.barrier()

    class FailsOnRank1(dcp.DefaultSavePlanner):
        def create_local_plan(self) -> Any:
            if dist.get_rank() == 1:
                raise RuntimeError("disk full on this rank")
            return super().create_local_plan()

    try:
        dcp.save(
            {"x": torch.ones(2)}, checkpoint_id=os.path.join(path, "shared"), planner=FailsOnRank1()
        )
    except dcp.CheckpointException as exc:
        assert 1 in exc.failures
        return str(exc)
    return "no error"


def test_no_dist_and_a_failing_rank(tmp_path: Path) -> None:
    msgs = run_ranks(2, _no_dist_and_failure, tmp_path, str(tmp_path))
    for msg in msgs:
        assert "rank(s) 1" in msg and "disk full on this rank" in msg
    assert not (tmp_path / "shared" / "manifest.json").exists()


class DirWriter(dcp.StorageWriter):
    """A user's storage plugin writing one file per item into a shared directory."""

    def __init__(self, root: str) -> None:
        self.root = root

    def reset(self, checkpoint_id: Any = None) -> None:
        if checkpoint_id is not None:
            self.root = str(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs["rank"]  # DCP passes rank= to writers that take **kwargs
        os.makedirs(self.root, exist_ok=True)

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    def write_data(self, plan: Any, planner: Any) -> Any:
        from torch.futures import Future

        from treeckpt.dcp.storage import WriteResult

        results = []
        for i, item in enumerate(plan.items):
            data = planner.resolve_data(item)
            name = f"r{self.rank}-{i}.pt"
            torch.save(
                data.getvalue() if hasattr(data, "getvalue") else data.clone(),
                os.path.join(self.root, name),
            )
            results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=name))
        fut: Future[Any] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        torch.save(metadata, os.path.join(self.root, "plugin-metadata.pt"))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class DirReader(dcp.StorageReader):
    def __init__(self, root: str) -> None:
        self.root = root

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def read_metadata(self) -> Any:
        # The plugin's own choice of format; the test trusts its own files.
        return torch.load(os.path.join(self.root, "plugin-metadata.pt"), weights_only=False)

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool) -> None:
        self.names = metadata.storage_data

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    def read_data(self, plan: Any, planner: Any) -> Any:
        import io

        from torch.futures import Future

        from treeckpt.dcp.planner import LoadItemType

        for item in plan.items:
            stored = torch.load(
                os.path.join(self.root, self.names[item.storage_index]), weights_only=True
            )
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(stored))
                continue
            for d, (o, n) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                stored = stored.narrow(d, o, n)
            target = planner.resolve_tensor(item)
            target.copy_(stored)
            planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def _plugin_save(rank: int, world: int, path: str) -> bool:
    g = _global(rows=11)
    dcp.save(
        {"w": _sharded(world, g["w"]), "b": g["b"].clone(), "step": 9},
        storage_writer=DirWriter(path),
    )
    return True


def _plugin_load(rank: int, world: int, path: str) -> bool:
    g = _global(rows=11)
    sd = {"w": _sharded(world, torch.zeros_like(g["w"]), dim=1), "b": torch.zeros(7), "step": 0}
    dcp.load(sd, storage_reader=DirReader(path))
    assert torch.equal(sd["w"].full_tensor(), g["w"])
    assert torch.equal(sd["b"], g["b"]) and sd["step"] == 9
    return True


def test_storage_plugin_save_on_2_reshard_on_3(tmp_path: Path) -> None:
    path = str(tmp_path / "plugin")
    assert run_ranks(2, _plugin_save, tmp_path, path) == [True, True]
    # The replicated "b" was written once, and the value once (by the coordinator).
    files = sorted(os.listdir(path))
    assert len(files) == 1 + 2 + 1 + 1, files  # metadata, 2 shards of w, b, step
    assert run_ranks(3, _plugin_load, tmp_path, path) == [True] * 3


def _subgroup(rank: int, world: int, path: str) -> int:
    import treeckpt

    group = dist.new_group([0, 1])
    g = _global()
    if rank < 2:
        dcp.save({"w": g["w"], "step": 1}, checkpoint_id=path, process_group=group)
    dist.barrier()
    out = {"w": torch.zeros_like(g["w"]), "step": 0}
    dcp.load(out, checkpoint_id=path, no_dist=True)
    assert torch.equal(out["w"], g["w"]) and out["step"] == 1
    return treeckpt.metadata(path).world_size


def test_process_group_picks_the_saving_ranks(tmp_path: Path) -> None:
    # Ranks 0 and 1 save over their own group while rank 2 does not take part.
    assert run_ranks(3, _subgroup, tmp_path, str(tmp_path / "ckpt")) == [2, 2, 2]

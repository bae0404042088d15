"""``treeckpt.dcp.load_sharded_optimizer_state_dict`` on 2 gloo ranks with an FSDP2 model:
the optimizer state a checkpoint written by ``treeckpt.dcp`` holds comes back chunked
over the ranks, bit for bit, as torch's own function returns it from torch's format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as torch_dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import treeckpt.dcp as dcp
from tests.dist_utils import run_ranks
from treeckpt.dcp.optimizer import chunk_rows, nest

pytestmark = pytest.mark.distributed


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _locals(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Each leaf by dotted path; a ShardedTensor as its local shards' (offsets, tensor)."""
    out: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, ShardedTensor):
            out[name] = [(list(s.metadata.shard_offsets), s.tensor) for s in v.local_shards()]
        elif isinstance(v, (dict, list)):
            out.update(_locals(v, f"{name}."))
        else:
            out[name] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _load_optimizer_state(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    model, opt = _trained()
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, opt)
    ours_dir, torch_dir = tmp / "treeckpt", tmp / "dcp"
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ours_dir)
    torch_dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=torch_dir)

    ours = dcp.load_sharded_optimizer_state_dict(model_sd, "optim", dcp.FileSystemReader(ours_dir))
    theirs = torch_dcp.load_sharded_optimizer_state_dict(
        model_sd, "optim", torch_dcp.FileSystemReader(torch_dir)
    )
    from_dcp_format = dcp.load_sharded_optimizer_state_dict(
        model_sd, "optim", dcp.FileSystemReader(torch_dir)
    )
    mine, want, other = _locals(ours), _locals(theirs), _locals(from_dcp_format)
    assert sorted(mine) == sorted(want) == sorted(other)
    for name, value in want.items():
        assert _same(mine[name], value), name
        assert _same(other[name], value), name
    # FSDP2 shards dim 0 as torch.chunk does: each rank's chunk is its own DTensor shard.
    for fqn, state in optim_sd["state"].items():
        for key, value in state.items():
            if value.numel() > 1:
                [(_, local)] = mine[f"optim.state.{fqn}.{key}"]
                assert _same(local, value.to_local()), (fqn, key)
    return {"names": sorted(mine), "lr": mine["optim.param_groups.0.lr"]}


def test_load_sharded_optimizer_state_dict_on_two_ranks(tmp_path: Path) -> None:
    results = run_ranks(2, _load_optimizer_state, tmp_path, tmp_path, timeout=240)
    assert results[0] == results[1]
    assert "optim.state.0.weight.exp_avg_sq" in results[0]["names"]
    assert results[0]["lr"] == 0.1


def test_chunk_rows_cuts_as_torch_chunk() -> None:
    for rows in range(0, 12):
        for world in range(1, 6):
            want = [(0, 0)] if rows == 0 else []
            start = 0
            for piece in torch.arange(rows).chunk(world) if rows else ():
                want.append((start, len(piece)))
                start += len(piece)
            assert chunk_rows(rows, world) == want, (rows, world)


def test_nest_follows_the_paths_and_the_lists_the_reader_names() -> None:
    flat = {"o.state.0.m": 1, "o.groups.0.lr": 2, "o.groups.1.lr": 3}
    paths = {
        "o.state.0.m": ("o", "state", 0, "m"),
        "o.groups.0.lr": ("o", "groups", 0, "lr"),
        "o.groups.1.lr": ("o", "groups", 1, "lr"),
    }
    assert nest(flat, paths, {("o", "groups")}) == {
        "o": {"state": {0: {"m": 1}}, "groups": [{"lr": 2}, {"lr": 3}]}
    }
    # A reader that does not say: an integer key makes a list, as DCP's unflattening.
    assert nest(flat, paths, None) == {"o": {"state": [{"m": 1}], "groups": [{"lr": 2}, {"lr": 3}]}}


def _nested_refused(rank: int, world: int) -> str:
    import warnings

    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ShardedTensor is deprecated by torch
        md = ShardMetadata([0, 0], [2, 2], "rank:0/cpu")
        inner = init_from_local_shards([Shard(torch.zeros(2, 2), md)], 2, 2)
        outer = init_from_local_shards([Shard(inner, md)], 2, 2)
    try:
        dcp.load_sharded_optimizer_state_dict({"w": outer}, "optim", dcp.FileSystemReader("x"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_nested_sharded_tensor_is_refused_naming_the_key(tmp_path: Path) -> None:
    [msg] = run_ranks(1, _nested_refused, tmp_path)
    assert msg == (
        "OptionsError: 'w': a ShardedTensor nested in a ShardedTensor (FSDP over tensor "
        "parallelism) is not supported by treeckpt.dcp.load_sharded_optimizer_state_dict; "
        "save with DTensor state dicts (FSDP2, torch.distributed.checkpoint.state_dict)"
    )


def _fsdp1_resume(rank: int, world: int, tmp: Path) -> list[str]:
    """Lightning's FSDP (FSDP1) sharded checkpoint path: save the sharded state dicts, then
    restore a fresh model and optimizer with load_sharded_optimizer_state_dict."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    warnings.simplefilter("ignore", FutureWarning)  # FSDP1 and ShardedTensor, deprecated by torch

    def build(seed: int) -> tuple[Any, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        model = FSDP(net, device_id=torch.device("cpu"), use_orig_params=True)
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    model, opt = build(0)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state = {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=tmp / "ckpt")

    fresh, fresh_opt = build(1)
    with FSDP.state_dict_type(fresh, StateDictType.SHARDED_STATE_DICT):
        model_sd = {"model": fresh.state_dict()}
        dcp.load(model_sd, checkpoint_id=tmp / "ckpt")
        fresh.load_state_dict(model_sd["model"])
        loaded = dcp.load_sharded_optimizer_state_dict(
            model_sd["model"], "optim", dcp.FileSystemReader(tmp / "ckpt")
        )
        fresh_opt.load_state_dict(FSDP.optim_state_dict_to_load(fresh, fresh_opt, loaded["optim"]))
    differ = []
    want, got = opt.state_dict(), fresh_opt.state_dict()
    for pid, st in want["state"].items():
        for key, value in st.items():
            if not _same(got["state"][pid][key], value):
                differ.append(f"{pid}.{key}")
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        if not _same(a.detach(), b.detach()):
            differ.append("parameter")
    if got["param_groups"] != want["param_groups"] or not want["state"]:
        differ.append("param_groups or empty state")
    return differ


def test_fsdp1_resume_through_load_sharded_optimizer_state_dict(tmp_path: Path) -> None:
    assert run_ranks(2, _fsdp1_resume, tmp_path, tmp_path, timeout=240) == [[], []]

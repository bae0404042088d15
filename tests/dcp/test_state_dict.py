"""``treeckpt.dcp.state_dict`` composed with treeckpt's save and load on real gloo ranks.

Each test: train a step, ``get_state_dict`` -> ``treeckpt.save`` -> another world
size and a fresh model -> ``treeckpt.load`` into the fresh ``get_state_dict``
template -> ``set_state_dict``; then every parameter and optimizer state
tensor equals the saved one bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt.dcp.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

pytestmark = pytest.mark.distributed


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _wrap(model: torch.nn.Module, kind: str, world: int) -> torch.nn.Module:
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()


def _full(sd: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) state dict as a full plain tensor, keyed by path."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_full(v, key + "."))
        elif isinstance(v, DTensor):
            out[key] = v.full_tensor()
        elif isinstance(v, torch.Tensor):
            out[key] = v.clone()
    return out


def _save(rank: int, world: int, path: str, kind: str, flat: bool) -> dict[str, torch.Tensor]:
    model = _wrap(_model(), kind, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    opts = StateDictOptions(flatten_optimizer_state_dict=flat)
    msd, osd = get_state_dict(model, opt, options=opts)
    if not flat:  # optimizer state keyed by FQN, not by parameter id
        assert sorted(osd["state"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert osd["param_groups"][0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    treeckpt.save({"model": msd, "optim": osd, "step": 2}, path)
    return _full({"model": msd, "optim": osd})


def _load(rank: int, world: int, path: str, kind: str, flat: bool) -> dict[str, torch.Tensor]:
    model = _wrap(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)),
        kind,
        world,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5.0)
    opts = StateDictOptions(flatten_optimizer_state_dict=flat)
    msd, osd = get_state_dict(model, opt, options=opts)  # optimizer state initialised
    got = treeckpt.load({"model": msd, "optim": osd, "step": 0}, path)
    assert got["step"] == 2
    set_state_dict(
        model, opt, model_state_dict=got["model"], optim_state_dict=got["optim"], options=opts
    )
    assert opt.param_groups[0]["lr"] == 1e-2
    msd, osd = get_state_dict(model, opt, options=opts)
    return _full({"model": msd, "optim": osd})


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("save_kind", "save_world", "load_kind", "load_world", "flat"),
    [
        ("fsdp2", 2, "fsdp2", 3, False),
        ("fsdp2", 2, "plain", 1, True),
        ("ddp", 2, "fsdp2", 2, False),
    ],
)
def test_get_save_load_set_across_world_sizes(
    tmp_path: Path, save_kind: str, save_world: int, load_kind: str, load_world: int, flat: bool
) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_ranks(save_world, _save, tmp_path, path, save_kind, flat)
    for got in saved[1:]:
        _same(saved[0], got)
    if load_world == 1:
        got = [_load(0, 1, path, load_kind, flat)]
    else:
        got = run_ranks(load_world, _load, tmp_path, path, load_kind, flat)
    for g in got:
        _same(saved[0], g)


def _full_offload(rank: int, world: int, path: str) -> bool:
    """full_state_dict + cpu_offload on save; broadcast_from_rank0 on load."""
    model = _wrap(_model(), "fsdp2", world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    want = _full({"model": msd, "optim": osd})
    if rank == 0:  # cpu_offload: only rank 0 holds the full tensors
        assert all(not isinstance(v, DTensor) for v in msd.values())
        treeckpt.save({"model": msd, "optim": osd}, path, process_group=dist.new_group([0]))
    else:
        assert msd == {}
        dist.new_group([0])
    dist.barrier()

    fresh = _wrap(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)),
        "fsdp2",
        world,
    )
    fopt = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    load_opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    tm = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True))
    to = get_optimizer_state_dict(fresh, fopt, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        got = treeckpt.load({"model": tm, "optim": to}, path, process_group=dist.new_group([0]))
    else:
        dist.new_group([0])
        got = {"model": {}, "optim": {}}
    set_model_state_dict(fresh, got["model"], options=load_opts)
    set_optimizer_state_dict(fresh, fopt, got["optim"], options=load_opts)
    back = _full(
        {
            "model": get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True)),
            "optim": get_optimizer_state_dict(
                fresh, fopt, options=StateDictOptions(full_state_dict=True)
            ),
        }
    )
    if rank == 0:
        _same(want, back)
    return True


def test_full_state_dict_cpu_offload_and_broadcast_from_rank0(tmp_path: Path) -> None:
    assert run_ranks(2, _full_offload, tmp_path, str(tmp_path / "ckpt")) == [True, True]


def test_ignore_frozen_params_and_strict(tmp_path: Path) -> None:
    model = _model()
    model[0].weight.requires_grad_(False)
    opts = StateDictOptions(ignore_frozen_params=True)
    msd = get_model_state_dict(model, options=opts)
    assert sorted(msd) == ["0.bias", "2.bias", "2.weight"]
    path = tmp_path / "ckpt"
    treeckpt.save(msd, path)

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    frozen_before = fresh[0].weight.detach().clone()
    fresh[0].weight.requires_grad_(False)
    template = get_model_state_dict(fresh, options=opts)
    got = treeckpt.load(template, path)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*0\.weight"):
        set_model_state_dict(fresh, got, options=StateDictOptions(strict=True))
    set_model_state_dict(fresh, got, options=StateDictOptions(strict=False))
    assert torch.equal(fresh[0].weight, frozen_before)  # untouched
    for k in msd:
        assert torch.equal(fresh.state_dict()[k], msd[k]), k
    # keep_submodule_prefixes=False: one submodule's state under its own names.
    sub = get_model_state_dict(
        model, submodules={model[2]}, options=StateDictOptions(keep_submodule_prefixes=False)
    )
    assert sorted(sub) == ["bias", "weight"]
    treeckpt.save(sub, tmp_path / "sub")
    target = torch.nn.Linear(16, 3)
    target.load_state_dict(treeckpt.load(dict(target.state_dict()), tmp_path / "sub"))
    assert torch.equal(target.weight, model[2].weight)
    # The full template of the fresh model has a key the checkpoint lacks: treeckpt says which.
    with pytest.raises(treeckpt.LoadMismatchError, match=r"0\.weight"):
        treeckpt.load(get_model_state_dict(fresh), path)

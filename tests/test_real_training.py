"""Real training code resumes exactly: train, save, resume in a fresh process, and the
losses are those of an uninterrupted run, bit for bit.

Nothing here is our idea of a framework: Hugging Face ``transformers`` models
built from a config (nothing downloaded) with their own optimizer and
schedule, timm's optimizers, every ``torch.optim.lr_scheduler`` scheduler,
and FSDP2 on 2 gloo ranks. Each resume loads the model first and the
training state in a second call, as Hugging Face's Trainer does.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as L

import treeckpt
from tests.dist_utils import run_ranks
from tests.test_optimizer_load import _timm_optimizer

STEPS = 6
SPLIT = 3  # the interrupted run saves after this many steps


def _bits(x: float) -> str:
    return struct.pack(">d", x).hex()


# ---------------------------------------------------------------- Hugging Face


def _gpt2(seed: int) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2
    )  # dropout 0.1 everywhere: the RNG state must resume too
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def _hf_training(kind: str, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    from transformers.optimization import Adafactor, get_cosine_schedule_with_warmup

    if kind == "adafactor":  # relative step: the optimizer computes its own lr
        opt = Adafactor(model.parameters(), weight_decay=0.01)
        return opt, None
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)


def _hf_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> float:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 97, (2, 16), generator=g)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.item())


def _hf_run(rank: int, world: int, kind: str, path: str, phase: str) -> list[str]:
    model = _gpt2(0)
    opt, sched = _hf_training(kind, model)
    losses: list[str] = []
    start = 0
    if phase == "resume":
        model = _gpt2(1)  # other weights: everything must come from the checkpoint
        opt, sched = _hf_training(kind, model)
        treeckpt.load({"model": model}, f"{path}/model")
        state = {"optim": opt, "step": 0, "rng": torch.get_rng_state()}
        if sched is not None:
            state["sched"] = sched
        treeckpt.load(state, f"{path}/trainer")
        torch.set_rng_state(state["rng"])
        start = state["step"]
    if phase != "resume":
        torch.manual_seed(7)
    stop = SPLIT if phase == "first" else STEPS
    for step in range(start, stop):
        losses.append(_bits(_hf_step(model, opt, sched, step)))
    if phase == "first":
        treeckpt.save({"model": model}, f"{path}/model")
        state = {"optim": opt, "step": stop, "rng": torch.get_rng_state()}
        if sched is not None:
            state["sched"] = sched
        treeckpt.save(state, f"{path}/trainer")
    return losses


@pytest.mark.parametrize("kind", ["adamw-cosine", "adafactor"])
def test_hugging_face_resume_is_exact(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path)
    (whole,) = run_ranks(1, _hf_run, tmp_path, kind, path, "whole")
    (first,) = run_ranks(1, _hf_run, tmp_path, kind, path, "first")
    (resumed,) = run_ranks(1, _hf_run, tmp_path, kind, path, "resume")
    assert len(whole) == STEPS and first == whole[:SPLIT]
    assert first + resumed == whole


# ---------------------------------------------------------------- torch schedulers


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "ChainedScheduler": lambda o: L.ChainedScheduler(
        [L.ExponentialLR(o, 0.9), L.StepLR(o, 2, 0.5)], optimizer=o
    ),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.5, total_iters=4),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=5, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.8),
    "LambdaLR": lambda o: L.LambdaLR(o, lambda s: 0.9**s),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=4),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[2, 4, 4], gamma=0.5),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda s: 0.95),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.2, total_steps=STEPS + 1),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=5, power=2.0),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.5, total_iters=2), L.ExponentialLR(o, 0.9)], milestones=[2]
    ),
    "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
}


def test_every_torch_scheduler_is_covered() -> None:
    found = {
        n
        for n, c in vars(L).items()
        if inspect.isclass(c)
        and (issubclass(c, L.LRScheduler) or c is L.ReduceLROnPlateau)
        and not n.startswith("_")
        and c is not L.LRScheduler
    }
    assert found == set(SCHEDULERS)


def _sched_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> float:
    g = torch.Generator().manual_seed(step)
    loss = model(torch.randn(4, 5, generator=g)).pow(2).mean() * (1 + step % 3)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if isinstance(sched, L.ReduceLROnPlateau):
        sched.step(float(loss.item()))
    else:
        sched.step()
    return float(loss.item())


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_torch_scheduler_resume_is_exact(name: str, tmp_path: Path) -> None:
    def fresh(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(seed)
        model = nn.Linear(5, 3)
        opt = _sgd(model)
        return model, opt, SCHEDULERS[name](opt)

    model, opt, sched = fresh(0)
    whole = [
        (_bits(_sched_step(model, opt, sched, s)), _bits(opt.param_groups[0]["lr"]))
        for s in range(STEPS)
    ]

    model, opt, sched = fresh(0)
    first = [
        (_bits(_sched_step(model, opt, sched, s)), _bits(opt.param_groups[0]["lr"]))
        for s in range(SPLIT)
    ]
    treeckpt.save({"model": model, "optim": opt, "sched": sched}, tmp_path / "c")

    model, opt, sched = fresh(1)
    treeckpt.load({"model": model}, tmp_path / "c", strict=False)
    treeckpt.load({"optim": opt, "sched": sched}, tmp_path / "c", strict=False)
    rest = [
        (_bits(_sched_step(model, opt, sched, s)), _bits(opt.param_groups[0]["lr"]))
        for s in range(SPLIT, STEPS)
    ]
    assert first + rest == whole


# ---------------------------------------------------------------- timm


@pytest.mark.parametrize("name", ["MADGRAD", "AdafactorBigVision"])
def test_timm_optimizer_resume_is_exact(name: str, tmp_path: Path) -> None:
    def fresh(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3))
        if name == "MADGRAD":
            opt = _timm_optimizer("madgrad", "MADGRAD")(model.parameters(), lr=1e-2)
        else:
            opt = _timm_optimizer("adafactor_bv", "AdafactorBigVision")(
                model.parameters(), lr=1e-2, momentum=0.9, momentum_dtype=torch.bfloat16
            )
        return model, opt, L.MultiStepLR(opt, milestones=[4], gamma=0.1)

    model, opt, sched = fresh(0)
    whole = [_bits(_sched_step(model, opt, sched, s)) for s in range(STEPS)]
    model, opt, sched = fresh(0)
    first = [_bits(_sched_step(model, opt, sched, s)) for s in range(SPLIT)]
    treeckpt.save({"model": model}, tmp_path / "model")
    treeckpt.save({"optim": opt, "sched": sched}, tmp_path / "trainer")
    model, opt, sched = fresh(1)
    treeckpt.load({"model": model}, tmp_path / "model")
    treeckpt.load({"optim": opt, "sched": sched}, tmp_path / "trainer")
    rest = [_bits(_sched_step(model, opt, sched, s)) for s in range(SPLIT, STEPS)]
    assert first + rest == whole


# ---------------------------------------------------------------- FSDP2, 2 ranks


def _fsdp_run(rank: int, world: int, path: str, phase: str) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _gpt2(1 if phase == "resume" else 0)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt, sched = _hf_training("adamw-cosine", model)
    losses: list[str] = []
    start = 0
    if phase == "resume":
        treeckpt.load({"model": model}, f"{path}/model")
        state = {"optim": opt, "sched": sched, "step": 0}
        treeckpt.load(state, f"{path}/trainer")
        start = state["step"]
    stop = SPLIT if phase == "first" else STEPS
    for step in range(start, stop):
        model.eval()  # no dropout: the RNG streams of the two ranks stay independent of the split
        g = torch.Generator().manual_seed(1000 * rank + step)
        ids = torch.randint(0, 97, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(_bits(float(loss.item())))
    if phase == "first":
        treeckpt.save({"model": model}, f"{path}/model")
        treeckpt.save({"optim": opt, "sched": sched, "step": stop}, f"{path}/trainer")
    return losses


def test_fsdp2_two_ranks_resume_is_exact(tmp_path: Path) -> None:
    path = str(tmp_path)
    whole = run_ranks(2, _fsdp_run, tmp_path, path, "whole")
    first = run_ranks(2, _fsdp_run, tmp_path, path, "first")
    resumed = run_ranks(2, _fsdp_run, tmp_path, path, "resume")
    assert [w[:SPLIT] for w in whole] == first
    assert [f + r for f, r in zip(first, resumed, strict=True)] == whole
    assert whole[0] != whole[1]  # each rank trained on its own data

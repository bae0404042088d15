"""Loading optimizer state changes nothing outside the optimizer (RELIABILITY.md 13).

Every optimizer in ``torch.optim``, optimizers that ignore the group's ``lr``
(our own small ones, transformers' ``Adafactor`` and timm's ``MADGRAD`` /
``AdafactorBigVision``), a container without its own ``lr``: the model is
loaded first and the optimizer in a second call (Hugging Face Trainer's
order), with gradients present. The parameters stay the checkpoint's bit for
bit, the gradients are the caller's (same objects, same bits), and training
continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import treeckpt
import treeckpt.dcp as dcp
from tests.lr_free_optim import DualAveraging, RelativeStepDecay
from treeckpt.dcp.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

OptimFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _timm_optimizer(module: str, name: str) -> Any:
    """A class from timm's optimizer package, imported without timm's own ``__init__``
    (which needs torchvision, whose PyPI wheels do not import next to the CPU torch)."""
    spec = importlib.util.find_spec("timm")
    assert spec is not None and spec.submodule_search_locations, (
        "timm is not installed (scripts/setup-venv.sh installs it)"
    )
    pkg_name = "_tests_timm_optim"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(Path(next(iter(spec.submodule_search_locations))) / "optim")]
        sys.modules[pkg_name] = pkg
    return getattr(importlib.import_module(f"{pkg_name}.{module}"), name)


def _hf_adafactor(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # The defaults: relative_step=True, scale_parameter=True, lr=None.
    return Adafactor(params, weight_decay=0.1)


# Every optimizer class of torch.optim needs a recipe here: a new one in a
# torch release fails test_every_torch_optimizer_has_a_recipe.
TORCH_OPTIMIZERS: dict[str, OptimFactory] = {
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2, weight_decay=0.1),
    "Adadelta": lambda p: torch.optim.Adadelta(p, weight_decay=0.1),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=0.1),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.5, history_size=3),
    "Muon": lambda p: torch.optim.Muon(p, lr=1e-2, weight_decay=0.1),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2, decoupled_weight_decay=True),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.1),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=1e-2),
}

LR_FREE: dict[str, OptimFactory] = {
    "RelativeStepDecay": lambda p: RelativeStepDecay(p),
    "DualAveraging": lambda p: DualAveraging(p),
    "transformers.Adafactor": _hf_adafactor,
    "timm.MADGRAD": lambda p: _timm_optimizer("madgrad", "MADGRAD")(p, lr=1e-2),
    "timm.AdafactorBigVision": lambda p: _timm_optimizer("adafactor_bv", "AdafactorBigVision")(
        p, lr=1e-2, momentum=0.9, momentum_dtype=torch.bfloat16
    ),
}


def test_every_torch_optimizer_has_a_recipe() -> None:
    found = {
        n
        for n, c in vars(torch.optim).items()
        if inspect.isclass(c)
        and issubclass(c, torch.optim.Optimizer)
        and c is not torch.optim.Optimizer
    }
    assert found == set(TORCH_OPTIMIZERS)


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "SparseAdam":
        return nn.Embedding(12, 6, sparse=True)
    if name == "Muon":  # 2-d parameters only
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 3, bias=False))
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _loss(name: str, model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "SparseAdam":
        return model(torch.randint(0, 12, (5,), generator=g)).pow(2).sum()
    return model(torch.randn(5, 6, generator=g)).pow(2).sum()


def _train(name: str, model: nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for s in seeds:
        opt.zero_grad(set_to_none=True)

        def closure(s: int = s) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = _loss(name, model, s)
            loss.backward()
            return loss

        if isinstance(opt, torch.optim.LBFGS):
            opt.step(closure)
        else:
            closure()
            opt.step()


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _same_state(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert _bits(a) == _bits(b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _same_state(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_state(x, y)
    else:
        assert a == b or (a != a and b != b), (a, b)


FACTORIES = {**TORCH_OPTIMIZERS, **LR_FREE}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_model_then_optimizer_changes_no_parameter(name: str, tmp_path: Path) -> None:
    make = FACTORIES[name]
    model = _model(name, 0)
    opt = make(list(model.parameters()))
    _train(name, model, opt, range(3))
    treeckpt.save({"model": model}, tmp_path / "model")
    treeckpt.save({"optim": opt}, tmp_path / "optim")
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = _model(name, 1)  # other weights
    opt2 = make(list(model2.parameters()))
    treeckpt.load({"model": model2}, tmp_path / "model")
    # Gradients the caller holds must survive the optimizer load untouched.
    grads = []
    for i, p in enumerate(model2.parameters()):
        if name == "SparseAdam":
            p.grad = None
        else:
            p.grad = torch.full_like(p, 0.5 + i)
        grads.append(p.grad)
    grad_bits = [None if g is None else _bits(g) for g in grads]
    treeckpt.load({"optim": opt2}, tmp_path / "optim")

    for k, v in model2.state_dict().items():
        assert _bits(v) == _bits(saved_params[k]), f"{name}: {k} moved"
    for p, g, bits in zip(model2.parameters(), grads, grad_bits, strict=True):
        assert p.grad is g
        assert (None if g is None else _bits(g)) == bits
    _same_state(opt.state_dict(), opt2.state_dict())

    # Training continues exactly as the uninterrupted run.
    _train(name, model, opt, range(3, 5))
    _train(name, model2, opt2, range(3, 5))
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert _bits(a) == _bits(b), f"{name}: {k} differs after resuming"


@pytest.mark.parametrize("name", ["RelativeStepDecay", "DualAveraging", "transformers.Adafactor"])
def test_facade_set_optimizer_state_dict_changes_no_parameter(name: str) -> None:
    """torch's utilities step a fresh optimizer with lr=0; the facade undoes everything else."""
    make = FACTORIES[name]
    model = _model(name, 0)
    opt = make(list(model.parameters()))
    _train(name, model, opt, range(3))
    osd = get_optimizer_state_dict(model, opt)

    model2 = _model(name, 1)
    opt2 = make(list(model2.parameters()))
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    template = get_optimizer_state_dict(model2, opt2)  # no gradients: creates fresh state
    assert all(p.grad is None for p in model2.parameters())
    grads = [torch.full_like(p, 2.0) for p in model2.parameters()]
    for p, g in zip(model2.parameters(), grads, strict=True):
        p.grad = g
    set_optimizer_state_dict(model2, opt2, template)
    set_optimizer_state_dict(model2, opt2, osd)
    for k, v in model2.state_dict().items():
        assert _bits(v) == _bits(before[k]), f"{name}: {k} moved"
    for p, g in zip(model2.parameters(), grads, strict=True):
        assert p.grad is g and torch.equal(g, torch.full_like(g, 2.0))
    _same_state(opt.state_dict()["state"], opt2.state_dict()["state"])


def test_facade_load_of_fresh_optimizer_through_dcp_api(tmp_path: Path) -> None:
    """DCP's documented flow on the facade with an lr-free optimizer."""
    model = _model("x", 0)
    opt = RelativeStepDecay(list(model.parameters()))
    _train("x", model, opt, range(2))
    msd, osd = dcp.state_dict.get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "c"))

    model2 = _model("x", 0)  # same weights: the model is then loaded from the checkpoint
    opt2 = RelativeStepDecay(list(model2.parameters()))
    msd2, osd2 = dcp.state_dict.get_state_dict(model2, opt2)
    for k, v in model2.state_dict().items():
        assert _bits(v) == _bits(_model("x", 0).state_dict()[k]), f"{k} moved"
    sd = {"model": msd2, "optim": osd2}
    dcp.load(sd, checkpoint_id=str(tmp_path / "c"))
    dcp.state_dict.set_state_dict(
        model2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
    )
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert _bits(a) == _bits(b), k
    _same_state(opt.state_dict(), opt2.state_dict())


def _titan_container(model: nn.Module) -> torch.optim.Optimizer:
    """torchtitan's ``OptimizersContainer``: a ``torch.optim.Optimizer`` wrapping several,
    whose own param groups carry no ``lr`` and whose state dict is keyed by FQN."""
    import torchtitan.components.optimizer.optimizer as optimizer

    config = optimizer.OptimizersContainer.Config(
        param_groups=[
            optimizer.ParamGroupConfig(
                pattern=r"\.bias$", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2}
            ),
            optimizer.ParamGroupConfig(
                pattern=".*",
                optimizer_name="Adam",
                optimizer_kwargs={"lr": 3e-3, "weight_decay": 0.1},
            ),
        ],
        implementation="for-loop",
    )
    return optimizer.OptimizersContainer(config, model_parts=[model])


def test_torchtitan_container_without_lr_loads(tmp_path: Path) -> None:
    model = _model("x", 0)
    opt = _titan_container(model)
    assert all("lr" not in g for g in opt.param_groups)
    _train("x", model, opt, range(2))
    treeckpt.save({"model": model, "optim": opt}, tmp_path / "c")

    model2 = _model("x", 1)
    opt2 = _titan_container(model2)
    treeckpt.load({"model": model2, "optim": opt2}, tmp_path / "c")
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert _bits(a) == _bits(b), k
    _same_state(opt.state_dict(), opt2.state_dict())
    _train("x", model, opt, range(2, 4))
    _train("x", model2, opt2, range(2, 4))
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert _bits(a) == _bits(b), k

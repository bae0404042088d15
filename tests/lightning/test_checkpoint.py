"""Lightning's checkpoint dict through treeckpt, in one process: layout, metadata, errors."""

from __future__ import annotations

import fractions
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict

import treeckpt
from treeckpt.errors import CheckpointError, LoadMismatchError, UnsupportedLeafError
from treeckpt.lightning import is_treeckpt_checkpoint, load_checkpoint, save_checkpoint


def _model(seed: int, extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)]
    if extra:
        layers.append(torch.nn.Linear(3, 2))
    return torch.nn.Sequential(*layers)


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


class _Counter:
    def state_dict(self) -> dict[str, Any]:
        return {"seen": torch.tensor([1, 2])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("not called: metadata comes back as plain state")


def _lightning_dict(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "epoch": 2,
        "global_step": 30,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": get_model_state_dict(model),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5)},
            "Counter": _Counter(),  # a Stateful: stored as its state dict
        },
        "optimizer_states": [get_optimizer_state_dict(model, opt)],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(lr=1e-2, shape=torch.Size([2, 3])),
    }


def test_round_trip_bit_exact_with_metadata(tmp_path: Path) -> None:
    model, opt = _trained(0)
    ckpt = _lightning_dict(model, opt)
    save_checkpoint(dict(ckpt), str(tmp_path / "c"))
    assert is_treeckpt_checkpoint(str(tmp_path / "c"))

    model2 = _model(1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    loaded = load_checkpoint(str(tmp_path / "c"), model2, [opt2])
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        for name, t in opt.state[p].items():
            assert torch.equal(opt2.state[p2][name], t), name
    assert opt2.param_groups[0]["lr"] == 1e-2
    assert loaded["global_step"] == 30 and loaded["epoch"] == 2
    assert loaded["loops"] == {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}}
    # AttributeDict and torch.Size are stored as plain dict and tuple, without pickle.
    assert loaded["hyper_parameters"] == {"lr": 1e-2, "shape": (2, 3)}
    assert torch.equal(loaded["callbacks"]["Counter"]["seen"], torch.tensor([1, 2]))
    score = loaded["callbacks"]["ModelCheckpoint{'monitor': None}"]["best_model_score"]
    assert torch.equal(score, torch.tensor(0.5))


def test_strict_load_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    model, opt = _trained(0)
    save_checkpoint(_lightning_dict(model, opt), str(tmp_path / "c"))
    bigger = _model(1, extra=True)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(LoadMismatchError, match=r"2\.weight"):
        load_checkpoint(str(tmp_path / "c"), bigger, [])
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())

    smaller = torch.nn.Sequential(torch.nn.Linear(6, 5))
    with pytest.raises(LoadMismatchError, match=r"state_dict\.1\.weight"):
        load_checkpoint(str(tmp_path / "c"), smaller, [])
    # strict=False loads what both sides have.
    load_checkpoint(str(tmp_path / "c"), smaller, [], strict=False)
    assert torch.equal(smaller[0].weight, model[0].weight)


def test_without_optimizers_the_optimizer_state_is_not_read(tmp_path: Path) -> None:
    """trainer.validate/test(ckpt_path=...) have no optimizers: the model loads, the
    stored optimizer state is left alone, the metadata comes back."""
    model, opt = _trained(0)
    save_checkpoint(_lightning_dict(model, opt), str(tmp_path / "c"))
    model2 = _model(1)
    loaded = load_checkpoint(str(tmp_path / "c"), model2, [])
    assert "optimizer_states" not in loaded and loaded["global_step"] == 30
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in model.state_dict().items())
    assert list(loaded)[:4] == ["epoch", "global_step", "pytorch-lightning_version", "state_dict"]


def test_not_a_lightning_checkpoint(tmp_path: Path) -> None:
    treeckpt.save({"model": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint(str(tmp_path / "c"), _model(0), [])


def test_shape_mismatch_is_an_error_even_when_not_strict(tmp_path: Path) -> None:
    model, opt = _trained(0)
    save_checkpoint(_lightning_dict(model, opt), str(tmp_path / "c"))
    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    with pytest.raises(LoadMismatchError, match=r"0\.weight.*\[4, 6\].*\[5, 6\]"):
        load_checkpoint(str(tmp_path / "c"), other, [], strict=False)


def test_metadata_that_needs_pickle_is_refused_with_its_name(tmp_path: Path) -> None:
    model, opt = _trained(0)
    ckpt = _lightning_dict(model, opt)
    ckpt["hyper_parameters"]["loss_fn"] = fractions.Fraction(1, 3)
    with pytest.raises(UnsupportedLeafError, match=r"hyper_parameters\.loss_fn.*allow_pickle"):
        save_checkpoint(dict(ckpt), str(tmp_path / "c"))
    assert not is_treeckpt_checkpoint(str(tmp_path / "c"))
    save_checkpoint(dict(ckpt), str(tmp_path / "c"), allow_pickle=True)
    assert (
        treeckpt.metadata(tmp_path / "c").values["hyper_parameters.loss_fn"].startswith("<pickled")
    )


def test_importing_treeckpt_does_not_import_lightning() -> None:
    code = (
        "import sys, treeckpt, treeckpt.tools.cli, treeckpt.tools.consolidate; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""Consolidating Lightning's sharded checkpoints: written by treeckpt, or by plain Lightning (DCP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from scripts.demo import run_job, states_equal
from treeckpt.tools.consolidate import consolidate

pytestmark = pytest.mark.distributed

LIGHTNING_KEYS = {
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "loops",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
    "hparams_name",
    "hyper_parameters",
}


def _check(out: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(out) == LIGHTNING_KEYS
    assert out["global_step"] == 20
    assert out["hyper_parameters"] == {"lr": 3e-3}
    assert out["lr_schedulers"][0]["last_epoch"] == 20
    (optim,) = out["optimizer_states"]
    assert optim["param_groups"][0]["params"][0] == "embed.weight"
    got = {"model": out["state_dict"], "optim": optim["state"]}
    assert states_equal(expected, got)


def test_consolidate_a_treeckpt_lightning_checkpoint(
    saved_on_2: dict[str, Any], tmp_path: Path
) -> None:
    report = consolidate(saved_on_2["ckpt"], tmp_path / "out.ckpt", max_memory=4096)
    assert report.source_format == "treeckpt" and report.largest_read <= 4096
    out = torch.load(report.dst, weights_only=True, map_location="cpu")
    _check(out, torch.load(saved_on_2["expected"], weights_only=True))


def test_consolidate_what_plain_lightning_wrote(tmp_path: Path) -> None:
    """Lightning's own ModelParallelStrategy writes DCP files plus meta.pt; Lightning's
    consolidate command fails on it (KeyError: 'model'); ours gives Lightning's layout."""
    ckpt = tmp_path / "plain"
    run_job(2, 20, tmp_path / "save", save=str(ckpt), plain=True)
    assert (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    report = consolidate(ckpt, max_memory=4096)
    assert report.source_format == "dcp"
    assert report.dst == f"{ckpt}.consolidated"
    out = torch.load(report.dst, weights_only=True, map_location="cpu")
    _check(out, torch.load(tmp_path / "save" / "end.pt", weights_only=True))

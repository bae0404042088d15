"""Save on 2 processes, resume with trainer.fit(ckpt_path=...) on another process count.

Each Lightning run is a real multi-process job (Lightning's launcher re-runs
the command per rank, gloo on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import treeckpt
from scripts.demo import run_job, states_equal

pytestmark = pytest.mark.distributed


def _resume(saved: dict[str, Any], devices: int, tmp_path: Path) -> None:
    summary = run_job(devices, 25, tmp_path / "resume", resume=str(saved["ckpt"]))
    expected = torch.load(saved["expected"], weights_only=True)
    start = torch.load(tmp_path / "resume" / "start.pt", weights_only=True)
    # Model and optimizer state after loading equal the saved state, bit for bit.
    assert states_equal(expected, start)
    # Training continues from the saved step, on the new process count.
    assert start["step"] == expected["step"] == 20
    assert summary["world"] == devices
    assert summary["steps"] == 25
    end = torch.load(tmp_path / "resume" / "end.pt", weights_only=True)
    assert not states_equal(start, end)  # it did train


def test_saved_checkpoint_is_a_treeckpt_checkpoint_with_lightning_layout(
    saved_on_2: dict[str, Any],
) -> None:
    info = treeckpt.metadata(saved_on_2["ckpt"])
    assert info.world_size == 2
    assert info.values["global_step"] == 20
    assert info.values["hyper_parameters.lr"] == 3e-3
    assert info.values["lr_schedulers.0.last_epoch"] == 20
    assert "state_dict.layers.0.linear1.weight" in info.tensors
    assert "optimizer_states.0.state.head.weight.exp_avg" in info.tensors
    # Sharded: the 2 ranks wrote their own data files, and nothing was pickled.
    assert len(info.files) >= 2
    assert not any(str(v).startswith("<pickled") for v in info.values.values())


def test_model_checkpoint_callback_saves_and_removes_through_treeckpt(
    saved_on_2: dict[str, Any],
) -> None:
    """ModelCheckpoint(every_n_train_steps=10, save_top_k=1) saved at steps 10 and 20
    through the strategy and removed the older checkpoint."""
    from treeckpt.lightning import is_treeckpt_checkpoint

    ckpts = sorted(p.name for p in (saved_on_2["root"] / "save" / "checkpoints").iterdir())
    assert ckpts == ["epoch=0-step=20.ckpt"]
    path = saved_on_2["root"] / "save" / "checkpoints" / ckpts[0]
    assert is_treeckpt_checkpoint(str(path))
    info = treeckpt.metadata(path)
    assert info.values["global_step"] == 20
    callback = next(k for k in info.values if k.startswith("callbacks.ModelCheckpoint"))
    assert callback  # the callback's own state is stored, without pickle


def test_resume_on_3_processes(saved_on_2: dict[str, Any], tmp_path: Path) -> None:
    _resume(saved_on_2, 3, tmp_path)


@pytest.mark.slow  # the demo test resumes on 1 process in the default set
def test_resume_on_1_process(saved_on_2: dict[str, Any], tmp_path: Path) -> None:
    _resume(saved_on_2, 1, tmp_path)


@pytest.mark.gpu
def test_fsdp_strategy_sharded_on_gpus(tmp_path: Path) -> None:
    """FSDPStrategy (FSDP1) needs CUDA: save on every GPU, resume on one."""
    devices = torch.cuda.device_count()
    ckpt = tmp_path / "ckpt"
    run_job(devices, 20, tmp_path / "save", save=str(ckpt), fsdp1=True)
    assert treeckpt.metadata(ckpt).world_size == devices
    summary = run_job(1, 25, tmp_path / "resume", resume=str(ckpt), fsdp1=True)
    expected = torch.load(tmp_path / "save" / "end.pt", weights_only=True)
    start = torch.load(tmp_path / "resume" / "start.pt", weights_only=True)
    assert states_equal(expected, start)
    assert start["step"] == 20 and summary["steps"] == 25

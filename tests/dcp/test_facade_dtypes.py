"""The DCP facade's dtype rule: exact conversions are made, lossy ones need the planner's consent.

torch's DCP casts whatever it finds (``copy_``); the facade converts only
when every value survives, on the fast path and on the planner path alike,
and for checkpoints torch's own DCP wrote. A planner consents to a lossy
conversion by name through ``allows_lossy_cast``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch import nn

import treeckpt
from treeckpt import dcp


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def _state(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2)).to(dtype)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class PlannerPath(dcp.DefaultLoadPlanner):
    """A planner subclass: the load runs DCP's planner protocol."""


class LossyEmbed(dcp.DefaultLoadPlanner):
    """Consents, by name, to the lossy conversion of ``0.weight``."""

    def allows_lossy_cast(self, fqn: str) -> bool:
        return fqn == "0.weight"


PLANNERS = [None, PlannerPath]


@pytest.mark.parametrize("planner", PLANNERS, ids=["fast", "planner"])
def test_bf16_save_loads_into_fp32_exactly(
    tmp_ckpt: str, planner: type[dcp.DefaultLoadPlanner] | None, caplog: pytest.LogCaptureFixture
) -> None:
    saved = _state(torch.bfloat16, 0)
    dcp.save({"model": saved}, checkpoint_id=tmp_ckpt)
    target = _state(torch.float32, 1)
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    with caplog.at_level(logging.INFO, logger="treeckpt.load"):
        dcp.load(
            {"model": target},
            checkpoint_id=tmp_ckpt,
            planner=planner() if planner else None,
        )
    for k, v in saved.items():
        assert target[k].dtype == torch.float32 and target[k].data_ptr() == ptrs[k]
        assert _bits(target[k]) == _bits(v.float()), k
    if planner is None:  # the fast path is treeckpt's own load: its report is logged
        assert caplog.messages == [
            f"{tmp_ckpt}: the load converts 4 tensors: 4 bfloat16 -> float32"
        ]


@pytest.mark.parametrize("planner", PLANNERS, ids=["fast", "planner"])
def test_lossy_conversion_is_refused_and_nothing_changes(
    tmp_ckpt: str, planner: type[dcp.DefaultLoadPlanner] | None
) -> None:
    dcp.save(
        {"w": torch.randn(3, 2), "b": torch.ones(2, dtype=torch.bfloat16)}, checkpoint_id=tmp_ckpt
    )
    target = {"w": torch.zeros(3, 2, dtype=torch.bfloat16), "b": torch.zeros(2)}
    with pytest.raises(dcp.CheckpointException) as info:
        dcp.load(target, checkpoint_id=tmp_ckpt, planner=planner() if planner else None)
    cause = info.value.__cause__
    assert isinstance(cause, treeckpt.LoadMismatchError)
    if planner is None:
        expected = "w (template bfloat16[3, 2], checkpoint float32[3, 2]"
    else:
        expected = "w (checkpoint torch.float32[3, 2], state dict torch.bfloat16[3, 2]"
    assert cause.mismatched == (
        f"{expected}: converting float32 to bfloat16 can lose bits; allow it by name: "
        "allow_lossy_cast={'w'})",
    )
    assert torch.equal(target["w"], torch.zeros(3, 2, dtype=torch.bfloat16))
    assert torch.equal(target["b"], torch.zeros(2))


def test_planner_consents_by_name(tmp_ckpt: str) -> None:
    saved = _state(torch.float32, 2)
    dcp.save(saved, checkpoint_id=tmp_ckpt)
    target = _state(torch.float32, 3)
    target["0.weight"] = torch.zeros(5, 6, dtype=torch.bfloat16)
    dcp.load(target, checkpoint_id=tmp_ckpt, planner=LossyEmbed())
    assert _bits(target["0.weight"]) == _bits(saved["0.weight"].to(torch.bfloat16))
    assert _bits(target["0.bias"]) == _bits(saved["0.bias"])
    target["0.bias"] = torch.zeros(5, dtype=torch.float16)  # not named: refused
    with pytest.raises(dcp.CheckpointException, match=r"0\.bias .*float32 to float16 can lose"):
        dcp.load(target, checkpoint_id=tmp_ckpt, planner=LossyEmbed())


def test_deprecated_load_state_dict_widens(tmp_ckpt: str) -> None:
    dcp.save({"x": torch.arange(7, dtype=torch.int16)}, checkpoint_id=tmp_ckpt)
    sd = {"x": torch.zeros(7, dtype=torch.int64)}
    with pytest.warns(FutureWarning):
        dcp.load_state_dict(sd, storage_reader=dcp.FileSystemReader(tmp_ckpt), no_dist=True)
    assert sd["x"].tolist() == list(range(7)) and sd["x"].dtype == torch.int64


def test_torch_written_bf16_checkpoint_widens(tmp_ckpt: str) -> None:
    """A checkpoint torch's own DCP wrote, read by the facade into float32."""
    saved = {"w": torch.randn(4, 4).to(torch.bfloat16), "i": torch.arange(3, dtype=torch.int32)}
    torch_dcp.save(saved, checkpoint_id=tmp_ckpt, no_dist=True)
    target = {"w": torch.zeros(4, 4), "i": torch.zeros(3, dtype=torch.float64)}
    dcp.load(target, checkpoint_id=tmp_ckpt)
    assert _bits(target["w"]) == _bits(saved["w"].float())
    assert _bits(target["i"]) == _bits(saved["i"].double())
    lossy = {"w": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}
    with pytest.raises(dcp.CheckpointException, match=r"w .*bfloat16 to float8_e4m3fn can lose"):
        dcp.load(
            lossy, checkpoint_id=tmp_ckpt, planner=dcp.DefaultLoadPlanner(allow_partial_load=True)
        )


def test_torchs_own_load_through_our_reader_converts_only_exactly(tmp_ckpt: str) -> None:
    """torch's DCP ``load`` and planner over treeckpt's FileSystemReader (its storage plugin)."""
    saved = {"w": torch.randn(5).to(torch.float16)}
    dcp.save(saved, checkpoint_id=tmp_ckpt)
    target = {"w": torch.zeros(5)}
    torch_dcp.load(target, storage_reader=dcp.FileSystemReader(tmp_ckpt), no_dist=True)
    assert _bits(target["w"]) == _bits(saved["w"].float())
    narrow = {"w": torch.zeros(5, dtype=torch.bfloat16)}  # torch would cast; the reader refuses
    with pytest.raises(torch_dcp.CheckpointException, match=r"float16 to bfloat16 can lose bits"):
        torch_dcp.load(narrow, storage_reader=dcp.FileSystemReader(tmp_ckpt), no_dist=True)
    assert torch.equal(narrow["w"], torch.zeros(5, dtype=torch.bfloat16))

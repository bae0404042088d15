"""The private paths of torch's DCP that Lightning imports work on the facade:
``_load_state_dict`` with ``_EmptyStateDictLoadPlanner`` loads a whole treeckpt
checkpoint into an empty dict (Lightning's ``_load_distributed_checkpoint``)."""

from __future__ import annotations

from pathlib import Path

import torch

import treeckpt.dcp as dcp
from treeckpt.dcp.format_utils import _EmptyStateDictLoadPlanner
from treeckpt.dcp.state_dict_loader import _load_state_dict


def test_empty_state_dict_planner_loads_the_whole_checkpoint(tmp_path: Path) -> None:
    saved = {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)},
        "optim": {"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"lr": 0.5}]},
        "epoch": 7,
    }
    dcp.save(saved, checkpoint_id=tmp_path / "ckpt")
    loaded: dict = {}
    _load_state_dict(
        loaded,
        storage_reader=dcp.FileSystemReader(tmp_path / "ckpt"),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    assert sorted(loaded) == ["epoch", "model", "optim"]
    assert torch.equal(loaded["model"]["w"], saved["model"]["w"])
    assert torch.equal(loaded["model"]["b"], saved["model"]["b"])
    assert torch.equal(loaded["optim"]["state"][0]["step"], torch.tensor(4.0))
    assert loaded["optim"]["param_groups"] == [{"lr": 0.5}]
    assert loaded["epoch"] == 7

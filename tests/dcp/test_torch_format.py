"""The facade on checkpoints torch's own DCP wrote: ``treeckpt.dcp.load`` and ``format_utils``.

The reader itself is tested in ``tests/formats/test_torch_dcp_reader.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as tdcp
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import treeckpt
import treeckpt.dcp as dcp
from tests.dist_utils import run_ranks
from tests.torch_dcp_utils import flat_of, fsdp_of, full_of, make_model, model_mesh
from treeckpt.dcp.format_utils import dcp_to_treeckpt, treeckpt_to_dcp
from treeckpt.dcp.state_dict import get_state_dict
from treeckpt.formats.torch_dcp import restore_dcp
from treeckpt.testing import assert_same_tree


def _facade_load(rank: int, world: int, path: str) -> list[Any]:
    """``treeckpt.dcp.load`` on a torch-written directory: the default reader and planner,
    then torch's own planner through an explicit FileSystemReader."""
    got = []
    for planner in (None, tdcp.DefaultLoadPlanner()):
        model = fsdp_of(make_model(), world)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        msd, osd = get_state_dict(model, opt)
        extra = {"step": 0, "blob": b"", "names": [], "loss": 0.0}
        cols = distribute_tensor(
            torch.zeros(5, 7, dtype=torch.float64), model_mesh(world), [Shard(1)]
        )
        state = {"model": msd, "optim": osd, "cols": cols, "extra": extra}
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=planner)
        assert state["cols"] is cols and isinstance(msd["0.weight"], DTensor)
        assert cols.to_local().shape == (5, [3, 3, 1][rank])
        got.append(full_of(state))
    return got


@pytest.mark.distributed
def test_facade_load_on_another_world_size(fsdp_dcp_ckpt: tuple[str, Any], tmp_path: Path) -> None:
    """torch saved on 2 FSDP2 ranks; ``treeckpt.dcp.load`` on 3 reshards, bit for bit."""
    path, full = fsdp_dcp_ckpt
    for per_rank in run_ranks(3, _facade_load, tmp_path, path):
        for got in per_rank:
            assert_same_tree(full, got)


@pytest.mark.distributed
def test_convert_to_treeckpt_and_back(fsdp_dcp_ckpt: tuple[str, Any], tmp_path: Path) -> None:
    path, full = fsdp_dcp_ckpt
    dcp_to_treeckpt(path, tmp_path / "tc")
    assert_same_tree(full, treeckpt.restore(tmp_path / "tc"))
    treeckpt_to_dcp(tmp_path / "tc", tmp_path / "back")
    # torch's own DCP reads the way back.
    template = restore_dcp(path)
    zeroed = flat_of(template)
    for v in zeroed.values():
        if isinstance(v, torch.Tensor):
            v.zero_()
    tdcp.load(template, checkpoint_id=str(tmp_path / "back"), no_dist=True)
    assert_same_tree(flat_of(full), flat_of(template))
    assert_same_tree(full, restore_dcp(tmp_path / "back"))

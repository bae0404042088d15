"""CheckpointManager on several ranks (gloo): rank 0 locks, lists and deletes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt.manager import CheckpointManager

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning"),
]


def _state(step: int, rank: int) -> dict[str, Any]:
    return {
        "frozen": torch.arange(50_000, dtype=torch.float32),  # replicated, never changes
        "local": torch.full((1000,), float(step * 10 + rank)),
        "step": step,
    }


def _loop(rank: int, world: int, root: str) -> dict[str, Any]:
    opts = treeckpt.SaveOptions(sync=False, chunk_bytes=64 << 10)
    # every rank saves its own "local" under a rank-specific key, so each rank writes
    with CheckpointManager(root, max_to_keep=2, options=opts) as m:
        for step in range(1, 5):
            tree = {f"r{r}": _state(step, r) for r in range(world)}
            m.save(step, tree, metrics={"loss": float(step)})
        steps = m.all_steps()
        restored = m.restore()
        restored_step = m.restored_step
        tmpl = {f"r{r}": _state(0, 99) for r in range(world)}
        loaded = m.restore(step=3, tree=tmpl)
        dist.barrier()
    return {
        "steps": steps,
        "restored_step": restored_step,
        "ok4": all(
            torch.equal(restored[f"r{r}"]["local"], _state(4, r)["local"])
            and torch.equal(restored[f"r{r}"]["frozen"], _state(4, r)["frozen"])
            for r in range(world)
        ),
        "ok3": all(
            torch.equal(loaded[f"r{r}"]["local"], _state(3, r)["local"]) for r in range(world)
        ),
    }


def test_two_ranks_save_retain_and_restore(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    results = run_ranks(2, _loop, tmp_path, root)
    for res in results:
        assert res == {"steps": [3, 4], "restored_step": 4, "ok4": True, "ok3": True}
    # the kept steps are plain checkpoints, loadable in one process
    got = treeckpt.restore(f"{root}/step-0000000004")
    assert torch.equal(got["r1"]["local"], _state(4, 1)["local"])
    assert not (tmp_path / "run" / "manager.lock").exists()  # released on close

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


def _save_beside_an_async_save(rank: int, world: int, root: str, other: str) -> dict[str, Any]:
    """A manager used while a ``treeckpt.async_save`` of the same ranks is still writing."""
    import threading
    import time

    from treeckpt import asyncsave
    from treeckpt.shell.dist import DistCoordinator

    real_commit, real_run = asyncsave.commit_save, DistCoordinator._run

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)  # the background write is still running when the manager starts
        return real_commit(*args, **kwargs)

    overlapping: list[str] = []
    running: list[Any] = []

    def watched_run(self: DistCoordinator, phase: str, fn: Any) -> Any:
        main = threading.current_thread() is threading.main_thread()
        if main and running and not running[0].done():
            overlapping.append(phase)
        return real_run(self, phase, fn)

    asyncsave.commit_save = slow_commit  # type: ignore[assignment]
    DistCoordinator._run = watched_run  # type: ignore[method-assign]
    opts = treeckpt.SaveOptions(sync=False)
    future = treeckpt.async_save({f"r{rank}": torch.full((100,), float(rank))}, other, options=opts)
    running.append(future)
    with CheckpointManager(root, max_to_keep=1, options=opts) as m:
        m.save(1, {f"r{r}": _state(1, r) for r in range(world)})
        steps = m.all_steps()
    future.result(timeout=60)
    return {"overlapping": overlapping, "steps": steps}


def test_a_manager_waits_for_a_running_async_save(tmp_path: Path) -> None:
    """No collective of the manager starts while an asynchronous save of the same ranks runs
    (their collectives would interleave); the manager built its own coordinator without
    waiting, unlike ``treeckpt.save`` and ``load``."""
    root, other = str(tmp_path / "run"), str(tmp_path / "other")
    results = run_ranks(2, _save_beside_an_async_save, tmp_path, root, other)
    for res in results:
        assert res == {"overlapping": [], "steps": [1]}
    assert torch.equal(treeckpt.restore(other)["r1"], torch.full((100,), 1.0))

"""All ranks agree, in bounded time: a rank raising, exiting or stalling in a
phase of a save or a load makes every surviving rank raise, nothing is
committed, and the previous checkpoint stays intact."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import treeckpt
from tests.dist_utils import DEAD, run_ranks

pytestmark = pytest.mark.distributed

OLD = {"w": torch.arange(12.0).reshape(3, 4), "step": 1}


def _new_tree(rank: int) -> dict[str, Any]:
    return {"w": torch.full((3, 4), 7.0), "v": torch.ones(3, 4), "step": 2}


def _fault(kind: str) -> Any:
    def bad(*args: Any, **kwargs: Any) -> Any:
        if kind == "raise":
            raise OSError("disk on fire")
        if kind == "exit":
            os._exit(3)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # stall

    return bad


def _save_with_fault(rank: int, world: int, path: str, kind: str, phase: str) -> tuple[str, float]:
    import treeckpt.shell.load as load_mod
    import treeckpt.shell.save as save_mod

    opts = treeckpt.SaveOptions(timeout_s=5)
    if rank == 1 and phase == "write":
        save_mod.write_chunks = _fault(kind)  # type: ignore[assignment]
    if rank == 1 and phase == "describe":
        save_mod.local_shards = _fault(kind)  # type: ignore[assignment]
    if rank == 1 and phase == "read":
        load_mod.read_chunks = _fault(kind)  # type: ignore[assignment]
    start = time.monotonic()
    try:
        if phase == "read":
            treeckpt.load(
                {"w": torch.zeros(3, 4), "step": 0}, path, options=treeckpt.LoadOptions(timeout_s=5)
            )
        else:
            treeckpt.save(_new_tree(rank), path, options=opts)
    except treeckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.fixture
def old_ckpt(tmp_path: Path) -> str:
    path = str(tmp_path / "ckpt")
    treeckpt.save(OLD, path)
    return path


def _assert_old_intact(path: str) -> None:
    back = treeckpt.restore(path)
    assert torch.equal(back["w"], OLD["w"]) and back["step"] == 1
    assert len([n for n in os.listdir(path) if n.startswith("data-")]) == 1


@pytest.mark.parametrize("phase", ["describe", "write", "read"])
def test_rank_raising_makes_every_rank_raise(tmp_path: Path, old_ckpt: str, phase: str) -> None:
    results = run_ranks(2, _save_with_fault, tmp_path, old_ckpt, "raise", phase, timeout=60)
    for msg, _ in results:
        assert msg.startswith("RankFailureError"), msg
        assert "rank(s) 1" in msg and "disk on fire" in msg
    _assert_old_intact(old_ckpt)


@pytest.mark.parametrize(("kind", "phase"), [("exit", "write"), ("kill", "read")])
def test_rank_dying_mid_phase(tmp_path: Path, old_ckpt: str, kind: str, phase: str) -> None:
    results = run_ranks(
        2, _save_with_fault, tmp_path, old_ckpt, kind, phase, timeout=60, allow_dead=True
    )
    assert results[1] is DEAD
    msg, elapsed = results[0]
    assert msg.startswith(("CollectiveError", "RankFailureError")), msg
    assert elapsed < 30
    _assert_old_intact(old_ckpt)


@pytest.mark.parametrize("phase", ["describe", "write"])
def test_rank_stalling_is_named_within_timeout(tmp_path: Path, old_ckpt: str, phase: str) -> None:
    results = run_ranks(
        2, _save_with_fault, tmp_path, old_ckpt, "stall", phase, timeout=40, allow_dead=True
    )
    msg, elapsed = results[0]
    assert msg.startswith("CollectiveError"), msg
    assert "rank(s) 1 did not reach it" in msg
    assert elapsed < 30
    _assert_old_intact(old_ckpt)


def _disagree(rank: int, world: int, path: str) -> str:
    shape = (3, 4) if rank == 0 else (4, 4)
    try:
        treeckpt.save({"w": torch.zeros(shape)}, path)
    except treeckpt.CheckpointError as exc:
        return str(exc)
    return "no error"


def test_plan_error_on_coordinator_reaches_every_rank(tmp_path: Path, old_ckpt: str) -> None:
    for msg in run_ranks(2, _disagree, tmp_path, old_ckpt):
        assert (
            "plan failed on rank(s) 0" in msg and "w: rank 0 has dtype float32 shape [3, 4]" in msg
        )
    _assert_old_intact(old_ckpt)

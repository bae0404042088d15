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
        2, _save_with_fault, tmp_path, old_ckpt, "stall", phase, timeout=20, allow_dead=True
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


def _overlap(rank: int, world: int, path: str) -> str:
    from treeckpt.dcp._shards import ShardSet

    rows = (0, 3) if rank == 0 else (2, 2)  # rows 0-2 and 2-3 of 4: row 2 twice, not a replica
    w = ShardSet((4, 4), torch.float32, [((rows[0], 0), (rows[1], 4), torch.zeros(rows[1], 4))])
    try:
        treeckpt.save({"w": w}, path)
    except treeckpt.CheckpointError as exc:
        return str(exc)
    return "no error"


def test_plan_error_on_coordinator_reaches_every_rank(tmp_path: Path, old_ckpt: str) -> None:
    for msg in run_ranks(2, _overlap, tmp_path, old_ckpt):
        assert msg == (
            "plan failed on rank(s) 0: rank 0: PlanError: w: shards [offsets [0, 0], sizes "
            "[3, 4]] and [offsets [2, 0], sizes [2, 4]] overlap without being replicas"
        )
    _assert_old_intact(old_ckpt)


def test_shape_disagreement_reaches_every_rank(tmp_path: Path, old_ckpt: str) -> None:
    # Found when the ranks' trees are merged, on the coordinator; every rank raises it.
    for msg in run_ranks(2, _disagree, tmp_path, old_ckpt):
        assert msg == (
            "the ranks' trees contradict each other: 'w' is a tensor of different dtypes or "
            "shapes on different ranks (rank 0: torch tensor float32[3, 4]; rank 1: torch "
            "tensor float32[4, 4])"
        )
    _assert_old_intact(old_ckpt)


# ------------------------------------------------- every fault at every phase

#: phase -> (the rank that does that phase's work and fails, module, function name)
PHASES: dict[str, tuple[int, str, str]] = {
    "describe": (1, "treeckpt.shell.save", "local_shards"),
    "plan": (0, "treeckpt.shell.negotiate", "plan_save_table"),
    "write": (1, "treeckpt.shell.save", "write_chunks"),
    "commit": (0, "treeckpt.shell.save", "encode_manifest"),
    "load-manifest": (0, "treeckpt.shell.committed", "read_committed"),
    "load-read": (1, "treeckpt.shell.load", "read_chunks"),
}
KINDS = ("raise", "exit", "kill", "stall")


def _fault_in_phase(rank: int, world: int, path: str, kind: str, phase: str) -> tuple[str, float]:
    import importlib

    faulty, module, name = PHASES[phase]
    if rank == faulty:
        setattr(importlib.import_module(module), name, _fault(kind))
    start = time.monotonic()
    try:
        if phase.startswith("load"):
            treeckpt.load(
                {"w": torch.zeros(3, 4), "step": 0}, path, options=treeckpt.LoadOptions(timeout_s=5)
            )
        else:
            treeckpt.save(_new_tree(rank), path, options=treeckpt.SaveOptions(timeout_s=5))
    except treeckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - start
    return "no error", time.monotonic() - start


def check_fault(tmp_path: Path, path: str, kind: str, phase: str) -> None:
    """Every surviving rank raises within the timeout naming the faulty rank; nothing is
    committed; the previous checkpoint loads intact; the next save leaves only its files."""
    faulty = PHASES[phase][0]
    # A stalled rank is killed when the join times out, after the survivors' 5 s collective
    # timeout has made them raise.
    results = run_ranks(
        2,
        _fault_in_phase,
        tmp_path,
        path,
        kind,
        phase,
        timeout=20 if kind == "stall" else 60,
        allow_dead=True,
    )
    for rank, result in enumerate(results):
        if rank == faulty and kind != "raise":
            continue  # dead, or killed by the test harness while it stalled
        assert result is not DEAD, (rank, kind, phase)
        msg, elapsed = result
        assert msg.startswith(("RankFailureError", "CollectiveError")), (rank, kind, phase, msg)
        assert f"rank(s) {faulty}" in msg, (rank, kind, phase, msg)
        assert elapsed < 30, (rank, kind, phase, elapsed)
    back = treeckpt.restore(path)
    assert torch.equal(back["w"], OLD["w"]) and back["step"] == 1, (kind, phase)
    treeckpt.save(OLD, path)  # a retry works and removes what the failed save left
    live = treeckpt.metadata(path).save_id
    assert sorted(os.listdir(path)) == sorted([".metadata", "manifest.json", f"data-{live}"]), (
        kind,
        phase,
    )


@pytest.mark.parametrize(
    ("kind", "phase"),
    [
        ("kill", "plan"),
        ("kill", "commit"),
        ("stall", "commit"),
        ("raise", "load-manifest"),
        ("exit", "load-manifest"),
        ("kill", "load-read"),
    ],
)
def test_rank_dying_or_stalling_where_not_covered_above(
    tmp_path: Path, old_ckpt: str, kind: str, phase: str
) -> None:
    check_fault(tmp_path, old_ckpt, kind, phase)


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_fault_at_every_phase(tmp_path: Path, old_ckpt: str, kind: str, phase: str) -> None:
    check_fault(tmp_path, old_ckpt, kind, phase)

"""Save plans are reused across saves of the same layout, and only then.

A reused plan must write exactly what planning afresh would: every test
restores the checkpoint and compares it bit-exactly with what was saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt import asyncsave
from treeckpt.shell import save as save_mod
from treeckpt.shell.plancache import CachedPlan, PlanCache, PlanKey
from treeckpt.testing import assert_same_tree


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for every save, whether its plan came from the cache."""
    reused: list[bool] = []
    real = save_mod.prepare_save

    def prepare(*args: Any, **kwargs: Any) -> save_mod.PreparedSave:
        prepared = real(*args, **kwargs)
        reused.append(prepared.reused_plan)
        return prepared

    monkeypatch.setattr(save_mod, "prepare_save", prepare)
    monkeypatch.setattr(asyncsave, "prepare_save", prepare)
    return reused


def _tree(seed: int, **extra: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    tree: dict[str, Any] = {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g),
        "arr": np.arange(12, dtype=np.int64) + seed,
        "step": seed,
    }
    tree.update(extra)
    return tree


def _save_and_check(tree: dict[str, Any], path: Path, **kwargs: Any) -> None:
    treeckpt.save(tree, path, **kwargs)
    assert_same_tree(treeckpt.restore(path), tree)


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    save_mod.SHARED_PLAN_CACHE.clear()


def test_same_layout_reuses_the_plan_with_new_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reused = _spy(monkeypatch)
    for seed in range(3):
        _save_and_check(_tree(seed), tmp_path / "ck")  # same path: an overwrite
    _save_and_check(_tree(3), tmp_path / "other")  # the plan does not depend on the path
    assert reused == [False, True, True, True]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"w": torch.zeros(64, 33)}, id="shape"),
        pytest.param({"w": torch.zeros(64, 32, dtype=torch.float64)}, id="dtype"),
        pytest.param({"extra": torch.ones(3)}, id="new-tensor"),
        pytest.param({"b": 1.5}, id="tensor-became-a-value"),
    ],
)
def test_a_changed_tree_misses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any]
) -> None:
    reused = _spy(monkeypatch)
    _save_and_check(_tree(0), tmp_path / "ck")
    _save_and_check({**_tree(1), **change}, tmp_path / "ck")
    _save_and_check({**_tree(2), **change}, tmp_path / "ck")  # the new layout is kept
    assert reused == [False, False, True]


def test_renamed_or_reordered_tensors_miss_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reused = _spy(monkeypatch)
    t = _tree(0)
    _save_and_check(t, tmp_path / "ck")
    _save_and_check({"b": t["b"], "w": t["w"], "arr": t["arr"], "step": 0}, tmp_path / "ck")
    _save_and_check({"w2": t["w"], "b": t["b"], "arr": t["arr"], "step": 0}, tmp_path / "ck")
    assert reused == [False, False, False]


def test_other_chunk_bytes_misses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reused = _spy(monkeypatch)
    small = treeckpt.SaveOptions(chunk_bytes=1024)
    _save_and_check(_tree(0), tmp_path / "ck")
    _save_and_check(_tree(1), tmp_path / "ck", options=small)
    assert treeckpt.metadata(tmp_path / "ck").tensors["w"].chunks == 8  # 8 KiB in 1 KiB chunks
    _save_and_check(_tree(2), tmp_path / "ck")
    assert reused == [False, False, True]  # both layouts are kept


def test_the_cache_keeps_the_last_few_layouts() -> None:
    cache = PlanCache(max_entries=2)
    keys = [PlanKey(world_size=1, rank=0, chunk_bytes=n, specs=()) for n in range(1, 4)]
    for n, key in enumerate(keys):
        cache.store(key, CachedPlan(token=f"t{n}", items=()))
    assert cache.lookup(keys[0]) is None and len(cache) == 2
    found = cache.lookup(keys[2])
    assert found is not None and cache.by_token("t2") is found
    assert cache.by_token("t0") is None


def test_async_saves_reuse_the_plan_and_save_the_values_of_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reused = _spy(monkeypatch)
    saver = treeckpt.AsyncSaver()
    try:
        for seed in range(3):
            tree = _tree(seed)
            want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in tree.items()}
            fut = saver.save(tree, tmp_path / "ck")
            tree["w"].add_(1.0)  # training goes on
            fut.result(timeout=60)
            assert_same_tree(treeckpt.restore(tmp_path / "ck"), want)
    finally:
        saver.close()
    assert reused == [False, True, True]


# ------------------------------------------------------------------ two ranks


def _two_rank_saves(rank: int, world: int, path: str, scenario: str) -> list[bool]:
    """Three saves of a replicated tree; ``scenario`` changes what happens before the third."""
    reused: list[bool] = []
    real = save_mod.prepare_save

    def prepare(*args: Any, **kwargs: Any) -> save_mod.PreparedSave:
        prepared = real(*args, **kwargs)
        reused.append(prepared.reused_plan)
        return prepared

    save_mod.prepare_save = prepare  # type: ignore[assignment]  # a forked child's own module
    save_mod.SHARED_PLAN_CACHE.clear()
    for step in range(3):
        tree: dict[str, Any] = {"w": torch.full((16, 8), float(step)), "b": torch.arange(8.0)}
        if step == 2 and scenario == "rank0-reorders":
            # Rank 0's description changes, rank 1's does not: the coordinator
            # fills in rank 1's from its copy.
            tree = dict(reversed(tree.items())) if rank == 0 else tree
        if step == 2 and scenario == "coordinator-forgot" and rank == 0:
            # Rank 1 sends the token of a plan the coordinator no longer holds.
            save_mod.SHARED_PLAN_CACHE.clear()
        treeckpt.save(tree, path)
        back = treeckpt.restore(path)
        assert torch.equal(back["w"], torch.full((16, 8), float(step)))
        assert torch.equal(back["b"], torch.arange(8.0))
    return reused


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("scenario", "third"),
    [("same", True), ("rank0-reorders", False), ("coordinator-forgot", False)],
)
def test_two_ranks_reuse_a_plan_only_when_every_rank_and_the_coordinator_agree(
    tmp_path: Path, scenario: str, third: bool
) -> None:
    path = str(tmp_path / "ck")
    results = run_ranks(2, _two_rank_saves, tmp_path, path, scenario)
    for reused in results:
        assert reused == [False, True, third], (scenario, results)
    assert sorted(p.name for p in Path(path).iterdir()) == sorted(
        [".metadata", "manifest.json", f"data-{treeckpt.metadata(path).save_id}"]
    )

"""A multi-rank save stores the union of every rank's tree, and refuses contradictions.

Per-rank keys (a data loader's ``dp_rank_<r>``) are saved and load back on
the ranks that ask for them; a value or a replicated plain tensor that
differs between ranks under one FQN makes every rank raise, committing
nothing. Real processes on gloo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import treeckpt
from tests.dist_utils import DEAD, run_ranks
from treeckpt.store.backends import open_backend
from treeckpt.store.reader import read_manifest

pytestmark = pytest.mark.distributed

HINT = (
    'save per-rank state under per-rank keys (e.g. f"rng.rank_{rank}") or make it equal '
    "on every rank"
)
OLD = {"w": torch.arange(12.0).reshape(3, 4), "step": 1}


def _loader_state(rank: int) -> dict[str, Any]:
    return {"pos": 10 * rank + 3, "seed": bytes([rank]) * 5, "frac": 0.1 * (rank + 1)}


def _tree(rank: int) -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "step": 5,
        "dataloader": {f"dp_rank_{rank}": _loader_state(rank), "world_size": 2},
    }


def _template(rank: int) -> dict[str, Any]:
    return {
        "model": {"w": torch.zeros(2, 3)},
        "step": 0,
        "dataloader": {
            f"dp_rank_{rank}": {"pos": 0, "seed": b"", "frac": 0.0},
            "world_size": 0,
        },
    }


def _save_per_rank(rank: int, world: int, path: str) -> None:
    treeckpt.save(_tree(rank), path)


@pytest.fixture(scope="module")
def per_rank_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("union")
    path = str(tmp / "ckpt")
    run_ranks(2, _save_per_rank, tmp, path)
    return path


def _load_per_rank(rank: int, world: int, path: str, asks_for: str) -> dict[str, Any]:
    template = _template(rank)
    if asks_for == "both":  # another rank's key loads too, on the rank that asks for it
        template["dataloader"].update(_template(1 - rank)["dataloader"])
    out = treeckpt.load(template, path)
    assert out["model"]["w"].data_ptr() == template["model"]["w"].data_ptr()
    return {"w": out["model"]["w"].clone(), "step": out["step"], "dl": out["dataloader"]}


@pytest.mark.parametrize("asks_for", ["own", "both"])
def test_per_rank_keys_load_back_on_the_ranks_that_ask(
    per_rank_ckpt: str, tmp_path: Path, asks_for: str
) -> None:
    results = run_ranks(2, _load_per_rank, tmp_path, per_rank_ckpt, asks_for)
    for rank, got in enumerate(results):
        assert torch.equal(got["w"], torch.arange(6.0).reshape(2, 3))
        assert got["step"] == 5
        expected = {f"dp_rank_{rank}": _loader_state(rank), "world_size": 2}
        if asks_for == "both":
            expected[f"dp_rank_{1 - rank}"] = _loader_state(1 - rank)
        assert got["dl"] == expected
        for r in (0, 1) if asks_for == "both" else (rank,):
            assert got["dl"][f"dp_rank_{r}"]["frac"].hex() == (0.1 * (r + 1)).hex()


def test_the_manifest_records_which_ranks_held_each_per_rank_key(per_rank_ckpt: str) -> None:
    backend = open_backend(per_rank_ckpt)
    try:
        manifest = read_manifest(backend)
    finally:
        backend.close()
    assert manifest.holders == {
        f"dataloader.dp_rank_{r}.{k}": (r,) for r in (0, 1) for k in ("pos", "seed", "frac")
    }


def test_restore_returns_the_union_of_the_ranks_trees(per_rank_ckpt: str) -> None:
    back = treeckpt.restore(per_rank_ckpt)
    assert list(back) == ["model", "step", "dataloader"]
    assert list(back["dataloader"]) == ["dp_rank_0", "world_size", "dp_rank_1"]
    assert back["dataloader"]["dp_rank_0"] == _loader_state(0)
    assert back["dataloader"]["dp_rank_1"] == _loader_state(1)


def test_restart_on_one_rank_names_the_keys_no_rank_loads(per_rank_ckpt: str) -> None:
    # Saved on 2 ranks, loaded on 1: nobody asks for dataloader.dp_rank_1.
    with pytest.raises(treeckpt.LoadMismatchError) as info:
        treeckpt.load(_template(0), per_rank_ckpt)
    orphans = [f"dataloader.dp_rank_1.{k}" for k in ("pos", "seed", "frac")]
    assert info.value.unexpected == tuple(orphans)
    assert info.value.missing == ()
    assert str(info.value) == (
        "template does not match checkpoint; not in template (3): "
        + ", ".join(orphans)
        + " (pass strict=False to load the keys both sides have); saved only by ranks this "
        "load of 1 rank(s) does not have: " + ", ".join(f"{f} (rank 1)" for f in orphans)
    )
    out = treeckpt.load(_template(0), per_rank_ckpt, strict=False)
    assert out["dataloader"] == {"dp_rank_0": _loader_state(0), "world_size": 2}
    # A key rank 0 saved itself is still expected of rank 0.
    template = _template(0)
    del template["dataloader"]["dp_rank_0"]
    with pytest.raises(treeckpt.LoadMismatchError) as info:
        treeckpt.load(template, per_rank_ckpt)
    assert info.value.unexpected == (
        "dataloader.dp_rank_0.pos",
        "dataloader.dp_rank_0.seed",
        "dataloader.dp_rank_0.frac",
        *orphans,
    )


# ------------------------------------------------------------- contradictions


def _save_catching(rank: int, world: int, path: str, scenario: str) -> str:
    if scenario == "value":
        tree: dict[str, Any] = {"w": torch.ones(3, 4), "rng": {"seed": 1234 + rank}, "step": 2}
    elif scenario == "nan":  # nan == nan: no conflict
        tree = {"w": torch.ones(3, 4), "loss": float("nan"), "step": 2}
    elif scenario == "tensor-vs-value":
        tree = {"w": torch.ones(3, 4), "step": torch.tensor(2) if rank else 2}
    else:  # a replicated plain tensor with other bytes on rank 1
        w = torch.zeros(3, 4)
        if rank == 1:
            w[2, 3] = -0.0 if scenario == "replica-sign" else 2.0  # -0.0 == 0.0, other bits
        tree = {"w": w, "step": 2}
    try:
        if scenario.startswith("async"):
            treeckpt.async_save(tree, path).result(timeout=60)
        elif scenario == "replica-unchecked":
            treeckpt.save(tree, path, options=treeckpt.SaveOptions(check_replicas=False))
        else:
            treeckpt.save(tree, path)
    except treeckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _assert_old_intact(path: str) -> None:
    back = treeckpt.restore(path)
    assert torch.equal(back["w"], OLD["w"]) and back["step"] == 1
    assert sorted(n for n in os.listdir(path)) == [
        ".metadata",
        f"data-{treeckpt.metadata(path).save_id}",
        "manifest.json",
    ]


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (
            "value",
            "RankConflictError: the ranks' trees contradict each other: 'rng.seed' holds "
            f"different values on different ranks (rank 0: int 1234; rank 1: int 1235); {HINT}",
        ),
        (
            "tensor-vs-value",
            "RankConflictError: the ranks' trees contradict each other: 'step' is a tensor on "
            "some ranks and a value on others (rank 0: int 2; rank 1: torch tensor int64[])",
        ),
        (
            "replica",
            "RankConflictError: replicas differ between ranks: 'w': a plain tensor saved from "
            "several ranks with different bytes (rank 0 vs rank 1); only one copy would be "
            f"stored: {HINT}, or save it as a DTensor",
        ),
        (
            "replica-sign",
            "RankConflictError: replicas differ between ranks: 'w': a plain tensor saved from "
            "several ranks with different bytes (rank 0 vs rank 1); only one copy would be "
            f"stored: {HINT}, or save it as a DTensor",
        ),
        (
            "async-replica",
            "RankConflictError: replicas differ between ranks: 'w': a plain tensor saved from "
            "several ranks with different bytes (rank 0 vs rank 1); only one copy would be "
            f"stored: {HINT}, or save it as a DTensor",
        ),
    ],
)
def test_contradicting_ranks_raise_everywhere_and_commit_nothing(
    tmp_path: Path, scenario: str, expected: str
) -> None:
    path = str(tmp_path / "ckpt")
    treeckpt.save(OLD, path)
    assert run_ranks(2, _save_catching, tmp_path, path, scenario) == [expected, expected]
    _assert_old_intact(path)


def test_the_replica_check_can_be_turned_off(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    got = run_ranks(2, _save_catching, tmp_path, path, "replica-unchecked")
    assert got == ["no error", "no error"]
    assert treeckpt.restore(path)["step"] == 2


def test_nan_on_every_rank_is_one_value(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, _save_catching, tmp_path, path, "nan") == ["no error", "no error"]
    assert treeckpt.restore(path)["loss"].hex() == float("nan").hex()


def _async_then_mutate(rank: int, world: int, path: str) -> bool:
    w = torch.arange(1 << 16, dtype=torch.float32)
    fut = treeckpt.async_save({"w": w, "b": torch.ones(8)}, path)
    w.add_(rank + 1)  # training goes on, differently on each rank, after staging
    fut.result(timeout=60)
    return True


def test_async_replicas_are_compared_as_staged_not_as_later_changed(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, _async_then_mutate, tmp_path, path) == [True, True]
    back = treeckpt.restore(path)
    assert torch.equal(back["w"], torch.arange(1 << 16, dtype=torch.float32))


# ---------------------------------------------------------------- collectives


def _count_collectives(rank: int, world: int, path: str) -> tuple[list[list[str]], list[bool]]:
    import treeckpt.shell.save as save_mod
    from treeckpt.shell.dist import DistCoordinator

    reused: list[bool] = []
    real_prepare = save_mod.prepare_save

    def prepare(*args: Any, **kwargs: Any) -> Any:
        prepared = real_prepare(*args, **kwargs)
        reused.append(prepared.reused_plan)
        return prepared

    save_mod.prepare_save = prepare  # type: ignore[assignment]  # a forked child's own module
    save_mod.SHARED_PLAN_CACHE.clear()
    calls: list[str] = []
    for name in ("gather", "scatter", "broadcast"):
        real = getattr(DistCoordinator, name)

        def spy(self: Any, obj: Any, phase: str, _real: Any = real, _name: str = name) -> Any:
            calls.append(f"{_name}:{phase}")
            return _real(self, obj, phase)

        setattr(DistCoordinator, name, spy)
    out = []
    for tree in (
        {"w": torch.ones(4), "step": 1},  # alike: 4 collectives
        {"w": torch.ones(4), "step": 2},  # alike, the plan cached: 4 collectives
        {"w": torch.ones(4), "step": 3, f"rng_{rank}": rank},  # per-rank keys: 6
        {"w": torch.ones(4), "step": 4, f"rng_{rank}": rank},  # per-rank keys, cached plan: 6
    ):
        calls.clear()
        treeckpt.save(tree, path)
        out.append(list(calls))
    return out, reused


def test_alike_ranks_cost_four_collectives_and_per_rank_keys_two_more(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    alike = ["gather:plan", "scatter:assign", "gather:write", "broadcast:commit"]
    union = ["gather:plan", "scatter:assign", "gather:tree", "scatter:assign", *alike[2:]]
    for calls, reused in run_ranks(2, _count_collectives, tmp_path, path):
        assert calls == [alike, alike, union, union]
        # The plan is cached across the saves (the tensors' layout never changes):
        # the digests ride with the plan tokens.
        assert reused == [False, True, True, True]
    back = treeckpt.restore(path)
    assert back == {"w": back["w"], "step": 4, "rng_0": 0, "rng_1": 1}


# ------------------------------------------------------------------- faults


def _fault_in_tree_phase(rank: int, world: int, path: str, kind: str) -> str:
    import treeckpt.shell.negotiate as negotiate_mod

    def bad(*args: Any) -> Any:
        if kind == "exit":
            os._exit(3)
        raise OSError("disk on fire")

    if rank == 1 and kind == "exit":
        negotiate_mod.describe_parts = bad  # type: ignore[assignment]  # a forked child's own module
    if rank == 0 and kind == "raise":
        negotiate_mod.merge_trees = bad  # type: ignore[assignment]
    try:
        treeckpt.save(
            {"w": torch.ones(2), f"k{rank}": 1}, path, options=treeckpt.SaveOptions(timeout_s=5)
        )
    except treeckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_rank_dying_while_trees_are_gathered_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    treeckpt.save(OLD, path)
    results = run_ranks(2, _fault_in_tree_phase, tmp_path, path, "exit", allow_dead=True)
    assert results[1] is DEAD
    assert results[0].startswith(
        "CollectiveError: phase 'tree' failed on rank 0 within the 5 s timeout: rank(s) 1 did "
        "not reach it (dead or stalled)"
    )
    _assert_old_intact(path)


def test_a_merge_failing_on_the_coordinator_reaches_every_rank(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    treeckpt.save(OLD, path)
    expected = "RankFailureError: tree failed on rank(s) 0: rank 0: OSError: disk on fire"
    assert run_ranks(2, _fault_in_tree_phase, tmp_path, path, "raise") == [expected, expected]
    _assert_old_intact(path)

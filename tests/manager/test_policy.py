"""Retention and interval policies (pure): every policy, edge cases, properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treeckpt.errors import OptionsError
from treeckpt.manager.policy import KeepPolicy, SavePolicy, StepRecord, steps_to_keep


def _steps(losses: dict[int, float | None]) -> list[StepRecord]:
    return [StepRecord(step=s, metrics={} if v is None else {"loss": v}) for s, v in losses.items()]


def test_no_policy_keeps_everything() -> None:
    assert steps_to_keep(_steps({1: 1.0, 2: 2.0, 3: None}), KeepPolicy()) == {1, 2, 3}


def test_max_to_keep_keeps_the_newest() -> None:
    steps = _steps({s: None for s in (10, 20, 30, 40, 50)})
    assert steps_to_keep(steps, KeepPolicy(max_to_keep=2)) == {40, 50}
    assert steps_to_keep(steps, KeepPolicy(max_to_keep=1)) == {50}
    assert steps_to_keep(steps, KeepPolicy(max_to_keep=9)) == {10, 20, 30, 40, 50}


@pytest.mark.parametrize(("mode", "best"), [("min", {20, 30}), ("max", {10, 40})])
def test_keep_best_by_metric_plus_the_newest(mode: str, best: set[int]) -> None:
    steps = _steps({10: 5.0, 20: 1.0, 30: 2.0, 40: 4.0, 50: 3.0})
    policy = KeepPolicy(keep_best=2, best_metric="loss", best_mode=mode)  # type: ignore[arg-type]
    assert steps_to_keep(steps, policy) == best | {50}


def test_count_and_best_together() -> None:
    steps = _steps({10: 0.5, 20: 3.0, 30: 2.0, 40: 4.0, 50: 9.0})
    policy = KeepPolicy(max_to_keep=2, keep_best=1, best_metric="loss", best_mode="min")
    assert steps_to_keep(steps, policy) == {10, 40, 50}


def test_steps_without_the_metric_are_never_best_but_the_newest_is_kept() -> None:
    steps = _steps({10: None, 20: 1.0, 30: None, 40: float("nan")})
    policy = KeepPolicy(keep_best=1, best_metric="loss", best_mode="min")
    assert steps_to_keep(steps, policy) == {20, 40}


def test_ties_prefer_the_newer_step() -> None:
    steps = _steps({10: 1.0, 20: 1.0, 30: 5.0})
    policy = KeepPolicy(keep_best=1, best_metric="loss", best_mode="min")
    assert steps_to_keep(steps, policy) == {20, 30}


def test_empty() -> None:
    assert steps_to_keep([], KeepPolicy(max_to_keep=1)) == set()


@given(
    st.dictionaries(
        st.integers(0, 10**6), st.one_of(st.none(), st.floats(-10, 10)), min_size=1, max_size=30
    ),
    st.one_of(st.none(), st.integers(1, 5)),
    st.one_of(st.none(), st.integers(1, 5)),
    st.sampled_from(["min", "max"]),
)
def test_the_newest_is_always_kept_and_counts_hold(
    losses: dict[int, float | None], count: int | None, best: int | None, mode: str
) -> None:
    policy = KeepPolicy(
        max_to_keep=count,
        keep_best=best,
        best_metric="loss" if best else None,
        best_mode=mode,  # type: ignore[arg-type]
    )
    kept = steps_to_keep(_steps(losses), policy)
    assert max(losses) in kept
    assert kept <= set(losses)
    if count is None and best is None:
        assert kept == set(losses)
    else:
        assert len(kept) <= 1 + (count or 0) + (best or 0)
    if count is not None:
        assert set(sorted(losses)[-count:]) <= kept


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_to_keep": 0},
        {"max_to_keep": -1},
        {"keep_best": 2},
        {"best_metric": "loss"},
        {"keep_best": 1, "best_metric": "loss", "best_mode": "up"},
    ],
)
def test_bad_keep_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(OptionsError):
        KeepPolicy(**kwargs)  # type: ignore[arg-type]


def test_save_interval_by_steps() -> None:
    p = SavePolicy(every_steps=10)
    assert p.is_due(3, last_save_time=None, now=0.0)  # the first step is always due
    assert [s for s in range(1, 35) if p.is_due(s, last_save_time=0.0, now=1.0)] == [10, 20, 30]


def test_save_interval_by_time_or_steps() -> None:
    p = SavePolicy(every_steps=100, every_seconds=60.0)
    assert not p.is_due(7, last_save_time=0.0, now=59.0)
    assert p.is_due(7, last_save_time=0.0, now=60.0)
    assert p.is_due(200, last_save_time=0.0, now=1.0)
    assert SavePolicy().is_due(7, last_save_time=0.0, now=0.0)


@pytest.mark.parametrize(
    "kwargs", [{"every_steps": 0}, {"every_seconds": 0.0}, {"every_seconds": float("inf")}]
)
def test_bad_save_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(OptionsError):
        SavePolicy(**kwargs)  # type: ignore[arg-type]

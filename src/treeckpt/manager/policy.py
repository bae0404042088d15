"""Pure decisions of a checkpoint manager: when to save and which steps to keep.

No files, no clocks: every function is a function of plain values, so the
policies are tested exhaustively without saving anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from treeckpt.errors import OptionsError

__all__ = ["KeepPolicy", "SavePolicy", "StepRecord", "check_metrics", "steps_to_keep"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """What retention needs to know of one committed step."""

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepPolicy:
    """Which committed steps to keep.

    Args:
        max_to_keep: keep the newest N steps (``None``: keep every step, unless
            ``keep_best`` is set, which then decides alone).
        keep_best: also keep the N best steps by ``best_metric``.
        best_metric: the metric ``keep_best`` ranks by; steps saved without it
            are never among the best.
        best_mode: ``"max"`` (higher is better, accuracy) or ``"min"`` (loss).

    The newest committed step is always kept, whatever the policy: a manager
    never deletes the last good checkpoint.
    """

    max_to_keep: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"

    def __post_init__(self) -> None:
        for name in ("max_to_keep", "keep_best"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 1):
                raise OptionsError(f"{name} must be a positive int or None, got {v!r}")
        if (self.keep_best is None) != (self.best_metric is None):
            raise OptionsError("keep_best and best_metric must be given together")
        if self.best_mode not in ("max", "min"):
            raise OptionsError(f"best_mode must be 'max' or 'min', got {self.best_mode!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SavePolicy:
    """When ``save`` writes a step: every ``every_steps`` steps and/or ``every_seconds``.

    A step is due when it is a multiple of ``every_steps`` (when set) or when
    ``every_seconds`` have passed since the last save (when set); with
    neither, every step is due. The first step a manager sees is always due.
    """

    every_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.every_steps is not None and (
            type(self.every_steps) is not int or self.every_steps < 1
        ):
            raise OptionsError(f"every_steps must be a positive int, got {self.every_steps!r}")
        if self.every_seconds is not None and not (
            math.isfinite(self.every_seconds) and self.every_seconds > 0
        ):
            raise OptionsError(f"every_seconds must be positive, got {self.every_seconds!r}")

    def is_due(self, step: int, *, last_save_time: float | None, now: float) -> bool:
        """Whether ``step`` should be saved (``last_save_time`` is ``None`` before any save)."""
        if self.every_steps is None and self.every_seconds is None:
            return True
        if last_save_time is None:
            return True
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and now - last_save_time >= self.every_seconds


def steps_to_keep(steps: Sequence[StepRecord], policy: KeepPolicy) -> set[int]:
    """The steps ``policy`` keeps among committed ``steps`` (the newest one always)."""
    if not steps:
        return set()
    order = sorted(steps, key=lambda r: r.step)
    keep = {order[-1].step}
    if policy.max_to_keep is None and policy.keep_best is None:
        return {r.step for r in order}
    if policy.max_to_keep is not None:
        keep.update(r.step for r in order[-policy.max_to_keep :])
    if policy.keep_best is not None and policy.best_metric is not None:
        metric = policy.best_metric
        scored = [
            r
            for r in order
            if isinstance(r.metrics.get(metric), int | float) and not math.isnan(r.metrics[metric])
        ]
        sign = -1.0 if policy.best_mode == "max" else 1.0
        # Best first; on equal scores the newer step wins.
        scored.sort(key=lambda r: (sign * float(r.metrics[metric]), -r.step))
        keep.update(r.step for r in scored[: policy.keep_best])
    return keep


def check_metrics(metrics: Mapping[str, float] | None) -> None:
    """Refuse metrics retention cannot rank: keys must be str, values finite numbers.

    Raises:
        OptionsError: naming the metrics given.
    """
    if metrics is None:
        return
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str)
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        for k, v in metrics.items()
    ):
        raise OptionsError(f"metrics must map str to finite numbers, got {metrics!r}")

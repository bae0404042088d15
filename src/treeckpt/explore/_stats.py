"""Summary statistics of a tensor, accumulated piece by piece.

A tensor of any size is summarised without holding it in memory: each
stored chunk (or slab of one) is reduced to a count, mean and sum of squared
deviations, and the pieces are merged with Chan et al.'s pairwise formula,
which stays accurate where a running sum of squares would cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["StatsAccumulator", "TensorStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorStats:
    """Summary statistics of one tensor.

    ``min``, ``max``, ``mean`` and ``std`` are taken over the finite elements
    only (``nan`` and ``inf`` are counted apart, so one bad value does not
    hide the rest); ``None`` when there is no finite element. ``std`` is the
    sample standard deviation (``torch.std``'s default, correction 1).
    Complex tensors are summarised by magnitude; booleans as 0 and 1.
    """

    numel: int
    finite: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    nan: int
    inf: int
    zeros: int

    def __str__(self) -> str:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.6g}"

        return (
            f"numel {self.numel:,}  min {f(self.min)}  max {f(self.max)}  mean {f(self.mean)}  "
            f"std {f(self.std)}  nan {self.nan:,}  inf {self.inf:,}  zeros {self.zeros:,}"
        )


class StatsAccumulator:
    """Merge the statistics of successive pieces of one tensor."""

    def __init__(self) -> None:
        self.numel = 0
        self.count = 0  # finite elements
        self.mean = 0.0
        self.m2 = 0.0
        self.lo: float | None = None
        self.hi: float | None = None
        self.nan = 0
        self.inf = 0
        self.zeros = 0

    def add(self, piece: torch.Tensor) -> None:
        """Fold in one piece (any shape, any dtype of the format)."""
        t = piece.detach().reshape(-1)
        self.numel += t.numel()
        if t.numel() == 0:
            return
        if t.is_complex():
            t = t.abs()
        if t.dtype == torch.bool or not t.is_floating_point():
            self.zeros += int((t == 0).sum())
            x = t.to(torch.float64)
            exact = t.to(torch.int64) if t.dtype != torch.uint64 else None
            self._fold(x, exact)
            return
        x = t.to(torch.float64)  # bfloat16 and float8 have no arithmetic of their own on CPU
        nan = torch.isnan(x)
        inf = torch.isinf(x)
        n_nan, n_inf = int(nan.sum()), int(inf.sum())
        self.nan += n_nan
        self.inf += n_inf
        self.zeros += int((x == 0).sum())
        if n_nan or n_inf:
            x = x[~(nan | inf)]
        self._fold(x, None)

    def _fold(self, x: torch.Tensor, exact: torch.Tensor | None) -> None:
        n = x.numel()
        if n == 0:
            return
        src = exact if exact is not None else x
        lo, hi = float(src.min()), float(src.max())
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def result(self) -> TensorStats:
        has = self.count > 0
        return TensorStats(
            numel=self.numel,
            finite=self.count,
            min=self.lo,
            max=self.hi,
            mean=self.mean if has else None,
            std=math.sqrt(self.m2 / (self.count - 1))
            if self.count > 1
            else (math.nan if has else None),
            nan=self.nan,
            inf=self.inf,
            zeros=self.zeros,
        )

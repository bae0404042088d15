"""Plan items shared by the object and the columnar planners."""

from __future__ import annotations

from dataclasses import dataclass

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info

__all__ = ["TensorMeta", "WriteItem", "fmt_bytes"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorMeta:
    """A tensor's global description."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteItem:
    """Rank ``rank`` writes region ``chunk`` of ``fqn``, taken from its local ``shard`` box."""

    fqn: str
    dtype: str
    rank: int
    shard: Box
    chunk: Box

    @property
    def nbytes(self) -> int:
        return self.chunk.volume * dtype_info(self.dtype).itemsize


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"

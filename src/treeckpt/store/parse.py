"""Field parsing shared by every decoder of untrusted index data (manifest, codecs)."""

from __future__ import annotations

from typing import Any

from treeckpt.errors import ManifestError

__all__ = ["MAX_INT", "parse_int"]

#: the largest integer any field may hold (sizes and offsets stay far below it)
MAX_INT = 1 << 62


def parse_int(value: Any, where: str, *, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` when it is an integer (not a bool) in ``[lo, hi)``; else ManifestError naming ``where``."""
    if type(value) is not int or not lo <= value < hi:
        raise ManifestError(
            f"{where}: expected an integer in [{lo}, {hi}), got {str(value)[:40]!r}"
        )
    return value

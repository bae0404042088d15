"""Field parsing shared by every decoder of untrusted index data (manifest, codecs)."""

from __future__ import annotations

from typing import Any

from treeckpt.core.manifest import FORMAT_VERSION
from treeckpt.errors import ManifestError

__all__ = ["MAX_INT", "check_format_version", "parse_int"]

#: the largest integer any field may hold (sizes and offsets stay far below it)
MAX_INT = 1 << 62


def parse_int(value: Any, where: str, *, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` when it is an integer (not a bool) in ``[lo, hi)``; else ManifestError naming ``where``."""
    if type(value) is not int or not lo <= value < hi:
        raise ManifestError(
            f"{where}: expected an integer in [{lo}, {hi}), got {str(value)[:40]!r}"
        )
    return value


def check_format_version(version: int, where: str) -> None:
    """Refuse a format version this treeckpt cannot read, naming ``where``."""
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format version {version} is newer than this treeckpt reads "
            f"({FORMAT_VERSION}); upgrade treeckpt"
        )
    if version < 1:
        raise ManifestError(f"{where}: bad format version {version}")

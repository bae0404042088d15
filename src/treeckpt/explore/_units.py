"""Sizes and ratios as people read them, shared by every rendering of a checkpoint.

A leaf of ``treeckpt.explore``: it imports nothing from the package, so the
renderers of groups (``_display``) and of tensors (``_handle``) share it
without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["codecs_text", "fmt_size", "ratio"]


def fmt_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 12.3 MiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError  # pragma: no cover


def ratio(raw: int, stored: int) -> str:
    """Raw over stored bytes: ``2.13x`` (``-`` when nothing is stored)."""
    return f"{raw / stored:.2f}x" if stored else "-"


def codecs_text(cs: Mapping[str, int]) -> str:
    """A tensor's codecs, the most used first: ``zstd`` or ``zstd(3) raw(1)``."""
    if len(cs) <= 1:
        return next(iter(cs), "-")
    return " ".join(f"{c}({n})" for c, n in sorted(cs.items(), key=lambda kv: -kv[1]))

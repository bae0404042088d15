"""Sizes and ratios as people read them, shared by every rendering of a checkpoint
(sizes are ``core.sizes.fmt_size``, the one byte formatter of the package).

A leaf of ``treeckpt.explore``: it imports nothing from the package, so the
renderers of groups (``_display``) and of tensors (``_handle``) share it
without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping

from treeckpt.core.sizes import fmt_size

__all__ = ["codecs_text", "fmt_size", "ratio"]


def ratio(raw: int, stored: int) -> str:
    """Raw over stored bytes: ``2.13x`` (``-`` when nothing is stored)."""
    return f"{raw / stored:.2f}x" if stored else "-"


def codecs_text(cs: Mapping[str, int]) -> str:
    """A tensor's codecs, the most used first: ``zstd`` or ``zstd(3) raw(1)``."""
    if len(cs) <= 1:
        return next(iter(cs), "-")
    return " ".join(f"{c}({n})" for c, n in sorted(cs.items(), key=lambda kv: -kv[1]))

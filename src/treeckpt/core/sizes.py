"""Byte counts for people, the one formatter every report and listing uses."""

from __future__ import annotations

__all__ = ["fmt_size"]


def fmt_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 12.3 MiB (binary units, three significant digits).

    >>> fmt_size(512), fmt_size(1536), fmt_size(3 << 30)
    ('512 B', '1.5 KiB', '3 GiB')
    """
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError  # pragma: no cover

"""Field parsing shared by every decoder of untrusted index data (manifest, codecs)."""

from __future__ import annotations

from typing import Any

from treeckpt.core.manifest import FORMAT_VERSION, DataFile
from treeckpt.errors import ManifestError
from treeckpt.store import layout

__all__ = ["MAX_INT", "check_format_version", "parse_data_files", "parse_int"]

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


def parse_data_files(raw: Any, save_id: str, rank: int, where: str) -> list[DataFile]:
    """A chunk index's ``files`` list (either index form), every name and size checked.

    A name is a data file of this save and rank or (incremental saves) a data
    file of a sibling checkpoint, named by the only pattern that may leave
    this one.
    """
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: files is missing")
    files = []
    for n, rf in enumerate(raw):
        if not (isinstance(rf, list) and len(rf) == 2):
            raise ManifestError(f"{where}: files[{n}] malformed")
        name, size = rf
        if not (layout.is_data_file(name, save_id, rank) or layout.is_reference_file(name)):
            raise ManifestError(
                f"{where}: files[{n}] name {str(name)[:80]!r} is not one of this save's"
            )
        files.append(DataFile(name=name, size=parse_int(size, f"{where}: files[{n}] size")))
    return files

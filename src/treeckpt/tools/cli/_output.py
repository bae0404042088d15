"""How the commands print: for a terminal or a pipe, JSON documents, aligned columns, progress."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["ProgressBar", "aligned", "is_terminal", "json_safe", "print_json", "progress_bar"]


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is an interactive terminal (rich output) rather than a pipe or file."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def aligned(rows: list[list[str]], right: set[int]) -> Iterator[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        yield "  ".join(cells).rstrip()


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)  # 'inf', 'nan': strict JSON has no such numbers
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(json_safe(doc), indent=2, allow_nan=False))


class ProgressBar:
    """A rich progress bar of bytes on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, enabled: bool) -> None:
        self._label = label
        self._enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int | None) -> None:
        """Show the bar; ``total`` bytes (``None`` when unknown: a pulsing bar)."""
        if not self._enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self._label, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[ProgressBar]:
    bar = ProgressBar(label, is_terminal(sys.stderr))
    try:
        yield bar
    finally:
        bar.close()

"""What the commands share on their command line: help text layout and argument types."""

from __future__ import annotations

import argparse
import math
import re
import textwrap

__all__ = [
    "FORMATTER",
    "Subparsers",
    "byte_size",
    "help_text",
    "positive_int",
    "tolerance",
]

#: Keeps each command's examples as written (``help_text`` wraps the paragraphs).
FORMATTER = argparse.RawDescriptionHelpFormatter

#: What ``ArgumentParser.add_subparsers`` returns: each command's parser is added to it.
Subparsers = argparse._SubParsersAction


def help_text(*paragraphs: str) -> str:
    """Paragraphs wrapped for the help screen (the raw formatter keeps the examples as written)."""
    return "\n\n".join(textwrap.fill(p, 79) for p in paragraphs)


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def tolerance(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def byte_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 512MiB, 8GiB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return n

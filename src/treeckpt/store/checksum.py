"""Chunk and manifest checksums: xxh3-64.

xxh3 runs at over 10 GB/s per core (measured about 9.7 GB/s here), so checking
every byte costs far less than reading it. It is not a cryptographic hash:
it detects corruption, not tampering; a hostile writer can forge it, which is
why every other field is validated independently.
"""

from __future__ import annotations

import re

import xxhash

__all__ = [
    "ALGORITHM",
    "BytesLike",
    "checksum",
    "content_digest",
    "is_checksum",
    "is_content_digest",
]

BytesLike = bytes | bytearray | memoryview

ALGORITHM = "xxh3-64"
_PATTERN = re.compile(r"xxh3-64:[0-9a-f]{16}")


def checksum(data: BytesLike) -> str:
    """``"xxh3-64:<16 hex digits>"`` of ``data``."""
    return f"{ALGORITHM}:{xxhash.xxh3_64_hexdigest(data)}"


_PATTERNS = re.compile(r"(?:xxh3-64:[0-9a-f]{16}\n)*")


def is_checksum(value: object) -> bool:
    return isinstance(value, str) and _PATTERN.fullmatch(value) is not None


def are_checksums(values: list[object]) -> bool:
    """Whether every element is a checksum (one regex pass over them all)."""
    if not all(type(v) is str and len(v) == 24 for v in values):
        return False
    return _PATTERNS.fullmatch("\n".join(values) + "\n" if values else "") is not None  # type: ignore[arg-type]


_DIGEST = re.compile(r"xxh3-128:[0-9a-f]{32}")


def content_digest(data: BytesLike) -> str:
    """``"xxh3-128:<32 hex digits>"`` of a chunk's raw bytes (incremental saves).

    128 bits make an accidental match between two different chunks negligible
    (about 2^-64 after 2^32 chunks); the stored checksum still guards every read.
    """
    return f"xxh3-128:{xxhash.xxh3_128_hexdigest(data)}"


def is_content_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None

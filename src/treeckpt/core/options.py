"""Explicit options (never ambient state)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from treeckpt.errors import OptionsError

__all__ = ["LoadOptions", "SaveOptions"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveOptions:
    """How a save stores its bytes.

    Attributes:
        chunk_bytes: largest raw size of one stored chunk. Chunks are the unit
            of compression, checksumming and partial reads.
        compress: ``"auto"`` compresses the byte planes of a chunk that a
            sample shows pay (for floats: the sign and exponent byte, not the
            mantissa bytes), ``"always"`` compresses every byte plane (storing
            the chunk raw only when that makes it larger), ``"never"`` stores
            raw bytes.
        zstd_level: zstandard level (1 is fast; higher is smaller and slower).
        min_ratio: in ``"auto"``, compress a chunk only when its sample, with
            the byte planes that shrink by 1.1x or more compressed, shrinks to
            at most ``1 / min_ratio`` of its size.
        io_threads: threads per rank that encode and write chunks; each
            writes its own data file.
        sync: fsync data files, the manifest and the directory (durability).
            Turn off only for throwaway checkpoints.
        timeout_s: with several ranks, how long any rank waits for the others
            in one phase before every surviving rank raises, naming the ranks
            that never arrived. ``None`` (the default) is the timeout of the
            process group the save runs on (the default group's when none is
            given), so a job that chose a short timeout fails as fast.
        block_bytes: raw chunks larger than this also get one checksum per
            block of this size, so a load that needs part of a chunk (another
            sharding) reads and verifies only those blocks. 0 turns it off.
        compressed_block_bytes: compressed chunks are encoded in independent
            blocks of this many raw bytes, each with its own checksum, so a
            load that needs part of a chunk decodes only those blocks. 0 makes
            one block per chunk.
        check_replicas: with several ranks, compare the bytes of every plain
            (not sharded) tensor that several ranks hold, by an xxh3 digest of
            each rank's copy, and refuse the save when they differ (only one
            copy is stored). Costs a read of those tensors on every rank
            holding them (see the performance page); turn off only when the
            replicas are known to be identical.
    """

    chunk_bytes: int = 16 * MiB
    compress: Literal["auto", "always", "never"] = "auto"
    zstd_level: int = 1
    min_ratio: float = 1.3
    io_threads: int = 2
    sync: bool = True
    timeout_s: float | None = None
    block_bytes: int = 64 << 10
    compressed_block_bytes: int = 256 << 10
    check_replicas: bool = True

    def __post_init__(self) -> None:
        if self.block_bytes < 0:
            raise OptionsError(f"block_bytes must be >= 0, got {self.block_bytes}")
        if self.compressed_block_bytes < 0:
            raise OptionsError(
                f"compressed_block_bytes must be >= 0, got {self.compressed_block_bytes}"
            )
        if self.chunk_bytes < 1:
            raise OptionsError(f"chunk_bytes must be positive, got {self.chunk_bytes}")
        if self.compress not in ("auto", "always", "never"):
            raise OptionsError(
                f"compress must be 'auto', 'always' or 'never', got {self.compress!r}"
            )
        if self.io_threads < 1:
            raise OptionsError(f"io_threads must be at least 1, got {self.io_threads}")
        _check_timeout(self.timeout_s)
        if not -7 <= self.zstd_level <= 22:
            raise OptionsError(f"zstd_level must be in [-7, 22], got {self.zstd_level}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOptions:
    """How a load reads its bytes.

    Attributes:
        io_threads: threads per rank that read, verify and decode chunks.
        timeout_s: with several ranks, how long any rank waits for the others.
            ``None`` (the default) is the timeout of the process group the
            load runs on (the default group's when none is given).
    """

    io_threads: int = 4
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.io_threads < 1:
            raise OptionsError(f"io_threads must be at least 1, got {self.io_threads}")
        _check_timeout(self.timeout_s)


def _check_timeout(timeout_s: float | None) -> None:
    """``None`` (the process group's timeout) or a positive, finite number of seconds."""
    if timeout_s is None:
        return
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise OptionsError(
            f"timeout_s must be a positive, finite number of seconds or None "
            f"(the process group's timeout), got {timeout_s!r}"
        )

"""Explicit options (never ambient state)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from treeckpt.errors import OptionsError

__all__ = ["Compression", "LoadOptions", "LossyCasts", "SaveOptions"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Compression:
    """How a save encodes each chunk: every setting of the chunk codecs, in one place.

    One frozen value (``SaveOptions(compression=Compression(...))``) so that
    the block sizes of compressed and of raw chunks, and the zstandard level,
    cannot be mistaken for the chunking of the save (``SaveOptions.chunk_bytes``).

    Attributes:
        mode: ``"adaptive"`` (the default) compresses only the chunks that
            make the save faster: from a sample of this state (how fast it
            encodes and how much it shrinks, per dtype) and the write rate of
            the storage (measured while saving, kept from earlier saves to the
            same place in this process), it compresses while the storage
            is the bottleneck and writes the rest raw; on storage that writes
            faster than the cores compress nothing is compressed.
            ``"auto"`` compresses every chunk whose sample shows it shrinks
            by ``min_ratio`` (for floats: the sign and exponent byte, not the
            mantissa bytes), however long that takes: for the smallest files
            (``min_ratio=1.1`` also compresses fp32). ``"always"`` compresses
            every byte plane (storing the chunk raw only when that makes it
            larger), ``"never"`` stores raw bytes.
        level: zstandard level, -7 to 22 (1 is fast; higher is smaller and
            slower).
        min_ratio: in ``"auto"``, compress a chunk only when its sample, with
            the byte planes that shrink by 1.1x or more compressed, shrinks to
            at most ``1 / min_ratio`` of its size. ``"adaptive"`` weighs time,
            not this threshold: a chunk it compresses need only shrink by
            1.05x.
        block_bytes: compressed chunks are encoded in independent blocks of
            this many raw bytes, each with its own checksum, so a load that
            needs part of a chunk decodes only those blocks. 0 makes one block
            per chunk.
        raw_chunk_block_bytes: chunks stored raw (not compressed) and larger
            than this get one checksum per block of this size, so a load that
            needs part of a chunk (another sharding) reads and verifies only
            those blocks. 0 turns it off.
    """

    mode: Literal["adaptive", "auto", "always", "never"] = "adaptive"
    level: int = 1
    min_ratio: float = 1.3
    block_bytes: int = 256 << 10
    raw_chunk_block_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        if self.mode not in ("adaptive", "auto", "always", "never"):
            raise OptionsError(
                "Compression.mode must be 'adaptive', 'auto', 'always' or 'never', "
                f"got {self.mode!r}"
            )
        if isinstance(self.level, bool) or not isinstance(self.level, int):
            raise OptionsError(f"Compression.level must be an integer, got {self.level!r}")
        if not -7 <= self.level <= 22:
            raise OptionsError(f"Compression.level must be in [-7, 22], got {self.level}")
        if (
            isinstance(self.min_ratio, bool)
            or not isinstance(self.min_ratio, int | float)
            or not math.isfinite(self.min_ratio)
            or self.min_ratio <= 0
        ):
            raise OptionsError(
                f"Compression.min_ratio must be a positive, finite number, got {self.min_ratio!r}"
            )
        for name in ("block_bytes", "raw_chunk_block_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OptionsError(
                    f"Compression.{name} must be an integer >= 0 (0: off), got {value!r}"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveOptions:
    """How a save stores its bytes.

    Attributes:
        chunk_bytes: largest raw size of one stored chunk. Chunks are the unit
            of compression, checksumming and partial reads.
        compression: how each chunk is encoded (see :class:`Compression`).
        io_threads: threads per rank that encode and write chunks; each
            writes its own data file.
        sync: fsync data files, the manifest and the directory (durability).
            Turn off only for throwaway checkpoints.
        timeout_s: with several ranks, how long any rank waits for the others
            in one phase before every surviving rank raises, naming the ranks
            that never arrived. ``None`` (the default) is the timeout of the
            process group the save runs on (the default group's when none is
            given), so a job that chose a short timeout fails as fast.
        check_replicas: with several ranks, compare the bytes of every plain
            (not sharded) tensor that several ranks hold, by an xxh3 digest of
            each rank's copy, and refuse the save when they differ (only one
            copy is stored). Costs a read of those tensors on every rank
            holding them (see the performance page); turn off only when the
            replicas are known to be identical.
    """

    chunk_bytes: int = 16 * MiB
    compression: Compression = Compression()
    io_threads: int = 2
    sync: bool = True
    timeout_s: float | None = None
    check_replicas: bool = True

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise OptionsError(f"chunk_bytes must be positive, got {self.chunk_bytes}")
        if not isinstance(self.compression, Compression):
            raise OptionsError(
                f"compression must be a treeckpt.Compression, got {type(self.compression).__name__}"
            )
        if self.io_threads < 1:
            raise OptionsError(f"io_threads must be at least 1, got {self.io_threads}")
        _check_timeout(self.timeout_s)


#: Which tensors a load may convert with a possible loss of bits: FQNs or
#: ``fnmatch`` patterns of FQNs (``"model.*.weight"``), or a function of the FQN.
LossyCasts: TypeAlias = Iterable[str] | Callable[[str], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOptions:
    """How a load reads its bytes.

    Attributes:
        io_threads: threads per rank that read, verify and decode chunks.
        timeout_s: with several ranks, how long any rank waits for the others.
            ``None`` (the default) is the timeout of the process group the
            load runs on (the default group's when none is given).
        allow_lossy_cast: the tensors a load may convert to the template's
            dtype although the conversion can lose bits (float32 into
            bfloat16, float into int, int64 into float64): FQNs, ``fnmatch``
            patterns of FQNs (``{"model.*"}``; ``{"*"}`` allows every
            tensor), or a function ``fqn -> bool``. Exact conversions
            (bfloat16 into float32, int32 into int64...) need no consent; any
            other dtype difference is an error naming the FQN and both dtypes.
            The table is ``treeckpt.core.widening.widening``.
    """

    io_threads: int = 4
    timeout_s: float | None = None
    allow_lossy_cast: LossyCasts = ()

    def __post_init__(self) -> None:
        if self.io_threads < 1:
            raise OptionsError(f"io_threads must be at least 1, got {self.io_threads}")
        _check_timeout(self.timeout_s)
        object.__setattr__(self, "allow_lossy_cast", _lossy_casts(self.allow_lossy_cast))

    def allows_lossy_cast(self, fqn: str) -> bool:
        """Whether ``allow_lossy_cast`` names ``fqn`` (by name, pattern or function)."""
        rule = self.allow_lossy_cast
        if callable(rule):
            return bool(rule(fqn))
        return any(p == fqn or fnmatch.fnmatchcase(fqn, p) for p in rule)


def _lossy_casts(rule: object) -> tuple[str, ...] | Callable[[str], bool]:
    """``allow_lossy_cast`` as a sorted tuple of names and patterns, or the caller's function.

    A lone string is one name or pattern (not its characters); ``True`` is
    refused: a cast that can lose bits is allowed by name, never wholesale
    by accident (``{"*"}`` says so explicitly).
    """
    if isinstance(rule, str):
        return (rule,)
    if callable(rule):
        return rule
    if isinstance(rule, bool) or not isinstance(rule, Iterable):
        raise OptionsError(
            "allow_lossy_cast must be FQNs or fnmatch patterns of FQNs (e.g. "
            f"{{'model.embed.weight', 'model.*'}}) or a function of the FQN, got {rule!r}"
        )
    names = tuple(rule)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise OptionsError(f"allow_lossy_cast holds non-string entries: {bad[:5]!r}")
    return tuple(sorted(set(names)))


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

"""Which chunks a save compresses: a pure decision from measured rates.

Compression pays only while the storage is the bottleneck. A rank's save
runs ``lanes`` writer threads on ``cores`` cores; each lane encodes a chunk,
then writes it, then takes the next. With ``C`` seconds of encoding work (one
core's worth) and ``I`` seconds of storage work (stored bytes over the
storage's write rate), the save takes about

    max(C / min(cores, lanes), I, (C + I) / lanes)

seconds: the cores, the storage, or the lanes (encoding and writing are in
sequence within a lane) bound it. Compressing a chunk moves time from ``I``
to ``C``; it pays while that lowers the estimate.

:func:`choose_codecs` fills the encoding budget with the chunks that save the
most storage time per second of encoding first (the classes with the highest
``(1 - 1/ratio) * encode_rate``), one chunk at a time, and stops at the first
chunk that would not lower the estimate; the chunks it takes of a class are
then spread evenly over that class's chunks (see :func:`_spread`). When the whole choice lowers the
estimate of writing everything raw by less than ``min_gain``, it writes
everything raw: the estimate is a model, and a choice inside its error is not
worth the risk of a slower save.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ClassRate", "SaveCost", "choose_codecs", "save_seconds", "update_rate"]


@dataclass(frozen=True, slots=True)
class ClassRate:
    """What a sample of one class of chunks (one dtype) measured.

    Attributes:
        ratio: raw bytes / stored bytes of the sample, compressed (1.0: does
            not shrink).
        encode_bps: raw bytes encoded per second on one core.
    """

    ratio: float
    encode_bps: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError(f"ratio must be positive and finite, got {self.ratio!r}")
        if not (math.isfinite(self.encode_bps) and self.encode_bps > 0):
            raise ValueError(f"encode_bps must be positive and finite, got {self.encode_bps!r}")

    @property
    def saved_per_s(self) -> float:
        """Stored bytes saved per second of encoding: how well this class repays the CPU."""
        return (1.0 - 1.0 / self.ratio) * self.encode_bps


@dataclass(frozen=True, slots=True)
class SaveCost:
    """The estimate of one choice: encoding and storage seconds, and the save's."""

    encode_s: float
    write_s: float
    total_s: float


def save_seconds(encode_s: float, write_s: float, *, lanes: int, cores: int) -> float:
    """The save time estimate of the module docstring."""
    parallel = max(1, min(cores, lanes))
    return max(encode_s / parallel, write_s, (encode_s + write_s) / max(1, lanes))


def choose_codecs(
    chunks: Sequence[tuple[int, str]],
    rates: Mapping[str, ClassRate],
    *,
    write_bps: float,
    lanes: int,
    cores: int,
    min_gain: float = 0.1,
) -> tuple[tuple[bool, ...], SaveCost, SaveCost]:
    """Per chunk, whether to compress it; and the estimates of that choice and of all raw.

    ``chunks``: ``(raw bytes, class)`` per chunk; a class missing from
    ``rates``, or one whose ratio is at most 1, is never compressed.
    ``write_bps``: the storage's write rate for this rank (all lanes
    together), in bytes per second. Chunks of one class are taken in their
    given order, so equal inputs always give equal outputs.
    """
    if not (math.isfinite(write_bps) and write_bps > 0):
        raise ValueError(f"write_bps must be positive and finite, got {write_bps!r}")
    total = sum(n for n, _ in chunks)
    raw = SaveCost(
        0.0, total / write_bps, save_seconds(0.0, total / write_bps, lanes=lanes, cores=cores)
    )
    picked = [False] * len(chunks)
    paying = [k for k, r in rates.items() if r.ratio > 1.0]
    order = sorted(paying, key=lambda k: (-rates[k].saved_per_s, k))
    encode_s, write_s, best = 0.0, raw.write_s, raw.total_s
    for key in order:
        rate = rates[key]
        stop = False
        for i, (n, k) in enumerate(chunks):
            if k != key or n <= 0:
                continue
            e = encode_s + n / rate.encode_bps
            w = write_s - n * (1.0 - 1.0 / rate.ratio) / write_bps
            t = save_seconds(e, w, lanes=lanes, cores=cores)
            if t >= best:
                stop = True
                break
            picked[i] = True
            encode_s, write_s, best = e, w, t
        if stop:
            break
    if best > raw.total_s * (1.0 - min_gain):
        return (False,) * len(chunks), raw, raw
    spread = _spread(chunks, picked)
    encode_s = sum(n / rates[k].encode_bps for (n, k), p in zip(chunks, spread, strict=True) if p)
    saved = sum(
        n * (1.0 - 1.0 / rates[k].ratio) for (n, k), p in zip(chunks, spread, strict=True) if p
    )
    write_s = (total - saved) / write_bps
    chosen = SaveCost(encode_s, write_s, save_seconds(encode_s, write_s, lanes=lanes, cores=cores))
    return spread, chosen, raw


def _spread(chunks: Sequence[tuple[int, str]], picked: list[bool]) -> tuple[bool, ...]:
    """The same number of chunks per class, spread evenly over the class's chunks.

    Writer threads take chunks in order: compressing the first ones of a
    class would have every thread encode at once while the storage idles,
    then write raw while the cores idle. Spread out, encoding one chunk
    overlaps writing another.
    """
    out = [False] * len(chunks)
    members: dict[str, list[int]] = {}
    for i, (n, k) in enumerate(chunks):
        if n > 0:
            members.setdefault(k, []).append(i)
    for idx in members.values():
        count = sum(picked[i] for i in idx)
        for j in range(count):
            out[idx[(2 * j + 1) * len(idx) // (2 * count)]] = True
    return tuple(out)


def update_rate(old: float | None, sample: float, weight: float = 0.5) -> float:
    """The write rate kept for a storage after a save measured ``sample`` (moving average)."""
    if old is None:
        return sample
    return (1.0 - weight) * old + weight * sample

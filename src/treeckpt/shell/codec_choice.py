"""The shell of the ``"adaptive"`` codec choice: measure, remember, ask ``core/codec_policy.py``.

Two rates decide (see ``core/codec_policy.py`` for the decision itself):

- how this state compresses: a probe encodes one window (128 KiB of every
  byte plane) of up to three chunks of each dtype this rank writes, timed,
  before the first chunk is written (a few milliseconds);
- how fast the storage writes: each save measures it (stored bytes over the
  busiest writer thread's time in ``write`` and ``close``, fsync included)
  and :data:`RATES` keeps it per storage (``Backend.storage_key``: sibling
  checkpoint directories share it) for the saves after it in this process.
  A save to a storage not seen before writes raw until its writers have
  carried ``PROBE_BYTES`` (or an eighth of the rank's bytes), then decides
  for the chunks not yet started from the rate seen so far.

A rank writing less than ``SMALL_SAVE_BYTES`` writes raw (the same state
is then always stored the same way).

Writes into the page cache of a local disk look fast until the fsync; so a
first save to a local disk writes raw, and the rate learned from it (fsync
included) decides the next one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from treeckpt.core.codec_policy import ClassRate, choose_codecs, update_rate
from treeckpt.core.options import Compression
from treeckpt.store.backends import Backend, BackendWrapper, Writer
from treeckpt.store.codecs import Bytes1D, Workspace
from treeckpt.store.codecs.planes import choose_planes, encode_planes, sample_windows

__all__ = [
    "ENCODE_RATES",
    "LEARN_MIN_BYTES",
    "PROBE_BYTES",
    "PROBE_TRUST",
    "RATES",
    "SMALL_SAVE_BYTES",
    "ChunkInfo",
    "CodecChooser",
    "MeteredBackend",
    "StorageRates",
    "class_rates",
    "cores",
    "probe_classes",
]

#: a first save to a storage writes this many bytes raw before it decides
PROBE_BYTES = 32 << 20
#: a save that wrote less than this teaches nothing about the storage's rate
LEARN_MIN_BYTES = 4 << 20
#: a rank writing less than this writes raw: too little to measure, too little to gain
SMALL_SAVE_BYTES = 8 << 20
#: a real chunk also samples itself before it is encoded: about this much more work
_SAMPLE_OVERHEAD = 1.1
_PROBE_CHUNKS = 3


class StorageRates:
    """Write rates (bytes per second) learned per storage key, shared by the saves of a process."""

    def __init__(self) -> None:
        self._rates: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> float | None:
        with self._lock:
            return self._rates.get(key)

    def set(self, key: str, bps: float) -> None:
        with self._lock:
            self._rates[key] = bps

    def learn(self, key: str, sample: float, weight: float = 0.5) -> None:
        with self._lock:
            self._rates[key] = update_rate(self._rates.get(key), sample, weight)

    def forget(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._rates.clear()
            else:
                self._rates.pop(key, None)


#: write rates per storage (``Backend.storage_key``), bytes per second
RATES = StorageRates()
#: encode rates per class (dtype), bytes per second per writer thread, measured in real saves
#: (wall clock, so a busy machine shows as a slower codec)
ENCODE_RATES = StorageRates()
#: a probe encodes one small, cache-hot window: real chunks encode slower (memory traffic,
#: the other writer threads, other processes); trusted at this fraction until a save measured it
PROBE_TRUST = 0.5


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """What the policy needs of one chunk: its raw size, its class (dtype) and its bytes."""

    nbytes: int
    cls: str
    itemsize: int
    source: Callable[[], Bytes1D]


def probe_classes(chunks: Sequence[ChunkInfo], compression: Compression) -> dict[str, ClassRate]:
    """Ratio and one-core encode rate per class, from one window of up to three chunks each."""
    by_class: dict[str, list[ChunkInfo]] = {}
    for c in chunks:
        if c.nbytes >= 4 * c.itemsize:
            by_class.setdefault(c.cls, []).append(c)
    ws = Workspace(compression)
    rates: dict[str, ClassRate] = {}
    for cls, members in sorted(by_class.items()):
        step = max(1, len(members) // _PROBE_CHUNKS)
        raw_n = stored_n = 0
        best = 0.0  # bytes per second of the fastest window: a preempted one measures the machine
        for c in members[::step][:_PROBE_CHUNKS]:
            windows = sample_windows(c.source(), c.itemsize)
            window = windows[len(windows) // 2]
            n = window.nbytes - window.nbytes % c.itemsize
            window = window[:n]
            planes = choose_planes(window, c.itemsize, ws)
            raw_n += n
            if "z" not in planes:
                stored_n += n
                continue
            t0 = time.perf_counter()
            enc = encode_planes(window, c.itemsize, planes, ws)
            seconds = time.perf_counter() - t0
            stored_n += n if enc is None else len(enc.payload)
            if seconds > 0:
                best = max(best, n / seconds)
        if raw_n == 0 or stored_n >= raw_n or best <= 0:
            continue
        rates[cls] = ClassRate(ratio=raw_n / stored_n, encode_bps=best / _SAMPLE_OVERHEAD)
    return rates


class MeteredBackend(BackendWrapper):
    """Counts the bytes its writers write and the seconds each spends in ``write`` and ``close``."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self._writers: list[_MeteredWriter] = []
        #: called on the writing thread as each write starts (the chunk's encoding is done),
        #: with the number of bytes about to be written
        self.before_write: Callable[[int], None] | None = None

    def open_writer(self, name: str) -> Writer:
        w = _MeteredWriter(self.inner.open_writer(name), self)
        with self._lock:
            self._writers.append(w)
        return w

    def sample(self) -> tuple[int, float]:
        """Bytes written so far, and the longest time one writer spent writing them."""
        with self._lock:
            writers = list(self._writers)
        return sum(w.nbytes for w in writers), max((w.seconds for w in writers), default=0.0)


class _MeteredWriter(Writer):
    def __init__(self, inner: Writer, owner: MeteredBackend) -> None:
        self._inner = inner
        self._owner = owner
        self.nbytes = 0
        self.seconds = 0.0

    def write(self, data: bytes | memoryview) -> None:
        if self._owner.before_write is not None:
            self._owner.before_write(memoryview(data).nbytes)
        t0 = time.perf_counter()
        self._inner.write(data)
        self.seconds += time.perf_counter() - t0
        self.nbytes += memoryview(data).nbytes

    def tell(self) -> int:
        return self._inner.tell()

    def close(self, *, sync: bool) -> None:
        t0 = time.perf_counter()
        self._inner.close(sync=sync)
        self.seconds += time.perf_counter() - t0

    def abort(self) -> None:
        self._inner.abort()


class CodecChooser:
    """Answers, chunk by chunk, whether to compress; decides once the storage's rate is known.

    ``write_bps`` known (from :data:`RATES`): the decision is made for every
    chunk up front. Unknown: chunks are written raw until ``meter`` has seen
    ``probe_bytes``, then the chunks not yet started are decided from the
    rate measured so far.

    The decision is revisited as compressed chunks are written (after 2, 4,
    8, ... of them): the encode rate and ratio they really had (wall clock of
    the writer thread: a busy machine shows as a slow codec) replace the
    probe's for the chunks not yet started.
    """

    def __init__(
        self,
        chunks: Sequence[ChunkInfo],
        rates: dict[str, ClassRate],
        *,
        write_bps: float | None,
        lanes: int,
        cores: int,
        meter: MeteredBackend,
        probe_bytes: int,
    ) -> None:
        self._chunks = [(c.nbytes, c.cls) for c in chunks]
        self._rates = rates
        self._lanes = lanes
        self._cores = cores
        self._meter = meter
        self._probe_bytes = probe_bytes
        self._asked = [False] * len(chunks)
        self._picked: tuple[bool, ...] | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._write_bps = write_bps
        self._measured = 0  # compressed chunks measured so far
        self._replan_at = 2
        #: per class: raw bytes compressed, the writer threads' seconds encoding them, stored bytes
        self.encoded: dict[str, list[float]] = {}
        meter.before_write = self._encoded
        if not rates:
            self._picked = (False,) * len(chunks)
        elif write_bps is not None:
            self._decide(write_bps)

    @property
    def picked(self) -> tuple[bool, ...] | None:
        """The decision per chunk, once made."""
        return self._picked

    def _decide(self, write_bps: float) -> None:
        self._write_bps = write_bps
        todo = [
            (0, k) if asked else (n, k)
            for (n, k), asked in zip(self._chunks, self._asked, strict=True)
        ]
        picked, _, _ = choose_codecs(
            todo, self._rates, write_bps=write_bps, lanes=self._lanes, cores=self._cores
        )
        self._picked = tuple(p and not a for p, a in zip(picked, self._asked, strict=True))

    def compress(self, i: int) -> bool:
        with self._lock:
            if self._picked is None:
                got, seconds = self._meter.sample()
                if got >= self._probe_bytes and seconds > 0:
                    self._decide(got / seconds)
            elif self._measured >= self._replan_at and self._write_bps is not None:
                self._replan_at *= 2
                self._rates = self._measured_rates()
                self._decide(self._write_bps)
            self._asked[i] = True
            yes = self._picked is not None and self._picked[i]
        # chunks.py encodes the chunk right after asking, then writes it: time that
        self._local.pending = (self._chunks[i], time.perf_counter()) if yes else None
        return yes

    def _encoded(self, stored: int) -> None:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            return
        (n, cls), t0 = pending
        self._local.pending = None
        seconds = time.perf_counter() - t0
        with self._lock:
            acc = self.encoded.setdefault(cls, [0.0, 0.0, 0.0])
            acc[0] += n
            acc[1] += seconds
            acc[2] += stored
            self._measured += 1

    def _measured_rates(self) -> dict[str, ClassRate]:
        out = dict(self._rates)
        for cls, (n, seconds, stored) in self.encoded.items():
            if cls in out and seconds > 0 and stored > 0:
                out[cls] = ClassRate(ratio=n / stored, encode_bps=n / seconds)
        return out

    def learn(self, rates: StorageRates, probed: dict[str, ClassRate]) -> None:
        """Keep the encode rates this save measured (classes with at least ``LEARN_MIN_BYTES``).

        A class this save did not measure (it wrote it raw) drifts a quarter
        of the way back to what the probe says (``probed``), so that one slow
        measurement on a busy machine does not keep a class raw for good.
        """
        for cls, (n, seconds, _) in self.encoded.items():
            if n >= LEARN_MIN_BYTES and seconds > 0:
                rates.learn(cls, n / seconds)
        for cls, rate in probed.items():
            n = self.encoded.get(cls, [0.0])[0]
            if n < LEARN_MIN_BYTES and rates.get(cls) is not None:
                rates.learn(cls, rate.encode_bps * PROBE_TRUST, weight=0.25)

    def asker(self, i: int) -> Callable[[], bool]:
        return lambda: self.compress(i)


def class_rates(
    probed: dict[str, ClassRate],
) -> dict[str, ClassRate]:
    """The probe's ratios, with the encode rate earlier saves measured (else the probe's, discounted)."""
    out = {}
    for cls, rate in probed.items():
        learned = ENCODE_RATES.get(cls)
        bps = learned if learned is not None else rate.encode_bps * PROBE_TRUST
        out[cls] = ClassRate(ratio=rate.ratio, encode_bps=bps)
    return out

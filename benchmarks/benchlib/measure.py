"""Measurement primitives: durability (fsync), page-cache dropping, sizes, RSS sampling."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import psutil  # type: ignore[import-untyped]

RSS_SAMPLE_INTERVAL_S = 0.005


def checkpoint_files(path: str) -> Iterator[str]:
    """Every regular file under ``path`` (or ``path`` itself if it is a file)."""
    if os.path.isfile(path):
        yield path
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            yield os.path.join(root, name)


def _checkpoint_dirs(path: str) -> Iterator[str]:
    if os.path.isdir(path):
        for root, _dirs, _files in os.walk(path, topdown=False):
            yield root
    yield os.path.dirname(os.path.abspath(path))


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path``, then every directory (deepest first), then ``path``'s parent.

    fsync on an already-clean file costs a few microseconds, so running this
    after a contender that already fsyncs its own files is (nearly) free; it
    makes every contender's checkpoint durable by the same rule, including the
    directory entries that make the new files reachable after a crash.
    """
    for file_path in checkpoint_files(path):
        _fsync_path(file_path, os.O_RDONLY)
    for dir_path in _checkpoint_dirs(path):
        _fsync_path(dir_path, os.O_RDONLY | os.O_DIRECTORY)


def drop_page_cache(path: str) -> None:
    """Evict every file under ``path`` from the page cache (fsync first: dirty pages cannot be dropped)."""
    for file_path in checkpoint_files(path):
        fd = os.open(file_path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_usage(path: str) -> tuple[int, int]:
    """(sum of apparent file sizes in bytes, number of files) under ``path``."""
    sizes = [os.stat(file_path).st_size for file_path in checkpoint_files(path)]
    return sum(sizes), len(sizes)


def _load_malloc_trim() -> Callable[[int], int] | None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(libc_name).malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS so the next RSS baseline is honest.

    Without ``malloc_trim`` glibc keeps freed heap memory resident; a later
    allocation reusing it would not raise RSS and peak-extra-RSS would be
    understated.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def settle_disk() -> None:
    """Flush all pending writeback (e.g. from deleting the previous checkpoint) before timing."""
    os.sync()


class RssSampler:
    """Context manager: samples this process's RSS every ~5 ms in a background thread.

    ``extra_bytes`` is the peak RSS seen while the block ran minus the RSS at
    entry. RSS includes resident file-backed mappings (mmap'd checkpoint files
    count); it does not include the page cache of files read with read().
    """

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.samples = 0

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._rss())
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.baseline_bytes = self._rss()
        self.peak_bytes = self.baseline_bytes
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def extra_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


class Stopwatch:
    """Context manager recording wall-clock seconds (``time.perf_counter``) in ``seconds``."""

    def __init__(self) -> None:
        self._start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._start


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock, machine-wide busy CPU seconds and this process's CPU seconds at one instant."""

    wall_s: float
    busy_s: float
    own_s: float


def cpu_snapshot() -> CpuSnapshot:
    machine = psutil.cpu_times()
    # guest time is already counted in user on Linux; idle, iowait and steal are not work done here.
    not_busy = ("idle", "iowait", "steal", "guest", "guest_nice")
    busy = sum(value for name, value in machine._asdict().items() if name not in not_busy)
    own = psutil.Process().cpu_times()
    return CpuSnapshot(
        time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system
    )


def foreign_cores(start: CpuSnapshot, end: CpuSnapshot) -> float:
    """Average number of cores kept busy by other processes between two snapshots.

    Anything well above 0 means another job shared the machine and the figures
    taken meanwhile are suspect (the development machine has only 2 cores).
    """
    wall = end.wall_s - start.wall_s
    if wall <= 0:
        return 0.0
    return max(0.0, ((end.busy_s - start.busy_s) - (end.own_s - start.own_s)) / wall)

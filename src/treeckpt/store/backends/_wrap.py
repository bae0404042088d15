"""A backend that forwards every call to another one, and one that limits its byte rate."""

from __future__ import annotations

import math
import threading
import time

from treeckpt.store.backends._base import Backend, DirHold, Writer


class BackendWrapper(Backend):
    """Forwards every method to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.root = inner.root
        self.supports_fsync = inner.supports_fsync
        self.supports_exclusive_create = inner.supports_exclusive_create

    def storage_key(self) -> str:
        return self.inner.storage_key()

    def makedirs(self, name: str) -> None:
        self.inner.makedirs(name)

    def open_writer(self, name: str) -> Writer:
        return self.inner.open_writer(name)

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        return self.inner.readinto(name, offset, out)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.inner.read_range(name, offset, length)

    def read_file(self, name: str, max_bytes: int) -> bytes:
        return self.inner.read_file(name, max_bytes)

    def commit_file(self, name: str, data: bytes, *, sync: bool) -> None:
        self.inner.commit_file(name, data, sync=sync)

    def size(self, name: str) -> int | None:
        return self.inner.size(name)

    def listdir(self, name: str = "") -> list[str]:
        return self.inner.listdir(name)

    def remove_tree(self, name: str) -> None:
        self.inner.remove_tree(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def remove(self, name: str) -> None:
        self.inner.remove(name)

    def list_files(self, name: str = "") -> list[str]:
        return self.inner.list_files(name)

    def create_file(self, name: str, data: bytes, *, sync: bool) -> bool:
        return self.inner.create_file(name, data, sync=sync)

    def age_s(self, name: str) -> float | None:
        return self.inner.age_s(name)

    def unfinished(self) -> list[str]:
        return self.inner.unfinished()

    def hold_dir(self, name: str) -> DirHold | None:
        return self.inner.hold_dir(name)

    def sync_dir(self, name: str = "") -> None:
        self.inner.sync_dir(name)

    def close(self) -> None:
        self.inner.close()


class RateLimiter:
    """A link of ``bytes_per_s`` shared by every thread: each transfer waits its turn.

    :meth:`take` returns once the link has carried ``n`` more bytes after
    every transfer before it; ``total`` counts the bytes taken.
    """

    def __init__(self, bytes_per_s: float) -> None:
        if not (math.isfinite(bytes_per_s) and bytes_per_s > 0):
            raise ValueError(f"bytes_per_s must be positive and finite, got {bytes_per_s!r}")
        self.bytes_per_s = float(bytes_per_s)
        self.total = 0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            done = max(now, self._free_at) + n / self.bytes_per_s
            self._free_at = done
            self.total += n
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class ThrottledBackend(BackendWrapper):
    """``inner`` behind a link of ``write_bps`` (and ``read_bps``) bytes per second.

    Models storage slower than the local disk (an object store, a network
    file system) for one rank: every byte written to a data file, committed
    or read waits its turn on the link, which all threads share. Metadata
    calls (listing, sizes) are not slowed. ``written`` and ``read`` count the
    bytes that crossed each link.
    """

    def __init__(self, inner: Backend, write_bps: float, read_bps: float | None = None) -> None:
        super().__init__(inner)
        self.write_link = RateLimiter(write_bps)
        self.read_link = RateLimiter(write_bps if read_bps is None else read_bps)

    @property
    def written(self) -> int:
        return self.write_link.total

    @property
    def read(self) -> int:
        return self.read_link.total

    def storage_key(self) -> str:
        return f"throttled({self.write_link.bytes_per_s:g})/{self.inner.storage_key()}"

    def open_writer(self, name: str) -> Writer:
        return _ThrottledWriter(self.inner.open_writer(name), self.write_link)

    def commit_file(self, name: str, data: bytes, *, sync: bool) -> None:
        self.write_link.take(len(data))
        self.inner.commit_file(name, data, sync=sync)

    def create_file(self, name: str, data: bytes, *, sync: bool) -> bool:
        created = self.inner.create_file(name, data, sync=sync)
        if created:
            self.write_link.take(len(data))
        return created

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        n = self.inner.readinto(name, offset, out)
        self.read_link.take(n)
        return n

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        data = self.inner.read_range(name, offset, length)
        self.read_link.take(len(data))
        return data

    def read_file(self, name: str, max_bytes: int) -> bytes:
        data = self.inner.read_file(name, max_bytes)
        self.read_link.take(len(data))
        return data


class _ThrottledWriter(Writer):
    def __init__(self, inner: Writer, link: RateLimiter) -> None:
        self._inner = inner
        self._link = link

    def write(self, data: bytes | memoryview) -> None:
        self._inner.write(data)
        self._link.take(memoryview(data).nbytes)

    def tell(self) -> int:
        return self._inner.tell()

    def close(self, *, sync: bool) -> None:
        self._inner.close(sync=sync)

    def abort(self) -> None:
        self._inner.abort()

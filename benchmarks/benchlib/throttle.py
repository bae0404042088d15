"""Throttled storage for the harness: one byte-rate link per process, applied to every contender.

``--throttle G`` models storage that moves ``G`` GB/s for this rank (object
stores, network file systems: 0.1-0.3 GB/s per rank). Every byte a contender
writes or reads waits its turn on one shared link (``RateLimiter`` of
``treeckpt.store.backends``, a token bucket that all threads share):

- treeckpt: through ``ThrottledBackend`` over its local backend;
- DCP: through ``FsspecWriter`` / ``FsspecReader`` on the ``throttled://``
  fsspec file system below (a local file system whose files take from the
  link on every read and write);
- the floors, ``torch.save``, safetensors, raw bytes: their files are
  written and read as usual, and the bytes then take their turn on the link.

The pages still land on the local disk, and the harness's fsync pass and
page-cache eviction work as without a throttle.
"""

from __future__ import annotations

from typing import Any

from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from fsspec.registry import register_implementation

PROTOCOL = "throttled"
GB = 1e9

_link: Any = None
_bps: float | None = None


def configure(gbps: float | None) -> None:
    """Throttle every contender to ``gbps`` GB/s (``None``: no throttle)."""
    global _bps
    _bps = None if gbps is None else gbps * GB
    register_implementation(PROTOCOL, ThrottledLocalFileSystem, clobber=True)


def bytes_per_s() -> float | None:
    return _bps


def new_link() -> Any:
    """A fresh link for one save or load (``None`` without a throttle)."""
    global _link
    if _bps is None:
        return None
    from treeckpt.store.backends import RateLimiter  # the same limiter treeckpt's wrapper uses

    _link = RateLimiter(_bps)
    return _link


def take(n: int) -> None:
    """Charge ``n`` bytes to the current link (a no-op without a throttle)."""
    if _link is not None:
        _link.take(n)


def url(path: str) -> str:
    return f"{PROTOCOL}://{path}"


class _ThrottledFile(LocalFileOpener):  # type: ignore[misc]
    """A local file (``self.f``, which ``LocalFileOpener`` forwards to) on the current link."""

    def write(self, data: Any) -> int:
        n: int = self.f.write(data)
        take(memoryview(data).nbytes)
        return n

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        data: bytes = self.f.read(*args, **kwargs)
        take(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n: int = self.f.readinto(b)
        take(n)
        return n


class ThrottledLocalFileSystem(LocalFileSystem):  # type: ignore[misc]
    """The local file system, with every file's reads and writes on the current link."""

    protocol = (PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if self.auto_mkdir and "w" in mode:
            self.makedirs(self._parent(path), exist_ok=True)
        return _ThrottledFile(path, mode, fs=self, **kwargs)

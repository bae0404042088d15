"""Byte-level storage backends.

A backend is a few byte-level methods over paths relative to the checkpoint
root, plus capability flags. ``open_backend`` picks the local-disk backend
(direct syscalls: pread, fsync, rename) for plain paths and ``file://`` URLs,
and the fsspec backend for every other protocol (``memory://``, ``s3://``,
``gs://``, ...).
"""

from __future__ import annotations

from treeckpt.store.backends._base import Backend, DirHold, Writer
from treeckpt.store.backends._fsspec import FsspecBackend
from treeckpt.store.backends._local import LocalBackend
from treeckpt.store.backends._wrap import BackendWrapper, RateLimiter, ThrottledBackend

__all__ = [
    "Backend",
    "BackendWrapper",
    "DirHold",
    "FsspecBackend",
    "LocalBackend",
    "RateLimiter",
    "ThrottledBackend",
    "Writer",
    "open_backend",
]


def open_backend(path: str) -> Backend:
    """The backend for a checkpoint path or URL."""
    if "://" not in path:
        return LocalBackend(path)
    if path.startswith("file://"):
        return LocalBackend(path[len("file://") :])
    return FsspecBackend(path)

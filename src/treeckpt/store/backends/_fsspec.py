"""Any fsspec filesystem: memory, object stores, remote filesystems.

Object stores have no rename: data objects are written under per-save names,
and the manifest is committed as one whole-object write, which object stores
make atomic (readers see the old object or the new one).
"""

from __future__ import annotations

import contextlib
from typing import Any

import fsspec

from treeckpt.store.backends._base import Backend, Writer


class _FsspecWriter(Writer):
    def __init__(self, fs: Any, path: str) -> None:
        self._f = fs.open(path, "wb")
        self._pos = 0

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._pos += memoryview(data).nbytes

    def tell(self) -> int:
        return self._pos

    def close(self, *, sync: bool) -> None:
        self._f.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()


class FsspecBackend(Backend):
    supports_fsync = False

    def __init__(self, url: str, **storage_options: Any) -> None:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        self.fs = fs
        self.root = path.rstrip("/")

    def _path(self, name: str) -> str:
        if name.startswith("../"):  # a sibling checkpoint's file (validated by the reader)
            return f"{self.root.rsplit('/', 1)[0]}/{name[3:]}"
        return f"{self.root}/{name}" if name else self.root

    def makedirs(self, name: str) -> None:
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(self._path(name), exist_ok=True)

    def open_writer(self, name: str) -> Writer:
        return _FsspecWriter(self.fs, self._path(name))

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        data = self.fs.cat_file(self._path(name), start=offset, end=offset + len(out))
        out[: len(data)] = data
        return len(data)

    def read_file(self, name: str, max_bytes: int) -> bytes:
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(self._path(name))
        if size > max_bytes:
            raise ValueError(f"{name} is larger than {max_bytes} bytes")
        data: bytes = self.fs.cat_file(self._path(name))
        return data

    def commit_file(self, name: str, data: bytes, *, sync: bool) -> None:
        self.fs.pipe_file(self._path(name), data)

    def size(self, name: str) -> int | None:
        try:
            info = self.fs.info(self._path(name))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") != "directory" else None

    def listdir(self, name: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._path(name), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove_tree(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name), recursive=True)

"""Any fsspec filesystem: memory, object stores (``s3://``, ``gs://``, ...), remote filesystems.

Object stores have no rename, so the commit protocol needs none:

- data objects and chunk indexes are written under per-save names
  (``data-<save_id>/...``) that no committed manifest refers to;
- every object is written with ``open(..., autocommit=False)``: on S3 its
  bytes go up as a multipart upload that becomes an object only at
  ``commit()``, so an object either exists whole or not at all, and a failed
  or aborted writer calls ``discard()`` (the upload is aborted, nothing is
  left). A writer killed before ``commit()`` leaves no object either, only an
  incomplete multipart upload the store expires (see ``docs/reliability.md``);
- the manifest is written last as one object, the same way: a single
  ``commit()`` replaces it, and readers see the old object or the new one.

fsspec caches directory listings; every existence or size check here
refreshes them first, because other processes (other ranks, other savers)
change the store behind this process's back.

The in-memory filesystem (``memory://``, tests) stores a file at ``open``;
there the manifest is committed by ``pipe_file``, which replaces the whole
entry at once.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any

import fsspec

from treeckpt.store.backends._base import Backend, Writer


def _forget(fs: Any, f: Any) -> None:
    """Drop ``f`` from the filesystem's deferred-commit list (fsspec appends every
    ``autocommit=False`` file to it; outside a transaction nothing else removes it)."""
    files = getattr(getattr(fs, "_transaction", None), "files", None)
    if files is not None:
        with contextlib.suppress(ValueError):
            files.remove(f)


class _FsspecWriter(Writer):
    def __init__(self, fs: Any, path: str, *, deferred: bool) -> None:
        self._fs = fs
        self._f = fs.open(path, "wb", autocommit=False) if deferred else fs.open(path, "wb")
        # Filesystems whose files cannot defer their commit write them on close().
        self._deferred = deferred and hasattr(self._f, "commit") and hasattr(self._f, "discard")
        self._pos = 0

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._pos += memoryview(data).nbytes

    def tell(self) -> int:
        return self._pos

    def close(self, *, sync: bool) -> None:
        f, self._f = self._f, None
        if f is None:
            return
        try:
            f.close()
            if self._deferred:
                f.commit()  # the object appears here, whole
        except BaseException:
            if self._deferred:
                with contextlib.suppress(Exception):
                    f.discard()
            raise
        finally:
            _forget(self._fs, f)

    def abort(self) -> None:
        f, self._f = self._f, None
        if f is None:
            return
        try:
            if self._deferred:
                # Never close() first: closing uploads the buffered bytes.
                with contextlib.suppress(Exception):
                    f.discard()
                with contextlib.suppress(Exception):
                    f.closed = True
            else:
                with contextlib.suppress(Exception):
                    f.close()
        finally:
            _forget(self._fs, f)


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec ``info`` dict, where it has one."""
    for key in (
        "LastModified",
        "Initiated",
        "mtime",
        "updated",
        "last_modified",
        "modified",
        "created",
    ):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


class FsspecBackend(Backend):
    supports_fsync = False

    def __init__(self, url: str, **storage_options: Any) -> None:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        self.fs = fs
        self.root = path.rstrip("/")
        # The memory filesystem publishes a file at open(); everything else that
        # fsspec buffers (S3, GCS, Azure, ...) publishes at commit().
        self._deferred = "memory" not in _protocols(fs)

    def _path(self, name: str) -> str:
        if name.startswith("../"):  # a sibling checkpoint's file (validated by the reader)
            return f"{self.root.rsplit('/', 1)[0]}/{name[3:]}"
        return f"{self.root}/{name}" if name else self.root

    def _refresh(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def makedirs(self, name: str) -> None:
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(self._path(name), exist_ok=True)

    def open_writer(self, name: str) -> Writer:
        return _FsspecWriter(self.fs, self._path(name), deferred=self._deferred)

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        if len(out) == 0:
            return 0
        try:
            data = self.fs.cat_file(self._path(name), start=offset, end=offset + len(out))
        except FileNotFoundError:
            raise
        except OSError:
            # Object stores refuse a range that starts at or past the end (HTTP 416).
            size = self.size(name)
            if size is not None and offset >= size:
                return 0
            raise
        n = min(len(data), len(out))
        out[:n] = data[:n]
        return n

    def read_file(self, name: str, max_bytes: int) -> bytes:
        path = self._path(name)
        self._refresh(path)
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(path)
        if size > max_bytes:
            raise ValueError(f"{name} is larger than {max_bytes} bytes")
        # A ranged read: an object replaced by a bigger one since the size
        # check still costs at most max_bytes + 1 bytes.
        data: bytes = self.fs.cat_file(path, start=0, end=max_bytes + 1) if size else b""
        if len(data) > max_bytes:
            raise ValueError(f"{name} is larger than {max_bytes} bytes")
        return data

    def commit_file(self, name: str, data: bytes, *, sync: bool) -> None:
        path = self._path(name)
        if not self._deferred:
            self.fs.pipe_file(path, data)
            return
        writer = _FsspecWriter(self.fs, path, deferred=True)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        writer.close(sync=sync)

    def size(self, name: str) -> int | None:
        path = self._path(name)
        self._refresh(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") != "directory" else None

    def listdir(self, name: str = "") -> list[str]:
        path = self._path(name)
        self._refresh(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
        names.discard(path.rstrip("/").rsplit("/", 1)[-1])  # some stores list the prefix itself
        return sorted(names)

    def exists(self, name: str) -> bool:
        path = self._path(name)
        self._refresh(path)
        return bool(self.fs.exists(path))

    def remove(self, name: str) -> None:
        path = self._path(name)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)
        self._refresh(path)

    def list_files(self, name: str = "") -> list[str]:
        path = self._path(name)
        self._refresh(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        prefix = f"{self.root}/"
        return sorted(str(f)[len(prefix) :] for f in found if str(f).startswith(prefix))

    def remove_tree(self, name: str) -> None:
        path = self._path(name)
        self._refresh(path)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        for upload in self._uploads(path):
            with contextlib.suppress(Exception):
                self.fs.abort_mpu(upload["Bucket"], upload["Key"], upload["UploadId"])
        self._refresh(path)

    def _uploads(self, path: str) -> list[dict[str, Any]]:
        """Multipart uploads begun below ``path`` and never completed nor aborted (S3 only).

        A writer killed mid-upload leaves one: invisible to readers, but it
        holds storage until it is aborted.
        """
        lister = getattr(self.fs, "list_multipart_uploads", None)
        if lister is None or not hasattr(self.fs, "abort_mpu"):
            return []
        bucket, _, prefix = path.partition("/")
        try:
            found = lister(bucket)
        except Exception:
            return []
        prefix = prefix.rstrip("/")
        return [
            {**u, "Bucket": bucket}
            for u in found
            if isinstance(u.get("Key"), str)
            and (not prefix or u["Key"] == prefix or u["Key"].startswith(prefix + "/"))
        ]

    def unfinished(self) -> list[str]:
        top = {
            u["Key"][len(self.root.partition("/")[2]) :].lstrip("/").split("/", 1)[0]
            for u in self._uploads(self.root)
        }
        return sorted(t for t in top if t)

    def age_s(self, name: str) -> float | None:
        path = self._path(name)
        self._refresh(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return None
        times = [_mtime(info) for info in found.values()]
        times += [_mtime(u) for u in self._uploads(path)]  # "Initiated"
        if not times or any(t is None for t in times):
            return None
        return max(0.0, time.time() - max(t for t in times if t is not None))


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)

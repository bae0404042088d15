"""Local disk: direct syscalls, fsync of files and directories, commit by rename."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
import time

from treeckpt.store.backends._base import Backend, DirHold, Writer


class _FlockHold(DirHold):
    """``flock(LOCK_EX)`` on a directory's descriptor: the kernel drops it when the
    process dies, even by ``SIGKILL``, so a held lock means a live save."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._path = path

    def is_current(self) -> bool:
        try:
            at_path = os.stat(self._path)
        except OSError:
            return False
        held = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # closing the last descriptor releases the lock

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _write_closing(fd: int, data: bytes, sync: bool) -> None:
    """Write all of ``data`` to ``fd``, fsync it when ``sync``, and close it."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


class _LocalWriter(Writer):
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._pos = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            self._pos += n
            view = view[n:]

    def tell(self) -> int:
        return self._pos

    def close(self, *, sync: bool) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        # Close at most once: after a failed close() the fd number may already
        # belong to a file another thread opened.
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class LocalBackend(Backend):
    supports_fsync = True
    supports_exclusive_create = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        if name.startswith("../"):  # a sibling checkpoint's file (validated by the reader)
            return os.path.join(os.path.dirname(self.root), name[3:])
        return os.path.join(self.root, name) if name else self.root

    def makedirs(self, name: str) -> None:
        os.makedirs(self._path(name), exist_ok=True)

    def open_writer(self, name: str) -> Writer:
        return _LocalWriter(self._path(name))

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(self._path(name), os.O_RDONLY)
            return fd

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        fd = self._fd(name)
        view = out.cast("B") if out.format != "B" else out
        total = 0
        while total < len(view):
            n = os.preadv(fd, [view[total:]], offset + total)
            if n == 0:
                break
            total += n
        return total

    def read_file(self, name: str, max_bytes: int) -> bytes:
        with open(self._path(name), "rb", buffering=0) as f:
            # Never allocate max_bytes up front (a cap, not a size): read what is there.
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ValueError(f"{name} is larger than {max_bytes} bytes")
            buf = bytearray()
            while len(buf) <= max_bytes:
                piece = f.read(max(size - len(buf), 0) + 1)
                if not piece:
                    break
                buf += piece
        if len(buf) > max_bytes:
            raise ValueError(f"{name} is larger than {max_bytes} bytes")
        return bytes(buf)

    def commit_file(self, name: str, data: bytes, *, sync: bool) -> None:
        final = self._path(name)
        tmp = f"{final}.tmp-{os.getpid()}-{threading.get_ident()}"
        _write_closing(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), data, sync)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if sync:
            self.sync_dir(os.path.dirname(name))

    def size(self, name: str) -> int | None:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            return None

    def listdir(self, name: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._path(name)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_tree(self, name: str) -> None:
        path = self._path(name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self._path(name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    def list_files(self, name: str = "") -> list[str]:
        top = self._path(name)
        if not os.path.isdir(top):
            return []
        files = []
        for here, _, names in os.walk(top):
            rel = os.path.relpath(here, self.root)
            for n in names:
                files.append(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
        return sorted(files)

    def create_file(self, name: str, data: bytes, *, sync: bool) -> bool:
        try:
            fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        _write_closing(fd, data, sync)
        if sync:
            self.sync_dir(os.path.dirname(name))
        return True

    def hold_dir(self, name: str) -> DirHold | None:
        try:
            return _FlockHold(self._path(name))
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None  # a filesystem without flock: clean-up goes by age
            raise

    def age_s(self, name: str) -> float | None:
        path = self._path(name)
        with contextlib.suppress(OSError):
            if not os.path.isdir(path):
                return max(0.0, time.time() - os.lstat(path).st_mtime)
        newest: float | None = None
        for top, dirs, files in os.walk(path):
            for n in (top, *(os.path.join(top, f) for f in files + dirs)):
                with contextlib.suppress(OSError):
                    m = os.lstat(n).st_mtime
                    newest = m if newest is None else max(newest, m)
        return None if newest is None else max(0.0, time.time() - newest)

    def sync_dir(self, name: str = "") -> None:
        fd = os.open(self._path(name), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

"""One manager per root: a lock file with a heartbeat.

``<root>/manager.lock`` holds JSON naming its holder (a random token, host,
pid) and the time of its last heartbeat. A manager creates it when it opens
the root and refuses to open a root whose lock is live; a daemon thread
rewrites the heartbeat every quarter of ``stale_after_s``. A lock is stale,
and is taken over with a warning, when its holder is a process of this host
that no longer exists (a holder on this host that is alive is never stale),
when the holder is on another host and its heartbeat is older than
``stale_after_s`` (it crashed), or when it is unreadable (a crash while it
was being written). Before every save the manager checks that the lock
still holds its token, so a manager whose lock was taken over stops saving.

The lock is a thin layer over the root's
:class:`~treeckpt.store.backends.Backend`: it is created with
``Backend.create_file``, exclusive where the backend says so
(``supports_exclusive_create``: ``O_CREAT | O_EXCL`` on a local disk, so of
two managers racing for a root exactly one wins). Object stores offer no such
primitive through fsspec: there the lock is written and read back, which
closes the race except for two managers starting within the same moment. The
heartbeat replaces the file with ``Backend.commit_file`` (readers see the old
record or the new one), and release removes it with ``Backend.remove``.

Why not ``Backend.hold_dir``: that claim (``flock``) exists only on local
disks, dies silently with its process and says nothing about its holder. A
root on an object store needs a lock too, a takeover must be visible (the
holder's token is checked before each save), and a refusal must name the
holder (pid, host, heartbeat age), so the lock stays a record in a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
import warnings
from typing import Any

from treeckpt.errors import CheckpointError
from treeckpt.store.backends import Backend

__all__ = ["LOCK_FILE", "RootLock", "RootLockedError", "StaleLockWarning"]

LOCK_FILE = "manager.lock"
#: a lock record is a few hundred bytes; anything larger is not one (unreadable)
_MAX_RECORD = 1 << 16


class RootLockedError(CheckpointError, RuntimeError):
    """Another live manager holds the root (or took it over from this one)."""


class StaleLockWarning(UserWarning):
    """A stale lock left by a crashed manager was taken over."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class RootLock:
    """The lock of one manager root (see the module docstring)."""

    def __init__(self, backend: Backend, *, stale_after_s: float) -> None:
        self.backend = backend
        self.path = f"{backend.root}/{LOCK_FILE}"
        self.stale_after_s = stale_after_s
        self.token = secrets.token_hex(16)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()

    # ---------------------------------------------------------------- records

    def _record(self) -> bytes:
        return json.dumps(
            {"token": self.token, "host": self.host, "pid": self.pid, "time": time.time()}
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        """The current holder, ``{}`` when unreadable, ``None`` when there is no lock."""
        try:
            data = self.backend.read_file(LOCK_FILE, _MAX_RECORD)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        try:
            rec = json.loads(data)
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _is_stale(self, rec: dict[str, Any]) -> bool:
        t, pid = rec.get("time"), rec.get("pid")
        if not isinstance(t, int | float) or not isinstance(pid, int):
            return True
        if rec.get("host") == self.host:
            # On this host the process table is the truth: a live holder is live
            # however long it has been busy, a dead one is gone at once.
            return not _pid_alive(pid)
        return time.time() - t > self.stale_after_s

    @staticmethod
    def _holder(rec: dict[str, Any]) -> str:
        age = time.time() - rec["time"] if isinstance(rec.get("time"), int | float) else None
        seen = f", last heartbeat {age:.0f} s ago" if age is not None else ""
        return f"pid {rec.get('pid')} on host {rec.get('host')!r}{seen}"

    def _create(self) -> bool:
        """Create the lock file if there is none; whether this call created it."""
        if not self.backend.create_file(LOCK_FILE, self._record(), sync=True):
            return False
        if self.backend.supports_exclusive_create:
            return True
        rec = self._read()  # not exclusive: the last writer of a race holds it
        return rec is not None and rec.get("token") == self.token

    # ------------------------------------------------------------------- API

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise ``RootLockedError`` if it is live."""
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            rec = self._read()
            if rec is None:
                continue  # released meanwhile
            if not self._is_stale(rec):
                raise RootLockedError(
                    f"{self.path}: another checkpoint manager uses this root "
                    f"({self._holder(rec) if rec else 'unreadable lock'}); use one manager "
                    "per root, or remove the lock file if its holder is gone"
                )
            warnings.warn(
                f"{self.path}: taking over a stale lock "
                f"({self._holder(rec) if rec else 'unreadable'})",
                StaleLockWarning,
                stacklevel=3,
            )
            self.backend.remove(LOCK_FILE)
        raise RootLockedError(f"{self.path}: could not take the lock (contended)")

    def check(self) -> None:
        """Raise ``RootLockedError`` unless this manager still holds the lock."""
        rec = self._read()
        if rec is None or rec.get("token") != self.token:
            who = self._holder(rec) if rec else "nobody"
            raise RootLockedError(
                f"{self.path}: this manager no longer holds the lock (now {who}); "
                "another manager took the root over, so this one stops saving"
            )

    def _beat(self) -> None:
        with self._io:
            rec = self._read()
            if rec is None or rec.get("token") != self.token:
                return
            self.backend.commit_file(LOCK_FILE, self._record(), sync=False)

    def _start_heartbeat(self) -> None:
        interval = max(0.05, self.stale_after_s / 4)

        def run() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(Exception):
                    self._beat()

        self._thread = threading.Thread(target=run, name="treeckpt-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this manager's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._io:
            rec = self._read()
            if rec is not None and rec.get("token") == self.token:
                self.backend.remove(LOCK_FILE)

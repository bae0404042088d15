"""Fault injection: a storage backend that fails on cue.

:class:`FaultyBackend` wraps a real backend and raises an injected
:class:`InjectedFault` (an ``OSError``, like a failing disk) at the N-th call
of a mutating operation, the way SQLite's I/O-error tests and RocksDB's
fault-injection file system do. Sweeping N from 0 to the number of mutating
calls of one save checks every crash point of that save::

    probe = FaultyBackend(open_backend(path))   # records, injects nothing
    ...save through probe...; total = len(probe.calls)
    for n in range(total):
        backend = FaultyBackend(open_backend(path), fail_at=n)
        ...save through backend: it must fail, the old checkpoint must load...

Modes of the failing call:

- ``"before"``: nothing happens, the call raises (a refused syscall);
- ``"torn"``: a ``write`` stores only the first half of its bytes, then
  raises (a torn write; other operations behave as ``"before"``);
- ``"after"``: the operation takes full effect, then raises (an ``fsync``
  or directory sync that fails after a rename already happened).

With ``sticky=True`` every mutating call from the failing one on fails too
(the disk is gone), including the clean-up of the failed save. With
``crash=True`` the process kills itself with ``SIGKILL`` at the failing call
instead of raising (run the save in a forked child): no clean-up code runs,
as in a power cut or an OOM kill. Reads can fail as well (``fail_read_at``),
and every call is logged in ``calls`` and ``reads`` so tests can also assert
what a function did *not* touch.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from treeckpt.store.backends import Backend, DirHold, Writer

__all__ = [
    "MUTATING_OPS",
    "READ_OPS",
    "Call",
    "FaultMode",
    "FaultyBackend",
    "InjectedFault",
]

#: Operations that change storage (counted by ``fail_at``).
MUTATING_OPS = frozenset(
    {
        "makedirs",
        "open_writer",
        "write",
        "close",
        "commit_file",
        "create_file",
        "remove",
        "remove_tree",
        "sync_dir",
    }
)
#: Operations that only read (counted by ``fail_read_at``).
READ_OPS = frozenset({"readinto", "read_file", "size", "listdir", "exists", "list_files"})

FaultMode = Literal["before", "torn", "after"]


class InjectedFault(OSError):
    """The error a :class:`FaultyBackend` raises: an ``OSError`` with ``errno.EIO``."""

    def __init__(self, call: Call) -> None:
        super().__init__(errno.EIO, f"injected fault at {call}")
        self.call = call


@dataclass(frozen=True, slots=True)
class Call:
    """One logged backend call: its position ``n`` in its log, the operation and the name."""

    n: int
    op: str
    name: str

    def __str__(self) -> str:
        return f"call #{self.n}: {self.op}({self.name!r})"


class FaultyBackend(Backend):
    """A backend wrapper that injects ``OSError`` faults into chosen calls.

    Args:
        inner: the real backend that does the work.
        fail_at: index (0-based) of the mutating call that fails; ``None``
            injects nothing (the wrapper only records).
        mode: ``"before"``, ``"torn"`` or ``"after"`` (see the module docs).
        sticky: every mutating call after the failing one fails too.
        fail_read_at: index (0-based) of the read call that fails, if any.
        crash: kill this process with ``SIGKILL`` at the failing call instead
            of raising (after the op's effect for ``"after"``, after half the
            bytes for ``"torn"``).
        ops: which mutating operations are counted (and can fail); default
            all of :data:`MUTATING_OPS`.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        fail_at: int | None = None,
        mode: FaultMode = "before",
        sticky: bool = False,
        fail_read_at: int | None = None,
        ops: Collection[str] = MUTATING_OPS,
        crash: bool = False,
    ) -> None:
        unknown = set(ops) - MUTATING_OPS
        if unknown:
            raise ValueError(f"not mutating operations: {sorted(unknown)}")
        if mode not in ("before", "torn", "after"):
            raise ValueError(f"mode must be 'before', 'torn' or 'after', got {mode!r}")
        self.inner = inner
        self.root = inner.root
        self.supports_fsync = inner.supports_fsync
        self.supports_exclusive_create = inner.supports_exclusive_create
        self.fail_at = fail_at
        self.mode: FaultMode = mode
        self.sticky = sticky
        self.fail_read_at = fail_read_at
        self.ops = frozenset(ops)
        self.crash = crash
        #: Every counted mutating call, in order (failed ones included).
        self.calls: list[Call] = []
        #: Every read call, in order.
        self.reads: list[Call] = []
        #: The calls that raised an injected fault.
        self.faults: list[Call] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ bookkeeping

    def _mutating(self, op: str, name: str) -> Call | None:
        """Log a mutating call; the Call if it must fail, else ``None``."""
        if op not in self.ops:
            return None
        with self._lock:
            call = Call(len(self.calls), op, name)
            self.calls.append(call)
            fail = self.fail_at is not None and (
                call.n == self.fail_at or (self.sticky and call.n > self.fail_at)
            )
            if fail:
                self.faults.append(call)
            return call if fail else None

    def _fail(self, call: Call) -> InjectedFault:
        """The error to raise for ``call`` (or the end of this process, when crashing)."""
        if self.crash:
            os.kill(os.getpid(), signal.SIGKILL)
        return InjectedFault(call)

    def _read(self, op: str, name: str) -> None:
        with self._lock:
            call = Call(len(self.reads), op, name)
            self.reads.append(call)
            fail = self.fail_read_at is not None and call.n == self.fail_read_at
            if fail:
                self.faults.append(call)
        if fail:
            raise InjectedFault(call)

    def _do(self, op: str, name: str, action: Callable[[], None]) -> None:
        call = self._mutating(op, name)
        if call is None:
            action()
            return
        if self.mode == "after":
            action()
        raise self._fail(call)

    @property
    def mutating_ops(self) -> list[str]:
        """The logged mutating calls as ``"op name"`` strings (handy in assertion messages)."""
        return [f"{c.op} {c.name}" for c in self.calls]

    # ---------------------------------------------------------------- backend

    def makedirs(self, name: str) -> None:
        self._do("makedirs", name, lambda: self.inner.makedirs(name))

    def open_writer(self, name: str) -> Writer:
        call = self._mutating("open_writer", name)
        if call is None:
            return _FaultyWriter(self, self.inner.open_writer(name), name)
        if self.mode == "after":
            self.inner.open_writer(name).abort()  # the file exists, the handle is lost
        raise self._fail(call)

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        self._read("readinto", name)
        return self.inner.readinto(name, offset, out)

    def read_file(self, name: str, max_bytes: int) -> bytes:
        self._read("read_file", name)
        return self.inner.read_file(name, max_bytes)

    def commit_file(self, name: str, data: bytes, *, sync: bool) -> None:
        self._do("commit_file", name, lambda: self.inner.commit_file(name, data, sync=sync))

    def size(self, name: str) -> int | None:
        self._read("size", name)
        return self.inner.size(name)

    def listdir(self, name: str = "") -> list[str]:
        self._read("listdir", name)
        return self.inner.listdir(name)

    def create_file(self, name: str, data: bytes, *, sync: bool) -> bool:
        created: list[bool] = []
        self._do(
            "create_file",
            name,
            lambda: created.append(self.inner.create_file(name, data, sync=sync)),
        )
        return created[0]

    def exists(self, name: str) -> bool:
        self._read("exists", name)
        return self.inner.exists(name)

    def list_files(self, name: str = "") -> list[str]:
        self._read("list_files", name)
        return self.inner.list_files(name)

    def remove(self, name: str) -> None:
        self._do("remove", name, lambda: self.inner.remove(name))

    def remove_tree(self, name: str) -> None:
        self._do("remove_tree", name, lambda: self.inner.remove_tree(name))

    def sync_dir(self, name: str = "") -> None:
        self._do("sync_dir", name, lambda: self.inner.sync_dir(name))

    def hold_dir(self, name: str) -> DirHold | None:
        return self.inner.hold_dir(name)  # a claim, not a change to storage: never fails

    def age_s(self, name: str) -> float | None:
        return self.inner.age_s(name)

    def unfinished(self) -> list[str]:
        return self.inner.unfinished()

    def close(self) -> None:
        self.inner.close()


class _FaultyWriter(Writer):
    def __init__(self, backend: FaultyBackend, inner: Writer, name: str) -> None:
        self._backend = backend
        self._inner = inner
        self._name = name

    def write(self, data: bytes | memoryview) -> None:
        call = self._backend._mutating("write", self._name)
        if call is None:
            self._inner.write(data)
            return
        mode = self._backend.mode
        if mode == "torn":
            view = memoryview(data).cast("B")
            self._inner.write(view[: len(view) // 2])
        elif mode == "after":
            self._inner.write(data)
        raise self._backend._fail(call)

    def tell(self) -> int:
        return self._inner.tell()

    def close(self, *, sync: bool) -> None:
        call = self._backend._mutating("close", self._name)
        if call is None:
            self._inner.close(sync=sync)
            return
        if self._backend.mode == "after":
            self._inner.close(sync=sync)
        raise self._backend._fail(call)

    def abort(self) -> None:
        self._inner.abort()

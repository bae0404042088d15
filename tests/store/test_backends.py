"""Backend conformance: one contract, checked on every backend.

The contract is :class:`treeckpt.testing.backends.BackendTests`, shipped so
that anyone's backend can be held to it. ``BackendContract`` adds what
treeckpt's own tests check on top (the fault-injecting wrapper over each
backend); each backend subclasses it with a ``backend`` fixture.
"""

from __future__ import annotations

import errno
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from treeckpt.store.backends import Backend, FsspecBackend, LocalBackend, open_backend
from treeckpt.testing.backends import BackendTests
from treeckpt.testing.faults import FaultyBackend, InjectedFault


def _write(backend: Backend, name: str, *parts: bytes, sync: bool = True) -> None:
    w = backend.open_writer(name)
    for p in parts:
        w.write(p)
    w.close(sync=sync)


class BackendContract(BackendTests):
    """The shipped contract, and treeckpt's fault-injecting wrapper over each backend."""

    def test_faulty_wrapper_passes_through(self, backend: Backend) -> None:
        fb = FaultyBackend(backend)
        fb.makedirs("d")
        _write(fb, "d/f.bin", b"abc", b"def")
        fb.commit_file("d/m.json", b"{}", sync=True)
        assert fb.read_file("d/f.bin", 10) == b"abcdef"
        assert [c.op for c in fb.calls] == [
            "makedirs",
            "open_writer",
            "write",
            "write",
            "close",
            "commit_file",
        ]
        assert [c.op for c in fb.reads] == ["read_file"]

    def test_faulty_wrapper_injects(self, backend: Backend) -> None:
        backend.makedirs("")
        fb = FaultyBackend(backend, fail_at=2, mode="torn")
        w = fb.open_writer("f.bin")
        w.write(b"0123")
        with pytest.raises(InjectedFault) as info:
            w.write(b"456789")
        assert isinstance(info.value, OSError)
        assert info.value.call.op == "write"
        w.abort()
        assert backend.read_file("f.bin", 100) == b"0123456"  # half of the torn write landed
        fb.commit_file("m.json", b"x", sync=False)  # a single, not sticky, fault
        sticky = FaultyBackend(backend, fail_at=0, sticky=True)
        for _ in range(3):
            with pytest.raises(InjectedFault):
                sticky.commit_file("m.json", b"y", sync=False)
        assert backend.read_file("m.json", 10) == b"x"
        after = FaultyBackend(backend, fail_at=0, mode="after")
        with pytest.raises(InjectedFault):
            after.commit_file("m.json", b"z", sync=False)
        assert backend.read_file("m.json", 10) == b"z"
        reads = FaultyBackend(backend, fail_read_at=1)
        reads.read_file("m.json", 10)
        with pytest.raises(InjectedFault):
            reads.read_file("m.json", 10)


class TestLocalBackend(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        b = LocalBackend(str(tmp_path / "root"))
        yield b
        b.close()

    def test_open_backend_picks_local(self, tmp_path: Path) -> None:
        assert isinstance(open_backend(str(tmp_path)), LocalBackend)
        b = open_backend(f"file://{tmp_path}")
        assert isinstance(b, LocalBackend)
        assert b.root == str(tmp_path)
        assert isinstance(open_backend("memory://x"), FsspecBackend)

    def test_root_is_absolute(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        assert LocalBackend("rel/ckpt").root == str(tmp_path / "rel" / "ckpt")
        assert LocalBackend.supports_fsync

    def test_writer_refuses_to_clobber(self, backend: Backend) -> None:
        backend.makedirs("")
        _write(backend, "f.bin", b"1")
        with pytest.raises(FileExistsError):
            backend.open_writer("f.bin")

    def test_abort_after_failed_close_leaves_other_descriptors_alone(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A writer whose fsync fails is closed once; its abort must not close a reused fd."""
        import treeckpt.store.backends._local as local

        backend.makedirs("")
        w = backend.open_writer("f.bin")
        w.write(b"data")

        def failing_fsync(fd: int) -> None:
            raise OSError(5, "EIO")

        monkeypatch.setattr(local.os, "fsync", failing_fsync)
        with pytest.raises(OSError):
            w.close(sync=True)
        monkeypatch.undo()
        fd = os.open(os.devnull, os.O_RDONLY)  # likely reuses the writer's fd number
        try:
            w.abort()
            os.fstat(fd)  # still open
        finally:
            os.close(fd)

    @pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")
    def test_hold_dir_is_exclusive_and_dies_with_its_process(self, backend: Backend) -> None:
        backend.makedirs("d")
        hold = backend.hold_dir("d")
        assert hold is not None
        with pytest.raises(BlockingIOError):
            backend.hold_dir("d")  # even from the same process
        hold.release()
        hold.release()  # idempotent
        again = backend.hold_dir("d")
        assert again is not None
        again.release()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child holds the claim and is killed
            backend.hold_dir("d")
            os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        after_death = backend.hold_dir("d")  # the kernel released it
        assert after_death is not None
        after_death.release()
        with pytest.raises(FileNotFoundError):
            backend.hold_dir("missing")

    def test_hold_dir_without_flock_support_falls_back_to_no_claim(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import treeckpt.store.backends._local as local

        def no_locks(fd: int, op: int) -> None:
            raise OSError(errno.ENOLCK, "No locks available")

        backend.makedirs("d")
        monkeypatch.setattr(local.fcntl, "flock", no_locks)
        assert backend.hold_dir("d") is None

    def test_age_is_the_newest_file(self, backend: Backend) -> None:
        backend.makedirs("d/e")
        _write(backend, "d/e/f.bin", b"x")
        old = time.time() - 7200
        for p in ("d", "d/e", "d/e/f.bin"):
            os.utime(os.path.join(backend.root, p), (old, old))
        age = backend.age_s("d")
        assert age is not None and age > 7000
        _write(backend, "d/e/g.bin", b"y")
        age = backend.age_s("d")
        assert age is not None and age < 600
        assert backend.age_s("missing") is None

    def test_commit_file_leaves_no_temp_file_on_failure(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import treeckpt.store.backends._local as local

        backend.makedirs("")
        backend.commit_file("m.json", b"old", sync=False)

        def failing_replace(src: str, dst: str) -> None:
            raise OSError(28, "ENOSPC")

        monkeypatch.setattr(local.os, "replace", failing_replace)
        with pytest.raises(OSError):
            backend.commit_file("m.json", b"new", sync=True)
        monkeypatch.undo()
        assert backend.listdir() == ["m.json"]
        assert backend.read_file("m.json", 10) == b"old"


class TestFsspecMemoryBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        url = f"memory://treeckpt-test-{uuid.uuid4().hex}/root"
        b = FsspecBackend(url)
        yield b
        b.close()
        fs = fsspec.filesystem("memory")
        if fs.exists(b.root):
            fs.rm(b.root, recursive=True)

    def test_abort_discards_the_handle(self, backend: Backend) -> None:
        super().test_abort_discards_the_handle(backend)
        assert not FsspecBackend.supports_fsync

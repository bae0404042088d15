"""Backend conformance: one contract, checked on every backend.

``BackendContract`` holds the tests; each backend subclasses it with a
``backend`` fixture. A new backend gets the whole suite by adding a subclass.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

from treeckpt.store.backends import Backend, FsspecBackend, LocalBackend, open_backend
from treeckpt.testing.faults import FaultyBackend, InjectedFault


def _write(backend: Backend, name: str, *parts: bytes, sync: bool = True) -> None:
    w = backend.open_writer(name)
    for p in parts:
        w.write(p)
    w.close(sync=sync)


class BackendContract:
    """The behaviour treeckpt relies on from every storage backend."""

    #: Commits raced against two readers in ``test_commit_file_is_atomic_for_concurrent_readers``.
    racing_commits = 150

    @pytest.fixture
    def backend(self) -> Iterator[Backend]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    def test_makedirs_is_idempotent_and_nested(self, backend: Backend) -> None:
        backend.makedirs("")
        backend.makedirs("a/b")
        backend.makedirs("a/b")
        backend.makedirs("a")
        _write(backend, "a/b/f.bin", b"x")
        assert backend.listdir("a") == ["b"]
        assert backend.listdir("a/b") == ["f.bin"]

    def test_writer_writes_sequentially_and_tells(self, backend: Backend) -> None:
        backend.makedirs("d")
        w = backend.open_writer("d/f.bin")
        assert w.tell() == 0
        w.write(b"hello ")
        assert w.tell() == 6
        w.write(memoryview(b"world"))
        arr = np.arange(4, dtype=np.float32)
        w.write(memoryview(arr))  # a non-byte format memoryview counts bytes
        assert w.tell() == 11 + 16
        w.write(b"")
        w.close(sync=True)
        assert backend.size("d/f.bin") == 27
        assert backend.read_file("d/f.bin", 100) == b"hello world" + arr.tobytes()

    def test_empty_file(self, backend: Backend) -> None:
        backend.makedirs("")
        _write(backend, "empty.bin")
        assert backend.size("empty.bin") == 0
        assert backend.read_file("empty.bin", 0) == b""

    def test_large_write(self, backend: Backend) -> None:
        backend.makedirs("")
        data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
        _write(backend, "big.bin", data[:1000], data[1000:])
        assert backend.size("big.bin") == len(data)
        out = bytearray(len(data))
        assert backend.readinto("big.bin", 0, memoryview(out)) == len(data)
        assert out == data

    def test_readinto_at_offsets(self, backend: Backend) -> None:
        backend.makedirs("")
        data = bytes(range(256)) * 4
        _write(backend, "f.bin", data)
        for off, n in [(0, 1), (0, 1024), (5, 17), (1000, 24), (255, 256)]:
            out = bytearray(n)
            assert backend.readinto("f.bin", off, memoryview(out)) == n
            assert bytes(out) == data[off : off + n]
        arr = np.zeros(4, dtype=np.uint32)  # a destination of another item format
        assert backend.readinto("f.bin", 4, memoryview(arr).cast("B")) == 16
        assert arr.tobytes() == data[4:20]

    def test_readinto_short_at_end_of_file(self, backend: Backend) -> None:
        backend.makedirs("")
        _write(backend, "f.bin", b"0123456789")
        out = bytearray(8)
        assert backend.readinto("f.bin", 6, memoryview(out)) == 4
        assert bytes(out[:4]) == b"6789"
        assert backend.readinto("f.bin", 10, memoryview(bytearray(3))) == 0
        assert backend.readinto("f.bin", 50, memoryview(bytearray(3))) == 0
        assert backend.read_range("f.bin", 8, 100) == b"89"

    def test_readinto_missing_file(self, backend: Backend) -> None:
        backend.makedirs("")
        with pytest.raises(FileNotFoundError):
            backend.readinto("nope.bin", 0, memoryview(bytearray(4)))

    def test_read_file_max_bytes(self, backend: Backend) -> None:
        backend.makedirs("")
        _write(backend, "f.json", b"x" * 100)
        assert backend.read_file("f.json", 100) == b"x" * 100
        assert backend.read_file("f.json", 1 << 40) == b"x" * 100
        with pytest.raises(ValueError):
            backend.read_file("f.json", 99)
        with pytest.raises(ValueError):
            backend.read_file("f.json", 0)
        with pytest.raises(FileNotFoundError):
            backend.read_file("missing.json", 100)

    def test_commit_file_creates_and_replaces(self, backend: Backend) -> None:
        backend.makedirs("sub")
        backend.commit_file("m.json", b"first", sync=True)
        assert backend.read_file("m.json", 100) == b"first"
        backend.commit_file("m.json", b"second, longer", sync=True)
        assert backend.read_file("m.json", 100) == b"second, longer"
        backend.commit_file("m.json", b"3", sync=False)
        assert backend.read_file("m.json", 100) == b"3"
        backend.commit_file("sub/i.json", b"index", sync=True)
        assert backend.read_file("sub/i.json", 100) == b"index"
        # no temporary files are left behind
        assert backend.listdir() == ["m.json", "sub"]
        assert backend.listdir("sub") == ["i.json"]

    def test_commit_file_is_atomic_for_concurrent_readers(self, backend: Backend) -> None:
        backend.makedirs("")
        versions = [bytes([65 + k]) * (1000 + 7919 * k) for k in range(4)]
        backend.commit_file("m.json", versions[0], sync=False)
        stop = threading.Event()
        seen: set[bytes] = set()
        bad: list[int] = []

        def reader() -> None:
            while not stop.is_set():
                try:
                    data = backend.read_file("m.json", 1 << 20)
                except FileNotFoundError:
                    bad.append(-1)  # the name must never disappear
                    continue
                if data in versions:
                    seen.add(data[:1])
                else:
                    bad.append(len(data))

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for n in range(self.racing_commits):
                backend.commit_file("m.json", versions[n % 4], sync=False)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not bad, f"readers saw torn or missing manifests: {bad[:5]}"

    def test_size(self, backend: Backend) -> None:
        backend.makedirs("d")
        assert backend.size("missing") is None
        assert backend.size("d/missing") is None
        _write(backend, "d/f.bin", b"abc")
        assert backend.size("d/f.bin") == 3
        backend.commit_file("d/g.json", b"12345", sync=False)
        assert backend.size("d/g.json") == 5

    def test_listdir(self, backend: Backend) -> None:
        assert backend.listdir("does-not-exist") == []
        backend.makedirs("d/e")
        _write(backend, "d/b.bin", b"1")
        _write(backend, "d/a.bin", b"2")
        backend.commit_file("d/c.json", b"3", sync=False)
        names = backend.listdir("d")
        assert names == ["a.bin", "b.bin", "c.json", "e"]
        assert all("/" not in n for n in names)
        assert "d" in backend.listdir()

    def test_remove_tree(self, backend: Backend) -> None:
        backend.makedirs("keep")
        backend.makedirs("gone/deeper/still")
        _write(backend, "gone/a.bin", b"1")
        _write(backend, "gone/deeper/b.bin", b"2")
        _write(backend, "keep/c.bin", b"3")
        backend.remove_tree("gone")
        assert backend.listdir("gone") == []
        assert backend.size("gone/a.bin") is None
        assert "gone" not in backend.listdir()
        assert backend.read_file("keep/c.bin", 10) == b"3"
        backend.remove_tree("gone")  # missing is fine
        backend.remove_tree("never-existed")

    def test_abort_discards_the_handle(self, backend: Backend) -> None:
        backend.makedirs("")
        w = backend.open_writer("f.bin")
        w.write(b"partial")
        w.abort()
        w.abort()  # idempotent
        backend.remove_tree("")
        assert backend.size("f.bin") is None

    def test_sync_dir_and_close(self, backend: Backend) -> None:
        backend.makedirs("d")
        backend.sync_dir()
        backend.sync_dir("d")
        _write(backend, "d/f.bin", b"abc")
        assert backend.read_file("d/f.bin", 3) == b"abc"
        backend.close()
        backend.close()
        # usable again after close: handles are reopened on demand
        out = bytearray(3)
        assert backend.readinto("d/f.bin", 0, memoryview(out)) == 3
        backend.close()

    def test_remove_tree_removes_a_single_file(self, backend: Backend) -> None:
        backend.makedirs("")
        backend.commit_file("m.json.tmp-1-2", b"torn", sync=False)
        backend.commit_file("keep.json", b"k", sync=False)
        backend.remove_tree("m.json.tmp-1-2")
        assert backend.size("m.json.tmp-1-2") is None
        assert backend.read_file("keep.json", 1) == b"k"

    def test_age_of_what_was_just_written(self, backend: Backend) -> None:
        backend.makedirs("d")
        _write(backend, "d/f.bin", b"x")
        age = backend.age_s("d")
        assert age is None or 0 <= age < 600  # None: the store cannot tell
        assert backend.unfinished() == []

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

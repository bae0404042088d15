"""The storage backend conformance suite: one contract, checked on any backend.

Every backend treeckpt ships passes it, and so can yours. Subclass
:class:`BackendTests` in a pytest module and give it a ``backend`` fixture
that yields a fresh backend whose root holds nothing::

    import pytest
    from treeckpt.testing.backends import BackendTests

    class TestMyBackend(BackendTests):
        @pytest.fixture
        def backend(self, tmp_path):
            b = MyBackend(str(tmp_path / "root"))
            yield b
            b.close()

pytest then runs every test of the contract against it: writers, ranged
reads, size caps, atomic replacement under concurrent readers, listings,
removals, the small files the checkpoint manager writes (``create_file``,
``exists``, ``remove``, ``list_files``), clean-up hints. A store that cannot
do something the way a local disk does (object stores have no empty
directories) overrides that one test with its own expectation. It needs
``pytest`` (the ``test`` extra); importing ``treeckpt.testing`` alone does not.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from treeckpt.store.backends import Backend

__all__ = ["BackendTests"]


def _write(backend: Backend, name: str, *parts: bytes, sync: bool = True) -> None:
    w = backend.open_writer(name)
    for p in parts:
        w.write(p)
    w.close(sync=sync)


class BackendTests:
    """The behaviour treeckpt relies on from every storage backend.

    Override the ``backend`` fixture; ``racing_commits`` sets how many commits
    race two readers (lower it for a slow remote store).
    """

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
        w.write(arr.data)  # a non-byte format memoryview counts bytes
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
        assert backend.readinto("f.bin", 4, arr.data.cast("B")) == 16
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

    # ------------------------------------------- what the checkpoint manager uses

    def test_exists(self, backend: Backend) -> None:
        backend.makedirs("d")
        assert not backend.exists("missing")
        assert not backend.exists("d/missing")
        backend.commit_file("d/m.json", b"{}", sync=False)
        _write(backend, "d/empty.bin")
        assert backend.exists("d/m.json")
        assert backend.exists("d/empty.bin")  # an empty file exists
        assert backend.exists("d")  # a directory (a prefix) holding files exists
        backend.remove_tree("d")
        assert not backend.exists("d/m.json")
        assert not backend.exists("d")

    def test_remove_one_file(self, backend: Backend) -> None:
        backend.makedirs("d")
        for name in ("d/gone.json", "d/kept.json"):
            backend.commit_file(name, name.encode(), sync=False)
        for _ in range(2):  # the second time it is missing, which is fine
            backend.remove("d/gone.json")
            assert backend.size("d/gone.json") is None
            assert backend.listdir("d") == ["kept.json"]
        backend.remove("never-existed")

    def test_list_files_is_recursive_and_relative_to_the_root(self, backend: Backend) -> None:
        assert backend.list_files("missing") == []
        backend.makedirs("s/d")
        for data_file in ("s/d/r0-0.bin", "s/d/r1-0.bin"):
            _write(backend, data_file, b"x")
        for small in ("s/m.json", "s/retired", "other.json"):
            backend.commit_file(small, b"", sync=False)
        assert backend.list_files("s") == ["s/d/r0-0.bin", "s/d/r1-0.bin", "s/m.json", "s/retired"]
        assert backend.list_files("s/d") == ["s/d/r0-0.bin", "s/d/r1-0.bin"]
        assert backend.list_files() == [
            "other.json",
            "s/d/r0-0.bin",
            "s/d/r1-0.bin",
            "s/m.json",
            "s/retired",
        ]

    def test_create_file_only_when_absent(self, backend: Backend) -> None:
        backend.makedirs("")
        assert backend.create_file("lock", b"first", sync=True)
        assert not backend.create_file("lock", b"second", sync=False)
        assert backend.read_file("lock", 100) == b"first"
        backend.remove("lock")
        assert backend.create_file("lock", b"third", sync=False)
        assert backend.read_file("lock", 100) == b"third"
        assert backend.listdir() == ["lock"]  # no temporary files are left behind

    def test_create_file_races(self, backend: Backend) -> None:
        """Exclusive backends let exactly one of racing creators win; the others at least one,
        and the file holds one creator's bytes whole."""
        backend.makedirs("")
        writers = 8
        start = threading.Barrier(writers)
        won: list[int] = []

        def create(k: int) -> None:
            start.wait()
            if backend.create_file("lock", bytes([65 + k]) * 64, sync=False):
                won.append(k)

        threads = [threading.Thread(target=create, args=(k,)) for k in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if backend.supports_exclusive_create:
            assert len(won) == 1
            assert backend.read_file("lock", 100) == bytes([65 + won[0]]) * 64
        else:
            assert won
            assert backend.read_file("lock", 100) in {bytes([65 + k]) * 64 for k in won}

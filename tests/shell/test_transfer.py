"""The device-copy logic (shell/transfer.py) on a fake device whose copies run late or at once.

A ``lazy`` fake runs each copy only when its mark, or a later one, is waited
for (as a GPU stream may): a read of a buffer before its copy's mark is
waited for sees the fill pattern, and a buffer reused before the copy out of
it ran gives the later bytes. An ``eager`` fake runs each copy when issued:
a copy issued into a buffer whose bytes are still being used overwrites them.
Either mistake changes the bytes the tests compare.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import treeckpt
from treeckpt.core.options import LoadOptions, SaveOptions
from treeckpt.shell.transfer import (
    DeviceChunk,
    HostPool,
    LaneFetcher,
    Uploads,
    lane_fetchers,
    using_device,
)

FILL = 0xA5  # what a fresh host buffer holds


class _FakeMark:
    def __init__(self, dev: FakeDevice, seq: int) -> None:
        self._dev, self._seq = dev, seq

    def wait(self) -> None:
        self._dev.run_until(self._seq)


class FakeDevice:
    """A copy device over CPU tensors; ``lazy``: copies run in issue order, when waited for."""

    pinned = False

    def __init__(self, lazy: bool) -> None:
        self.key = f"fake-{'lazy' if lazy else 'eager'}"
        self.lazy = lazy
        self.log: list[str] = []
        self.buffers = 0
        self._queue: list[tuple[int, Callable[[], None]]] = []
        self._issued = 0
        self._lock = threading.Lock()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return torch.full((nbytes,), FILL, dtype=torch.uint8)

    def _issue(self, what: str, dst: torch.Tensor, src: torch.Tensor) -> _FakeMark:
        assert dst.shape == src.shape and dst.dtype == src.dtype

        def run() -> None:
            with torch.no_grad():
                dst.copy_(src)

        with self._lock:
            self._issued += 1
            seq = self._issued
            self.log.append(f"{what} {seq}")
            if not self.lazy:
                run()
            else:
                self._queue.append((seq, run))
        return _FakeMark(self, seq)

    def point(self, t: torch.Tensor) -> Any:
        return None

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> _FakeMark:
        return self._issue("d2h", dst, src)

    def to_device(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> _FakeMark:
        return self._issue("h2d", dst, src)

    def run_until(self, seq: int) -> None:
        with self._lock:
            while self._queue and self._queue[0][0] <= seq:
                self._queue.pop(0)[1]()

    @property
    def pending(self) -> int:
        return len(self._queue)


@pytest.fixture(params=[True, False], ids=["lazy", "eager"])
def fake(request: Any) -> FakeDevice:
    return FakeDevice(lazy=request.param)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_pool_gives_a_buffer_back_only_after_the_copy_out_of_it_ran() -> None:
    dev, pool = FakeDevice(lazy=True), HostPool()
    on_device = torch.zeros(16, dtype=torch.uint8)
    buf = pool.take(dev, 16)
    buf.copy_(torch.arange(16, dtype=torch.uint8))
    pool.give(dev, buf, dev.to_device(on_device, buf))  # upload still pending
    again = pool.take(dev, 16)
    assert again is buf and dev.pending == 0  # taking it waited for the upload
    again.fill_(99)  # the next load's bytes
    assert on_device.tolist() == list(range(16))


def test_pool_reuses_by_size_and_key_and_drops_beyond_its_limit() -> None:
    lazy, eager = FakeDevice(lazy=True), FakeDevice(lazy=False)
    pool = HostPool(keep_bytes=250)
    a = pool.take(lazy, 100)
    pool.give(lazy, a)
    assert pool.take(eager, 100) is not a  # another kind of host memory
    assert pool.take(lazy, 300) is not a  # too small
    assert pool.take(lazy, 40) is not a  # more than twice as large: kept for larger ones
    assert pool.take(lazy, 60) is a
    assert pool.allocated == 4
    b, c, d = (pool.take(lazy, 100) for _ in range(3))
    for buf in (a, b, c, d):
        pool.give(lazy, buf)
    assert pool.nbytes == 200  # the two oldest were dropped
    assert pool.take(lazy, 100) in (c, d)
    pool.clear()
    assert pool.nbytes == 0


def _chunks(dev: FakeDevice) -> tuple[list[torch.Tensor], list[DeviceChunk]]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 40, generator=g)
    parts = [base[k] for k in range(6)] + [base[:, 3], torch.randn(3, generator=g)]
    return parts, [DeviceChunk(dev, p) for p in parts]


def _run_lane(fetcher: LaneFetcher, chunks: list[DeviceChunk]) -> list[bytes]:
    """What a writer lane does: fetch, then encode (here: copy the bytes out), in order."""
    out = []
    for i, chunk in enumerate(chunks):
        ahead = chunks[i + 1] if i + 1 < len(chunks) else None
        raw = fetcher.fetch(chunk, ahead)
        out.append(bytes(raw))
    fetcher.close()
    return out


def test_lane_double_buffers_and_reuses_two_buffers_across_saves(fake: FakeDevice) -> None:
    parts, chunks = _chunks(fake)
    pool = HostPool()
    for _ in range(2):  # two saves of the same state
        assert _run_lane(LaneFetcher(pool, 160), chunks) == [_bits(p) for p in parts]
    assert fake.buffers == 2  # two per lane, allocated by the first save only
    assert fake.pending == 0


def test_lane_starts_the_next_copy_before_returning_the_current_bytes() -> None:
    dev = FakeDevice(lazy=True)
    parts, chunks = _chunks(dev)
    fetcher = LaneFetcher(HostPool(), 160)
    raw = fetcher.fetch(chunks[0], chunks[1])
    assert dev.log == ["d2h 1", "d2h 2"] and dev.pending == 1  # chunk 1 copies meanwhile
    assert bytes(raw) == _bits(parts[0])
    raw = fetcher.fetch(chunks[1], None)
    assert dev.log == ["d2h 1", "d2h 2"] and bytes(raw) == _bits(parts[1])
    fetcher.close()


def test_lane_calls_sources_that_are_not_on_a_device(fake: FakeDevice) -> None:
    parts, chunks = _chunks(fake)
    host = np.arange(12, dtype=np.uint8)
    mixed: list[Any] = [chunks[0], lambda: host, chunks[1], chunks[2]]
    fetcher = LaneFetcher(HostPool(), 160)
    got = []
    for i, s in enumerate(mixed):
        got.append(bytes(fetcher.fetch(s, mixed[i + 1] if i + 1 < len(mixed) else None)))
    fetcher.close()
    assert got == [_bits(parts[0]), host.tobytes(), _bits(parts[1]), _bits(parts[2])]


def test_a_lane_that_stops_early_gives_its_in_flight_buffer_back_with_its_mark() -> None:
    dev = FakeDevice(lazy=True)
    _, chunks = _chunks(dev)
    pool = HostPool()
    fetcher = LaneFetcher(pool, 160)
    fetcher.fetch(chunks[0], chunks[1])
    fetcher.close()  # the lane failed: chunk 1's copy is still pending
    assert dev.pending == 1
    pool.take(dev, 160)
    pool.take(dev, 160)
    assert dev.pending == 0  # the buffer it targets was handed out only after it ran


def test_lane_fetchers_only_for_device_chunks() -> None:
    dev = FakeDevice(lazy=False)
    _, chunks = _chunks(dev)
    assert lane_fetchers([lambda: np.zeros(1, np.uint8)], 1 << 20) is None
    make = lane_fetchers(list(chunks), 100)
    assert make is not None and make()._size == 100  # capped by the chunk size
    make = lane_fetchers(list(chunks), 1 << 20)
    assert make is not None and make()._size == 160  # the largest chunk


def test_uploads_keep_each_buffer_until_its_copy_ran(fake: FakeDevice) -> None:
    pool = HostPool()
    uploads = Uploads(pool)
    targets = [torch.zeros(4, 5, dtype=torch.bfloat16) for _ in range(3)]
    sources = [torch.randn(4, 5).to(torch.bfloat16) for _ in range(3)]
    for t, s in zip(targets, sources, strict=True):
        alloc, upload = uploads.parts(fake, t, (4, 5, 2))
        arr = alloc()
        arr[...] = s.view(torch.uint8).numpy().reshape(4, 5, 2)
        upload(arr)
    uploads.wait()
    assert [_bits(t) for t in targets] == [_bits(s) for s in sources]
    assert fake.buffers == 1 and fake.pending == 0


def _tree() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 48, generator=g)
    return {
        "w": w,
        "bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "view": torch.randn(40, 30, generator=g).t(),  # not contiguous
        "i64": torch.arange(1000, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.arange(77) % 3 == 0,
        "c64": torch.randn(20, 2, generator=g).view(torch.complex64).squeeze(1),
        "step": 3,
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and v.shape == b[k].shape, k
            assert _bits(v) == _bits(b[k]), k
        else:
            assert v == b[k], k


@pytest.mark.parametrize("threads", [1, 2])
def test_save_and_load_through_the_device_path(
    fake: FakeDevice, tmp_path: Path, threads: int
) -> None:
    tree = _tree()
    options = SaveOptions(chunk_bytes=1000, io_threads=threads)
    with using_device(fake):
        treeckpt.save(tree, tmp_path / "ck", options=options)
        assert fake.log and all(e.startswith("d2h") for e in fake.log)
        copies = len(fake.log)
        template = {
            k: torch.full_like(v, 3) if isinstance(v, torch.Tensor) else 0 for k, v in tree.items()
        }
        ptrs = {k: v.data_ptr() for k, v in template.items() if isinstance(v, torch.Tensor)}
        treeckpt.load(template, tmp_path / "ck", options=LoadOptions(io_threads=threads))
        assert len(fake.log) > copies and fake.pending == 0
        back = treeckpt.restore(tmp_path / "ck")
    _same(template, tree)
    _same(back, tree)
    assert all(template[k].data_ptr() == p for k, p in ptrs.items())  # filled in place
    # Without the fake device, the same checkpoint reads the same bytes.
    _same(treeckpt.restore(tmp_path / "ck"), tree)


def test_async_save_stages_before_returning(tmp_path: Path) -> None:
    dev = FakeDevice(lazy=True)
    tree = _tree()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tree.items()}
    saver = treeckpt.AsyncSaver()
    with using_device(dev):
        fut = saver.save(tree, tmp_path / "ck", options=SaveOptions(chunk_bytes=1000))
        assert dev.pending == 0  # every staging copy ran before it returned
        for v in tree.values():
            if isinstance(v, torch.Tensor):
                v.fill_(1)  # training goes on
        fut.result(timeout=60)
        saver.close()
    _same(treeckpt.restore(tmp_path / "ck"), before)


def test_free_host_buffers_releases_the_pooled_and_staging_memory(tmp_path: Path) -> None:
    from treeckpt.shell.transfer import HOST_POOL

    treeckpt.free_host_buffers()
    tree = _tree()
    with using_device(FakeDevice(lazy=False)):
        options = SaveOptions(chunk_bytes=1000, io_threads=1)
        treeckpt.save(tree, tmp_path / "a", options=options)
        treeckpt.async_save(tree, tmp_path / "b", options=options).result(timeout=60)
    pooled = HOST_POOL.nbytes
    assert pooled == 2 * 1000  # one lane, two buffers of the chunk size
    staged = sum(v.numel() * v.element_size() for v in tree.values() if isinstance(v, torch.Tensor))
    assert treeckpt.free_host_buffers() == pooled + staged
    assert HOST_POOL.nbytes == 0
    assert treeckpt.free_host_buffers() == 0


def test_a_save_lane_fetches_each_chunk_with_the_next_one_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, Any]] = []
    real = LaneFetcher.fetch

    def record(self: LaneFetcher, source: Any, ahead: Any) -> Any:
        calls.append((source, ahead))
        return real(self, source, ahead)

    monkeypatch.setattr(LaneFetcher, "fetch", record)
    dev = FakeDevice(lazy=True)
    with using_device(dev):
        treeckpt.save(_tree(), tmp_path / "ck", options=SaveOptions(chunk_bytes=1000, io_threads=1))
    assert len(calls) > 10
    # One lane: every call names as ahead the source of the next call, the last none.
    assert [a for _, a in calls] == [s for s, _ in calls[1:]] + [None]
    # Each chunk's copy was issued by the call before its own, except the first one's.
    assert len(dev.log) == len(calls) and dev.pending == 0

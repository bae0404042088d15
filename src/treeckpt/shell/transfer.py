"""Copies between device memory and host memory: a save's device-to-host pipeline, a load's uploads.

The device-specific part is a small interface, :class:`CopyDevice`: host
buffers (pinned for CUDA), copies that are issued now and complete later,
and a :class:`Mark` to wait for each. Everything else is written once against
it: which host buffer a chunk goes to, when a buffer may be reused, in which
order copies are issued and waited for. So it runs, and is tested, on
machines without a GPU: :class:`HostDevice` copies at once, and a test
device may defer its copies to the last moment, so that a missing wait or a
buffer reused too early gives wrong bytes.

- Saving (:class:`LaneFetcher`): each writer lane of ``store/chunks.py``
  holds at most two host buffers from the process-wide :data:`HOST_POOL`.
  While it encodes and writes chunk *n* from one, chunk *n+1* is copied
  from the device into the other (on CUDA: on a side stream, after the work
  already queued on the tensor's stream). The buffers go back to the pool
  when the lane ends and serve the next save; nothing is allocated then.
- Loading (:class:`Uploads`): a device tensor's bytes are read into a
  pooled host buffer; once the last chunk has landed, the buffer is copied to
  the tensor without waiting and goes back to the pool with the copy's mark,
  which whoever takes the buffer next waits for. The load waits for every
  mark before it returns.

CPU tensors do not come here: a chunk of one is a view of its memory (a
save) or is filled in place (a load). Tensors on any other device than CUDA
use :class:`HostDevice` (plain buffers, synchronous copies).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "DONE",
    "HOST_POOL",
    "CopyDevice",
    "CudaDevice",
    "DeviceChunk",
    "HostDevice",
    "HostPool",
    "LaneFetcher",
    "Mark",
    "Uploads",
    "device_for",
    "lane_fetchers",
    "using_device",
]

Bytes1D = npt.NDArray[np.uint8]


class Mark(Protocol):
    """The completion of an issued copy."""

    def wait(self) -> None:
        """Return once the copy is complete (its source may change, its destination be read)."""


class CopyDevice(Protocol):
    """What differs between devices: host memory, and copies that complete later.

    ``key`` names the kind of host buffer the device uses: buffers of one key
    are interchangeable (the pool shares them between devices of one key).
    """

    key: str
    pinned: bool

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A fresh 1-d uint8 host tensor of ``nbytes`` bytes (pinned when the device wants it)."""

    def point(self, t: torch.Tensor) -> Any:
        """The work queued on device tensor ``t`` so far, as the calling thread sees it.

        A copy issued later, from any thread, with ``after=`` this point runs
        after that work (``None``: nothing to wait for).
        """

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Mark:
        """Issue the copy of device tensor ``src`` into host tensor ``dst`` (same dtype, shape)."""

    def to_device(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Mark:
        """Issue the copy of host tensor ``src`` into device tensor ``dst`` (same dtype, shape)."""


class _Done:
    def wait(self) -> None:
        return None


DONE: Mark = _Done()
"""The mark of a copy that completed when it was issued."""


class HostDevice:
    """Plain host buffers and synchronous copies: CPU-only machines and devices other than CUDA."""

    key = "host"
    pinned = False

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def point(self, t: torch.Tensor) -> Any:
        return None

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Mark:
        with torch.no_grad():
            dst.copy_(src)
        return DONE

    def to_device(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Mark:
        with torch.no_grad():
            dst.copy_(src)
        return DONE


class _EventMark:
    __slots__ = ("_event",)

    def __init__(self, event: Any) -> None:
        self._event = event

    def wait(self) -> None:
        self._event.synchronize()


class CudaDevice:
    """Pinned host buffers; copies on a side stream per thread and device, marked by events.

    A copy's stream first waits for the work queued on the device tensor's
    stream (what produced the data, or last used the destination): up to
    ``after`` (an event recorded by :meth:`point` in the thread that owns the
    work), else up to now on the calling thread's current stream. The tensor is recorded on the side stream so that the
    caching allocator does not hand its memory out before the copy is done.
    """

    key = "cuda-pinned"
    pinned = True

    def __init__(self) -> None:
        self._local = threading.local()

    def _stream(self, device: torch.device) -> Any:
        streams = getattr(self._local, "streams", None)
        if streams is None:
            streams = self._local.streams = {}
        stream = streams.get(device)
        if stream is None:
            stream = streams[device] = torch.cuda.Stream(device=device)
        return stream

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def point(self, t: torch.Tensor) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(t.device))
        return event

    def _copy(
        self, dst: torch.Tensor, src: torch.Tensor, on_device: torch.Tensor, after: Any
    ) -> Mark:
        device = on_device.device
        stream = self._stream(device)
        if after is None:
            stream.wait_stream(torch.cuda.current_stream(device))
        else:
            stream.wait_event(after)
        with torch.cuda.stream(stream), torch.no_grad():
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        on_device.record_stream(stream)
        return _EventMark(event)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Mark:
        return self._copy(dst, src, src, after)

    def to_device(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Mark:
        return self._copy(dst, src, dst, after)


_HOST = HostDevice()
_CUDA = CudaDevice()
_override: CopyDevice | None = None


def device_for(t: torch.Tensor) -> CopyDevice | None:
    """The copy device for a tensor's memory; ``None`` for a CPU tensor (no copy needed)."""
    if _override is not None:
        return _override
    kind = t.device.type
    if kind == "cpu":
        return None
    return _CUDA if kind == "cuda" else _HOST


@contextlib.contextmanager
def using_device(device: CopyDevice) -> Iterator[None]:
    """Treat every tensor, CPU ones included, as living on ``device`` (for tests)."""
    global _override
    previous, _override = _override, device
    try:
        yield
    finally:
        _override = previous


class HostPool:
    """Host buffers kept from one save or load to the next, shared by every lane.

    A buffer given back carries the mark of the last copy that uses it; whoever
    takes it next waits for that mark first. Free buffers beyond
    ``keep_bytes`` are dropped (the oldest first).
    """

    def __init__(self, keep_bytes: int = 4 << 30) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[tuple[str, torch.Tensor, Mark]] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made so far (reuse shows as no change)

    @property
    def nbytes(self) -> int:
        """Host memory the free buffers hold."""
        with self._lock:
            return sum(b.numel() for _, b, _ in self._free)

    def take(self, device: CopyDevice, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (at most twice that, when one is free) for ``device``."""
        with self._lock:
            best = None
            for n, (key, buf, _) in enumerate(self._free):
                size = buf.numel()
                fits = key == device.key and nbytes <= size <= 2 * max(nbytes, 1)
                if fits and (best is None or size < self._free[best][1].numel()):
                    best = n
            if best is not None:
                _, buf, mark = self._free.pop(best)
            else:
                self.allocated += 1
        if best is None:
            return device.host_buffer(nbytes)
        mark.wait()  # the last copy into or out of it is complete
        return buf

    def give(self, device: CopyDevice, buf: torch.Tensor, mark: Mark = DONE) -> None:
        """Return ``buf``; ``mark``: the copy still using it, if any."""
        with self._lock:
            self._free.append((device.key, buf, mark))
            total = sum(b.numel() for _, b, _ in self._free)
            while self._free and total > self.keep_bytes:
                _, dropped, _ = self._free.pop(0)
                total -= dropped.numel()

    def clear(self) -> None:
        """Drop every free buffer (after the copies still using them)."""
        with self._lock:
            free, self._free = self._free, []
        for _, _, mark in free:
            mark.wait()


HOST_POOL = HostPool()
"""The process-wide pool of a save's lanes and a load's uploads."""


class DeviceChunk:
    """The raw bytes of one chunk of a device tensor, to be copied to the host.

    A writer lane copies it into one of its pooled buffers
    (:class:`LaneFetcher`); called directly, it copies into fresh host memory.
    """

    __slots__ = ("after", "device", "nbytes", "tensor")

    def __init__(self, device: CopyDevice, tensor: torch.Tensor, after: Any = None) -> None:
        self.device = device
        self.tensor = tensor.detach().resolve_conj().resolve_neg()
        self.nbytes = self.tensor.numel() * self.tensor.element_size()
        self.after = after  # the producer's work the copy waits for (a lane copies later)

    def issue(self, buf: torch.Tensor) -> Mark:
        """Start copying into the first ``nbytes`` of host buffer ``buf``."""
        t = self.tensor
        dst = buf[: self.nbytes].view(t.dtype).view(t.shape)
        return self.device.to_host(dst, t, self.after)

    def __call__(self) -> Bytes1D:
        buf = self.device.host_buffer(self.nbytes)
        self.issue(buf).wait()
        return buf.numpy()


class LaneFetcher:
    """One writer lane's device-to-host copies, double-buffered.

    ``fetch(source, ahead)`` returns the raw bytes of ``source`` and starts
    copying ``ahead`` (the lane's next chunk) into the lane's other buffer,
    so that copy runs while the lane encodes and writes. The lane calls
    ``fetch`` again only when it is done with the bytes returned before: that
    buffer is free then. Sources that are not :class:`DeviceChunk` are called.
    """

    def __init__(self, pool: HostPool, size: int) -> None:
        self._pool = pool
        self._size = size
        self._current: tuple[CopyDevice, torch.Tensor] | None = None
        self._ahead: tuple[DeviceChunk, torch.Tensor, Mark] | None = None

    def _take(self, chunk: DeviceChunk) -> torch.Tensor:
        return self._pool.take(chunk.device, max(chunk.nbytes, self._size))

    def fetch(self, source: Callable[[], Bytes1D], ahead: Callable[[], Bytes1D] | None) -> Bytes1D:
        self._drop_current()
        if isinstance(source, DeviceChunk):
            if self._ahead is not None and self._ahead[0] is source:
                _, buf, mark = self._ahead
                self._ahead = None
            else:
                self._drop_ahead()
                buf = self._take(source)
                mark = source.issue(buf)
            self._current = (source.device, buf)
            mark.wait()
            raw: Bytes1D = buf[: source.nbytes].numpy()
        else:
            raw = source()
        if isinstance(ahead, DeviceChunk) and self._ahead is None:
            nxt = self._take(ahead)
            self._ahead = (ahead, nxt, ahead.issue(nxt))
        return raw

    def _drop_current(self) -> None:
        if self._current is not None:
            device, buf = self._current
            self._current = None
            self._pool.give(device, buf)

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            chunk, buf, mark = self._ahead
            self._ahead = None
            self._pool.give(chunk.device, buf, mark)

    def close(self) -> None:
        """Give the lane's buffers back (one may still be the target of a copy: its mark goes too)."""
        self._drop_current()
        self._drop_ahead()


def lane_fetchers(
    sources: list[Callable[[], Bytes1D]], chunk_bytes: int, pool: HostPool | None = None
) -> Callable[[], LaneFetcher] | None:
    """A factory of lane fetchers when some of ``sources`` are device chunks, else ``None``.

    Each lane's buffers are as large as the largest device chunk of the save
    (at most ``chunk_bytes`` unless a chunk is larger), so they fit every chunk
    and serve the next save of the same state again.
    """
    sizes = [s.nbytes for s in sources if isinstance(s, DeviceChunk)]
    if not sizes:
        return None
    size = min(max(sizes), chunk_bytes)
    use = HOST_POOL if pool is None else pool
    return lambda: LaneFetcher(use, size)


class Uploads:
    """The host-to-device copies of one load.

    :meth:`parts` gives a destination its staging allocation (a pooled host
    buffer) and its finishing copy (issued without waiting; the buffer goes
    back to the pool with the copy's mark). :meth:`wait` returns once every
    copy issued has completed.
    """

    def __init__(self, pool: HostPool | None = None) -> None:
        self._pool = HOST_POOL if pool is None else pool
        self._marks: list[Mark] = []
        self._lock = threading.Lock()

    def parts(
        self, device: CopyDevice, t: torch.Tensor, byte_shape: tuple[int, ...]
    ) -> tuple[Callable[[], Bytes1D], Callable[[Bytes1D], None]]:
        nbytes = t.numel() * t.element_size()
        taken: list[torch.Tensor] = []
        after = device.point(t)  # what is queued on it now; the upload runs after it

        def alloc() -> Bytes1D:
            buf = self._pool.take(device, nbytes)
            taken.append(buf)
            arr: Bytes1D = buf[:nbytes].numpy().reshape(byte_shape)
            return arr

        def upload(_: Bytes1D) -> None:
            buf = taken.pop()
            mark = device.to_device(t, buf[:nbytes].view(t.dtype).view(t.shape), after)
            self._pool.give(device, buf, mark)
            with self._lock:
                self._marks.append(mark)

        return alloc, upload

    def wait(self) -> None:
        with self._lock:
            marks, self._marks = self._marks, []
        for mark in marks:
            mark.wait()

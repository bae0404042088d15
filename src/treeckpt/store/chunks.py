"""Chunk I/O: the write pipeline and the read pipeline of one rank.

Writing: a rank's chunks are spread over ``io_threads`` threads by size;
each thread encodes (shuffle, zstd) and appends to its own data file, so
compression and I/O of different chunks overlap (zstandard, numpy copies and
file writes all release the GIL) and each file is written sequentially. A
thread holds at most one chunk in flight (two when its fetcher gets the next
one ahead, e.g. copies it from a GPU meanwhile), so extra memory stays at a
few chunks per thread.

Reading: chunks are read with ranged reads in parallel, checksummed before
they are decoded, and decoded straight into the destination's memory when the
destination region is contiguous (raw chunks are read directly into it).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from treeckpt.core.box import Box
from treeckpt.core.incremental import ReuseTable
from treeckpt.core.manifest import ChunkRef, DataFile
from treeckpt.core.options import SaveOptions
from treeckpt.core.plan import WriteItem
from treeckpt.errors import CheckpointError, CorruptChunkError
from treeckpt.store import layout
from treeckpt.store.backends import Backend, Writer
from treeckpt.store.checksum import checksum, content_digest
from treeckpt.store.codecs import ChunkEncoder, codec_for
from treeckpt.store.decode import ChunkDecoder

__all__ = [
    "ChunkFetcher",
    "ReadTarget",
    "ReadTask",
    "RegionSink",
    "WriteJob",
    "read_chunks",
    "write_chunks",
]

Bytes1D = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class WriteJob:
    """One chunk to write: its plan item and a function giving its raw bytes (1-d uint8).

    ``compress``: whether the chunk may be compressed, or a function asked
    just before it is encoded (the save's codec policy may decide late).
    """

    item: WriteItem
    itemsize: int
    source: Callable[[], Bytes1D]
    compress: bool | Callable[[], bool] = True


class ChunkFetcher(Protocol):
    """How one writer lane gets its chunks' raw bytes (e.g. copied from a device).

    ``fetch(source, ahead)`` returns the bytes of ``source`` and may start
    getting ``ahead`` (the lane's next source, or ``None``) while the lane
    encodes and writes; the lane calls it again only once it is done with the
    bytes returned before (a backend's ``write`` has consumed them when it
    returns). ``close()`` ends the lane (after success or failure).
    """

    def fetch(
        self, source: Callable[[], Bytes1D], ahead: Callable[[], Bytes1D] | None
    ) -> Bytes1D: ...

    def close(self) -> None: ...


def write_chunks(
    backend: Backend,
    save_id: str,
    rank: int,
    jobs: Sequence[WriteJob],
    options: SaveOptions,
    reuse: ReuseTable | None = None,
    fetcher: Callable[[], ChunkFetcher] | None = None,
) -> tuple[tuple[DataFile, ...], tuple[ChunkRef, ...]]:
    """Encode and write ``jobs``; returns the data files and chunk refs (in job order).

    ``fetcher``: makes each lane's :class:`ChunkFetcher` (without one, a
    lane calls each job's source when it comes to it).

    With ``reuse`` (an incremental save), every chunk's raw bytes are hashed
    before encoding; a chunk whose content the table holds is referenced
    (no compression, no write) and its sibling's data file is listed among
    the files. A lane that writes nothing creates no file.
    """
    nthreads = max(1, min(options.io_threads, len(jobs)))
    lanes: list[list[int]] = [[] for _ in range(nthreads)]
    load = [0] * nthreads
    for n in sorted(range(len(jobs)), key=lambda n: -jobs[n].item.nbytes):
        k = min(range(nthreads), key=lambda k: (load[k], k))
        lanes[k].append(n)
        load[k] += jobs[n].item.nbytes
    for lane in lanes:
        lane.sort()
    refs: list[ChunkRef | None] = [None] * len(jobs)
    files: list[DataFile | None] = [None] * nthreads
    abort = threading.Event()

    def run_lane(k: int) -> None:
        name = layout.data_file(save_id, rank, k)
        lane = _Lane(backend, name)
        fetch = None if fetcher is None else fetcher()
        try:
            _write_lane(lane, [(n, jobs[n]) for n in lanes[k]], refs, options, abort, reuse, fetch)
            if lane.writer is not None:
                size = lane.writer.tell()
                lane.writer.close(sync=options.sync)
                files[k] = DataFile(name=name, size=size)
        except BaseException:
            abort.set()
            if lane.writer is not None:
                lane.writer.abort()
            raise
        finally:
            if fetch is not None:
                fetch.close()

    if not jobs:
        return (), ()
    _run_all(run_lane, range(nthreads), nthreads)
    done = tuple(r for r in refs if r is not None)
    own = [f for f in files if f is not None]
    if reuse is not None:
        used = sorted({r.file for r in done if r.file.startswith("../")})
        own += [DataFile(name=f, size=reuse.files[f]) for f in used]
    return tuple(own), done


class _Lane:
    """One writer thread's data file, opened on its first write."""

    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = name
        self.writer: Writer | None = None

    def open(self) -> Writer:
        if self.writer is None:
            self.writer = self.backend.open_writer(self.name)
        return self.writer


def _write_lane(
    lane: _Lane,
    jobs: list[tuple[int, WriteJob]],
    refs: list[ChunkRef | None],
    options: SaveOptions,
    abort: threading.Event,
    reuse: ReuseTable | None,
    fetch: ChunkFetcher | None = None,
) -> None:
    encoder = ChunkEncoder(options.compression)
    for i, (n, job) in enumerate(jobs):
        if abort.is_set():
            raise _Aborted("aborted: another writer thread failed")
        if fetch is None:
            raw = job.source()
        else:
            ahead = jobs[i + 1][1].source if i + 1 < len(jobs) else None
            raw = fetch.fetch(job.source, ahead)
        digest = ""
        if reuse is not None:
            digest = content_digest(np.ascontiguousarray(raw).data)
            hit = reuse.find(digest, job.itemsize, raw.nbytes)
            if hit is not None:
                refs[n] = dataclasses.replace(hit, fqn=job.item.fqn, box=job.item.chunk)
                continue
        compress = job.compress() if callable(job.compress) else job.compress
        enc = encoder.encode(raw, job.itemsize, compress=compress)
        writer = lane.open()
        offset = writer.tell()
        writer.write(enc.payload)
        view = memoryview(enc.payload).cast("B")
        refs[n] = ChunkRef(
            fqn=job.item.fqn,
            box=job.item.chunk,
            file=lane.name,
            offset=offset,
            length=len(enc.payload),
            codec=enc.codec,
            raw_length=raw.nbytes,
            checksum=checksum(enc.payload),
            digest=digest,
            block_bytes=enc.block_bytes,
            blocks=tuple(checksum(view[a:b]) for a, b in pairwise(enc.block_offsets)),
            codec_params=enc.codec_params,
            segments=enc.segments,
            block_offsets=enc.block_offsets,
        )


class _Aborted(RuntimeError):
    """A writer thread stopped because another one failed (never the root cause)."""


def _run_all(fn: Callable[[int], None], args: Sequence[int] | range, nthreads: int) -> None:
    """Run ``fn`` over ``args`` on ``nthreads`` threads; re-raise the root failure.

    After the first failure, work not yet started is cancelled and running work
    is waited for; the error raised is the first one that is not a mere
    :class:`_Aborted` consequence of it.
    """
    if nthreads == 1:
        for a in args:
            fn(a)
        return
    with ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="treeckpt-io") as pool:
        futures = [pool.submit(fn, a) for a in args]
        wait(futures, return_when=FIRST_EXCEPTION)
        for g in futures:
            g.cancel()
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, _Aborted)), errors[0])  # type: ignore[misc]


# ------------------------------------------------------------------ reading


class LazyBytes(Protocol):
    """A destination whose bytes exist only once asked for (a staging buffer)."""

    def array(self) -> npt.NDArray[np.uint8]: ...


@runtime_checkable
class RegionSink(Protocol):
    """A destination that takes each decoded region itself (a destination of another dtype).

    ``write_region(dst, piece)`` receives the stored bytes of region ``dst`` (relative
    to the destination box) as a uint8 array of shape ``(*dst.sizes,
    itemsize)``, valid only during the call; regions never overlap, and
    several threads may call it at once.
    """

    def write_region(self, dst: Box, piece: npt.NDArray[np.uint8]) -> None: ...


@dataclass(frozen=True, slots=True)
class ReadTarget:
    """Copy region ``src`` of the chunk into region ``dst`` of ``dest``.

    ``dest`` is the destination's bytes as a C-contiguous uint8 array of shape
    ``(*dest_box.sizes, itemsize)``, an object giving that array on demand,
    or a :class:`RegionSink` that converts each region as it lands; ``src``
    is relative to the chunk box and ``dst`` relative to the destination box.
    """

    src: Box
    dst: Box
    dest: npt.NDArray[np.uint8] | LazyBytes | RegionSink
    byte_range: tuple[int, int] | None = None

    def array(self) -> npt.NDArray[np.uint8]:
        d = self.dest
        if isinstance(d, np.ndarray):
            return d
        assert not isinstance(d, RegionSink), "a RegionSink takes regions through put()"
        return d.array()

    def put(self, piece: npt.NDArray[np.uint8]) -> None:
        """Land ``piece``, the stored bytes of region ``src``, in region ``dst``."""
        d = self.dest
        if isinstance(d, np.ndarray):
            d[self.dst.slices()] = piece
        elif isinstance(d, RegionSink):
            d.write_region(self.dst, piece)
        else:
            d.array()[self.dst.slices()] = piece


@dataclass(frozen=True, slots=True)
class ReadTask:
    """One stored chunk and every destination region it feeds."""

    chunk: ChunkRef
    itemsize: int
    targets: tuple[ReadTarget, ...]
    read_range: tuple[int, int] | None = None  # raw bytes to decode, whole blocks


def read_chunks(
    backend: Backend,
    tasks: Sequence[ReadTask],
    *,
    io_threads: int,
    on_done: Callable[[ReadTask], None] | None = None,
    in_file_order: bool = True,
) -> None:
    """Read, verify and decode every task's chunk into its targets.

    Tasks are started in file order (sequential reads), or in the given order
    when ``in_file_order`` is false. ``on_done(task)`` is called, on the
    reading thread, after each task's targets are filled.
    """
    ordered = (
        sorted(tasks, key=lambda t: (t.chunk.file, t.chunk.offset))
        if in_file_order
        else list(tasks)
    )
    nthreads = max(1, min(io_threads, len(ordered)))
    local = threading.local()

    def run(n: int) -> None:
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            bufs = local.bufs = ChunkDecoder()
        _read_one(backend, ordered[n], bufs)
        if on_done is not None:
            on_done(ordered[n])

    _run_all(run, range(len(ordered)), nthreads)


def _direct_region(task: ReadTask) -> Bytes1D | None:
    """The destination bytes as one contiguous 1-d view when the chunk lands whole in it."""
    if len(task.targets) != 1:
        return None
    t = task.targets[0]
    if not isinstance(t.dest, np.ndarray) and isinstance(t.dest, RegionSink):
        return None
    if t.src.offsets != (0,) * t.src.ndim or t.src.sizes != task.chunk.box.sizes:
        return None
    region = t.array()[t.dst.slices()]
    if not region.flags.c_contiguous:
        return None
    return region.reshape(-1)


def _read_into(backend: Backend, c: ChunkRef, start: int, buf: memoryview, where: str) -> None:
    """Read ``len(buf)`` stored bytes of chunk ``c`` from ``start`` (relative to the chunk)."""
    try:
        n = backend.readinto(c.file, c.offset + start, buf)
    except FileNotFoundError:
        raise CorruptChunkError(
            f"{where}: the data file is missing ({backend.root}/{layout.MANIFEST} refers to it)"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{where}: read failed ({exc})") from exc
    if n != len(buf):
        raise CorruptChunkError(f"{where}: the data file is truncated ({n} of {len(buf)} bytes)")


def _read_one(backend: Backend, task: ReadTask, dec: ChunkDecoder) -> None:
    c = task.chunk
    where = f"{backend.root}/{c.file} at offset {c.offset} (tensor {c.fqn!r})"
    if task.read_range is not None and task.read_range != (0, c.raw_length):
        _read_part(backend, task, dec, where)
        return
    direct = _direct_region(task)
    if direct is not None and codec_for(c.codec, where).stored_as_raw:
        _read_into(backend, c, 0, direct.data, where)
        dec.check(direct.data, c, where)
        return
    payload = dec.stored(c.length)
    _read_into(backend, c, 0, payload, where)
    dec.check(payload, c, where)
    out = dec.decode(
        payload, c, 0, max(1, len(c.blocks)), itemsize=task.itemsize, where=where, out=direct
    )
    if direct is not None:
        return
    block = out.reshape(*c.box.sizes, task.itemsize)
    for t in task.targets:
        t.put(block[t.src.slices()])


def _read_part(backend: Backend, task: ReadTask, dec: ChunkDecoder, where: str) -> None:
    """Read only the blocks holding raw bytes ``[lo, hi)``, verify and decode each, copy out."""
    c = task.chunk
    lo, hi = task.read_range or (0, c.raw_length)
    bb = c.block_bytes
    if not c.blocks or lo % bb or not (0 <= lo < hi <= c.raw_length):
        raise CorruptChunkError(f"{where}: bad partial read [{lo}, {hi})")
    first, stop = lo // bb, -(-hi // bb)
    s_lo, s_hi = c.stored_range(lo, hi)
    stored = dec.stored(s_hi - s_lo)
    _read_into(backend, c, s_lo, stored, where)
    dec.check_blocks(stored, c, first, stop, where)
    arr = dec.decode(stored, c, first, stop, itemsize=task.itemsize, where=where)
    for t in task.targets:
        a, b = t.byte_range or (0, 0)
        t.put(arr[a - lo : b - lo].reshape(*t.src.sizes, task.itemsize))

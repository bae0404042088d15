"""The files of a memory step on one node: list, verify, read, write, send and receive.

A memory step is an ordinary treeckpt checkpoint directory of which each
node holds a part: the manifest, and the chunk index and data files of its
own ranks and of the ranks it keeps copies for. Every copy is verified
(index checksum from the manifest, every chunk's checksum from the index)
before a restore counts it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from treeckpt.core.manifest import ChunkIndex, Manifest
from treeckpt.errors import CheckpointError, CollectiveError, CorruptChunkError
from treeckpt.manager.root import step_dir
from treeckpt.store import layout
from treeckpt.store.backends import Backend
from treeckpt.store.checksum import checksum
from treeckpt.store.manifest import MAX_MANIFEST_BYTES, decode_manifest
from treeckpt.store.reader import read_index
from treeckpt.tiered.decide import StepCopy

_STEP = re.compile(r"step-([0-9]{10,18})")
#: the largest message sent at once between two ranks
PIECE_BYTES = 4 << 20
#: messages in flight per peer and direction
WINDOW = 8

FileList = list[tuple[str, int]]


def steps_in(backend: Backend) -> list[int]:
    """The memory steps present in a node directory, ascending."""
    out = []
    for name in backend.listdir():
        m = _STEP.fullmatch(name)
        if m is not None:
            out.append(int(m.group(1)))
    return sorted(out)


def read_step_manifest(backend: Backend, step: int) -> tuple[Manifest, bytes]:
    name = f"{step_dir(step)}/{layout.MANIFEST}"
    data = backend.read_file(name, MAX_MANIFEST_BYTES)
    return decode_manifest(data, f"{backend.root}/{name}"), data


def writer_files(sub: Backend, manifest: Manifest, writer: int, *, chunks: bool = True) -> FileList:
    """The chunk index and data files of ``writer`` in ``sub`` (a step directory), checked.

    See :func:`check_writer`.
    """
    return check_writer(sub, manifest, writer, chunks=chunks)[0]


def check_writer(
    sub: Backend, manifest: Manifest, writer: int, *, chunks: bool = True
) -> tuple[FileList, ChunkIndex]:
    """The chunk index and data files of ``writer`` in ``sub`` (a step directory), checked, and the index.

    The index must match its checksum in the manifest and every data file
    its size in the index; with ``chunks``, every chunk its checksum too
    (a load checks the chunks it reads in any case).

    Raises:
        CheckpointError: a file is missing, truncated, or a checksum does not match.
    """
    ref = next(r for r in manifest.indexes if r.rank == writer)
    index = read_index(sub, manifest, ref)  # index checksum, data file sizes
    files: FileList = [(ref.file, ref.size)] + [(f.name, f.size) for f in index.files]
    if chunks:
        by_file: dict[str, list[Any]] = {}
        for c in index.chunks:
            by_file.setdefault(c.file, []).append(c)
        for f in index.files:
            _verify_chunks(os.path.join(sub.root, f.name), by_file.get(f.name, ()))
    return files, index


def stored_bytes(index: ChunkIndex) -> dict[str, int]:
    """The stored bytes of each FQN's chunks in one writer's index."""
    out: dict[str, int] = {}
    for c in index.chunks:
        out[c.fqn] = out.get(c.fqn, 0) + c.length
    return out


def _verify_chunks(path: str, refs: Sequence[Any]) -> None:
    """Every chunk of ``refs`` in the file at ``path`` matches its checksum (read in place)."""
    if not refs:
        return
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CorruptChunkError(f"{path}: empty, the index lists chunks in it")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for c in refs:
                    if (
                        c.offset + c.length > size
                        or checksum(view[c.offset : c.offset + c.length]) != c.checksum
                    ):
                        raise CorruptChunkError(
                            f"{path}: checksum mismatch in the chunk of {c.fqn!r} at offset "
                            f"{c.offset} (the memory copy is damaged)"
                        )
            finally:
                view.release()


def inventory(
    backend: Backend, open_sub: Any, *, chunks: bool = True
) -> tuple[list[StepCopy], dict[int, bytes], dict[int, dict[int, dict[str, int]]]]:
    """Every memory step of a node directory, with the writers whose copies check out.

    Returns the copies, each step's manifest bytes, and each step's valid
    writers' stored bytes by FQN (:func:`stored_bytes`). A step whose manifest
    is missing or damaged is left out; a writer whose files do not check out
    is left out of ``valid`` (``chunks``: every chunk's checksum is checked).
    """
    copies, manifests = [], {}
    summaries: dict[int, dict[int, dict[str, int]]] = {}
    for step in steps_in(backend):
        try:
            manifest, data = read_step_manifest(backend, step)
        except (CheckpointError, OSError, ValueError):
            continue
        sub = open_sub(step)
        try:
            valid, sizes = set(), {}
            summary: dict[int, dict[str, int]] = {}
            for ref in manifest.indexes:
                try:
                    files, index = check_writer(sub, manifest, ref.rank, chunks=chunks)
                except (CheckpointError, OSError, ValueError):
                    continue
                valid.add(ref.rank)
                summary[ref.rank] = stored_bytes(index)
                sizes[ref.rank] = sum(s for _, s in files)
        finally:
            sub.close()
        copies.append(
            StepCopy(
                step=step,
                manifest=checksum(data),
                writers=frozenset(r.rank for r in manifest.indexes),
                valid=frozenset(valid),
                sizes=sizes,
            )
        )
        manifests[step] = data
        summaries[step] = summary
    return copies, manifests, summaries


def check_name(name: str, save_id: str, writer: int) -> None:
    """A file name received from a peer is one ``writer`` may have written in save ``save_id``."""
    if not layout.is_index_file(name, save_id, writer) and not layout.is_data_file(
        name, save_id, writer
    ):
        raise CheckpointError(f"a peer sent the file name {name!r}, not one of writer {writer}")


def own_files(sub: Backend, save_id: str, rank: int) -> FileList:
    """The chunk index and data files rank ``rank`` wrote in save ``save_id``."""
    folder = layout.data_dir(save_id)
    out: FileList = []
    for base in sorted(sub.listdir(folder)):
        name = f"{folder}/{base}"
        if layout.is_index_file(name, save_id, rank) or layout.is_data_file(name, save_id, rank):
            size = sub.size(name)
            if size is not None:
                out.append((name, size))
    return out


def write_file(sub: Backend, name: str, data: Any) -> None:
    with contextlib.suppress(FileNotFoundError):
        sub.remove(name)
    writer = sub.open_writer(name)
    try:
        writer.write(data)
        writer.close(sync=False)
    except BaseException:
        writer.abort()
        raise


def copy_durable(src: Backend, dst: Backend, name: str, size: int) -> None:
    """Copy file ``name`` from the memory tier to a durable step, piece by piece, and fsync it."""
    writer = dst.open_writer(name)
    try:
        for off, n in _pieces(size):
            writer.write(_read_piece(src, name, off, n).numpy().data)
        writer.close(sync=dst.supports_fsync)
    except BaseException:
        writer.abort()
        raise


def manifest_checksum(sub: Backend) -> str | None:
    """The checksum of the manifest in a step directory, ``None`` when it has none."""
    try:
        return checksum(sub.read_file(layout.MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError):
        return None


def _pieces(size: int) -> list[tuple[int, int]]:
    return [(o, min(PIECE_BYTES, size - o)) for o in range(0, size, PIECE_BYTES)]


def exchange(
    group: Any,
    timeout_s: float,
    sends: Sequence[tuple[int, Backend, FileList]],
    recvs: Sequence[tuple[int, Backend, FileList]],
    phase: str,
    window: int = WINDOW,
) -> int:
    """Send files to peers and receive files from peers, point to point, over ``group``.

    ``sends``: (peer group rank, backend to read from, files); ``recvs``:
    (peer group rank, backend to write into, files with sizes agreed
    before). The files travel as messages of at most ``PIECE_BYTES``, the
    k-th message between two ranks tagged k, ``window`` messages per peer
    and direction at a time: the message k of a pair is in round
    ``k // window`` on both sides, so the rounds never wait on each other in
    a circle, and memory holds only one round's messages. Every wait is
    bounded by ``timeout_s``. Returns the bytes received.

    Raises:
        CollectiveError: a peer died, stalled or failed (the peer is named).
    """
    # One ordered list of messages per peer and direction (several transfers
    # between two ranks follow each other, in the order both sides list them).
    out_ops: dict[int, list[tuple[Backend, str, int, int]]] = {}
    in_ops: dict[int, list[tuple[Backend, str, int, int]]] = {}
    for peer, sub, files in sends:
        out_ops.setdefault(peer, []).extend(_ops(sub, files))
    for peer, sub, files in recvs:
        in_ops.setdefault(peer, []).extend(_ops(sub, files))
    writers: dict[tuple[int, str], Any] = {}
    got = 0
    current = -1
    try:
        for _, sub, files in recvs:
            for name, size in files:
                if size == 0:
                    write_file(sub, name, b"")
        lists = list(out_ops.values()) + list(in_ops.values())
        rounds = max((-(-len(ops) // window) for ops in lists), default=0)
        for r in range(rounds):
            lo, hi = r * window, (r + 1) * window
            works: list[tuple[Any, int]] = []
            landing: list[tuple[Backend, str, int, torch.Tensor]] = []
            for peer, ops in in_ops.items():
                current = peer
                for k, (sub, name, off, n) in enumerate(ops[lo:hi], start=lo):
                    buf = torch.empty(n, dtype=torch.uint8)
                    works.append((dist.irecv(buf, group=group, group_src=peer, tag=k), peer))
                    landing.append((sub, name, off, buf))
            for peer, ops in out_ops.items():
                current = peer
                for k, (sub, name, off, n) in enumerate(ops[lo:hi], start=lo):
                    data = _read_piece(sub, name, off, n)
                    works.append((dist.isend(data, group=group, group_dst=peer, tag=k), peer))
            for work, peer in works:
                current = peer
                if not work.wait(timeout=timedelta(seconds=timeout_s)):
                    raise TimeoutError(f"no progress within {timeout_s:g} s")
            for sub, name, off, buf in landing:
                key = (id(sub), name)
                if off == 0:
                    with contextlib.suppress(FileNotFoundError):
                        sub.remove(name)
                    writers[key] = sub.open_writer(name)
                writers[key].write(buf.numpy().data)
                got += buf.numel()
        for w in writers.values():
            w.close(sync=False)
        writers.clear()
    except Exception as exc:
        raise CollectiveError(
            f"phase {phase!r}: exchanging memory copies with rank {current} failed within the "
            f"{timeout_s:g} s timeout ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    finally:
        for w in writers.values():
            w.abort()
    return got


def _ops(sub: Backend, files: FileList) -> list[tuple[Backend, str, int, int]]:
    """The messages carrying ``files``: (backend, name, offset, length), in order."""
    return [(sub, name, off, n) for name, size in files for off, n in _pieces(size)]


def _read_piece(sub: Backend, name: str, off: int, n: int) -> torch.Tensor:
    buf = np.empty(n, dtype=np.uint8)
    if sub.readinto(name, off, memoryview(buf.data)) != n:
        raise CorruptChunkError(f"{sub.root}/{name}: shorter than expected (changed while sent)")
    return torch.from_numpy(buf)

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

from treeckpt.core.manifest import Manifest
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
    return files


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
) -> tuple[list[StepCopy], dict[int, bytes]]:
    """Every memory step of a node directory, with the writers whose copies check out.

    Returns the copies and each step's manifest bytes. A step whose manifest
    is missing or damaged is left out; a writer whose files do not check out
    is left out of ``valid`` (``chunks``: every chunk's checksum is checked).
    """
    copies, manifests = [], {}
    for step in steps_in(backend):
        try:
            manifest, data = read_step_manifest(backend, step)
        except (CheckpointError, OSError, ValueError):
            continue
        sub = open_sub(step)
        try:
            valid, sizes = set(), {}
            for ref in manifest.indexes:
                try:
                    files = writer_files(sub, manifest, ref.rank, chunks=chunks)
                except (CheckpointError, OSError, ValueError):
                    continue
                valid.add(ref.rank)
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
    return copies, manifests


def check_name(name: str, save_id: str, writer: int) -> None:
    """A file name received from a peer is one ``writer`` may have written in save ``save_id``."""
    if name != layout.index_file(save_id, writer) and not layout.is_data_file(
        name, save_id, writer
    ):
        raise CheckpointError(f"a peer sent the file name {name!r}, not one of writer {writer}")


def own_files(sub: Backend, save_id: str, rank: int) -> FileList:
    """The chunk index and data files rank ``rank`` wrote in save ``save_id``."""
    folder = layout.data_dir(save_id)
    out: FileList = []
    for base in sorted(sub.listdir(folder)):
        name = f"{folder}/{base}"
        if name == layout.index_file(save_id, rank) or layout.is_data_file(name, save_id, rank):
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


def read_whole(sub: Backend, name: str, size: int) -> np.ndarray:
    """The ``size`` bytes of file ``name``, read into a fresh writable buffer."""
    buf = np.empty(size, dtype=np.uint8)
    view, done = memoryview(buf.data), 0
    while done < size:
        n = sub.readinto(name, done, view[done:])
        if n <= 0:
            raise CorruptChunkError(f"{sub.root}/{name}: shorter than the {size} bytes expected")
        done += n
    return buf


def write_durable(sub: Backend, name: str, data: Any) -> None:
    """Write a new file of a durable step and fsync it (the manifest is committed after)."""
    writer = sub.open_writer(name)
    try:
        writer.write(data)
        writer.close(sync=sub.supports_fsync)
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
) -> int:
    """Send files to peers and receive files from peers, point to point, over ``group``.

    ``sends``: (peer group rank, backend to read from, files); ``recvs``:
    (peer group rank, backend to write into, files with sizes agreed
    before). Each pair's messages carry increasing tags, so the order of
    posting does not matter; every wait is bounded by ``timeout_s``.
    Returns the bytes received.

    Raises:
        CollectiveError: a peer died, stalled or failed (the peer is named).
    """
    works: list[tuple[Any, int]] = []
    landing: list[tuple[Backend, str, np.ndarray]] = []
    current = -1
    try:
        for peer, sub, files in recvs:
            current, tag = peer, 0
            for name, size in files:
                buf = np.empty(size, dtype=np.uint8)
                for off, n in _pieces(size):
                    view = torch.from_numpy(buf[off : off + n])
                    works.append((dist.irecv(view, group=group, group_src=peer, tag=tag), peer))
                    tag += 1
                landing.append((sub, name, buf))
        for peer, sub, files in sends:
            current, tag = peer, 0
            for name, size in files:
                if not size:
                    continue
                data = read_whole(sub, name, size)
                for off, n in _pieces(size):
                    t = torch.from_numpy(data[off : off + n])
                    works.append((dist.isend(t, group=group, group_dst=peer, tag=tag), peer))
                    tag += 1
        for work, peer in works:
            current = peer
            if not work.wait(timeout=timedelta(seconds=timeout_s)):
                raise TimeoutError(f"no progress within {timeout_s:g} s")
    except Exception as exc:
        raise CollectiveError(
            f"phase {phase!r}: exchanging memory copies with rank {current} failed within the "
            f"{timeout_s:g} s timeout ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    got = 0
    for sub, name, buf in landing:
        write_file(sub, name, buf)
        got += buf.nbytes
    return got

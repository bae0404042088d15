"""Verify a checkpoint: every stored chunk of every writer, read back and checked.

A load checks only the chunks it reads, when it reads them. ``verify`` reads
all of them ahead of time, so damage is found before a training job depends on
the checkpoint, and reports *all* of it (a load stops at the first bad chunk):

- the manifest and every chunk index decode and pass their own checksums;
- every data file exists and has the size its index recorded;
- every tensor is fully covered by its stored chunks;
- every chunk passes the checks a load makes, by the decoder a load uses
  (``treeckpt.store.decode.ChunkDecoder``): its stored bytes match its
  checksum, each of its blocks matches its block checksum (what a partial
  load checks), and it decodes to exactly its declared raw length.

Chunks are checked in parallel threads (file reads, xxh3 and zstandard all
release the GIL). No tensor is materialised; memory stays at about one chunk
per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from treeckpt.core.dtypes import dtype_info
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import ChunkIndex, ChunkRef, IndexRef, Manifest
from treeckpt.core.plan import plan_load
from treeckpt.core.specs import full_spec
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptChunkError
from treeckpt.store import layout
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.decode import ChunkDecoder
from treeckpt.store.manifest import MAX_INDEX_BYTES, decode_index
from treeckpt.store.reader import read_index, read_manifest, stored_tensors

__all__ = ["Problem", "VerifyReport", "verify"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing found damaged: a file, an index, a tensor's coverage, or one chunk.

    ``file`` is relative to the checkpoint root. ``fqn``, ``offset`` and
    ``length`` are set when the problem is one stored chunk (its byte range in
    ``file``) or one tensor.
    """

    file: str
    reason: str
    fqn: str | None = None
    offset: int | None = None
    length: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What ``verify`` checked and every problem it found."""

    path: str
    save_id: str | None
    world_size: int | None
    indexes: int
    files: int
    chunks: int
    chunks_ok: int
    stored_bytes: int
    raw_bytes: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


#: ``on_start(total_stored_bytes)`` once before chunks are read, then
#: ``on_chunk(stored_bytes)`` after each chunk, from the calling thread.
ProgressStart = Callable[[int], None]
ProgressStep = Callable[[int], None]


def verify(
    path: str,
    *,
    threads: int = 4,
    on_start: ProgressStart | None = None,
    on_chunk: ProgressStep | None = None,
) -> VerifyReport:
    """Check every chunk of the checkpoint at ``path``; returns every problem found.

    A damaged manifest or chunk index is a problem in the report, not an
    exception: the report is the verdict.

    Raises:
        CheckpointNotFoundError: nothing was committed at ``path`` (no
            manifest; :class:`IncompleteCheckpointError` when only the data of
            a save that never committed is there).
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    backend = open_backend(path)
    try:
        return _verify(backend, threads, on_start, on_chunk)
    finally:
        backend.close()


def _verify(
    backend: Backend,
    threads: int,
    on_start: ProgressStart | None,
    on_chunk: ProgressStep | None,
) -> VerifyReport:
    root = backend.root
    problems: list[Problem] = []
    try:
        manifest = read_manifest(backend)
    except CheckpointNotFoundError:
        raise
    except CheckpointError as exc:
        problems.append(Problem(file=layout.MANIFEST, reason=_reason(exc, root, layout.MANIFEST)))
        return VerifyReport(
            path=root,
            save_id=None,
            world_size=None,
            indexes=0,
            files=0,
            chunks=0,
            chunks_ok=0,
            stored_bytes=0,
            raw_bytes=0,
            problems=tuple(problems),
        )

    indexes: list[ChunkIndex] = []
    missing_files: set[str] = set()
    for ref in manifest.indexes:
        index = _index(backend, manifest, ref, problems, missing_files)
        if index is not None:
            indexes.append(index)

    if len(indexes) == len(manifest.indexes):
        problems.extend(_coverage(manifest, indexes))

    chunks = sorted((c for ix in indexes for c in ix.chunks), key=lambda c: (c.file, c.offset))
    to_read = [c for c in chunks if c.file not in missing_files]
    for c in chunks:
        if c.file in missing_files:
            problems.append(_chunk_problem(c, "the data file is missing"))
    if on_start is not None:
        on_start(sum(c.length for c in to_read))
    bad = _check_chunks(backend, manifest, to_read, threads, on_chunk)
    problems.extend(bad)
    return VerifyReport(
        path=root,
        save_id=manifest.save_id,
        world_size=manifest.world_size,
        indexes=len(indexes),
        files=sum(len(ix.files) for ix in indexes),
        chunks=len(chunks),
        chunks_ok=len(to_read) - len(bad),
        stored_bytes=sum(c.length for c in chunks),
        raw_bytes=sum(c.raw_length for c in chunks),
        problems=tuple(problems),
    )


def _index(
    backend: Backend,
    manifest: Manifest,
    ref: IndexRef,
    problems: list[Problem],
    missing_files: set[str],
) -> ChunkIndex | None:
    """One writer's chunk index; its problems (and missing data files) are recorded.

    ``read_index`` also checks the data files' sizes and stops at the first
    wrong one; then the index is decoded again here so that every file is
    checked and the chunks in the intact files are still verified.
    """
    try:
        return read_index(backend, manifest, ref)
    except CorruptChunkError:
        pass  # a data file is missing or has the wrong size: find them all below
    except CheckpointError as exc:
        problems.append(Problem(file=ref.file, reason=_reason(exc, backend.root, ref.file)))
        return None
    try:
        index = decode_index(
            backend.read_file(ref.file, min(MAX_INDEX_BYTES, ref.size)), ref, manifest
        )
    except (CheckpointError, OSError, ValueError) as exc:  # changed under us
        problems.append(Problem(file=ref.file, reason=_reason(exc, backend.root, ref.file)))
        return None
    for f in index.files:
        try:
            actual = backend.size(f.name)
        except OSError as exc:
            problems.append(Problem(file=f.name, reason=f"cannot be read ({exc})"))
            missing_files.add(f.name)
            continue
        if actual is None:
            problems.append(Problem(file=f.name, reason="data file is missing"))
            missing_files.add(f.name)
        elif actual != f.size:
            problems.append(
                Problem(
                    file=f.name,
                    reason=f"data file has {actual} bytes, the index recorded {f.size} "
                    "(truncated or replaced)",
                )
            )
    return index


def _coverage(manifest: Manifest, indexes: list[ChunkIndex]) -> list[Problem]:
    """Tensors whose stored chunks do not tile them exactly (a load of them would fail)."""
    stored = stored_tensors(manifest, indexes)
    out = []
    for fqn, rec in manifest.records.items():
        if not isinstance(rec, TensorLeaf):
            continue
        try:
            plan_load(stored, [full_spec(fqn, rec.dtype, rec.shape)])
        except CheckpointError as exc:
            out.append(
                Problem(
                    file=layout.MANIFEST,
                    fqn=fqn,
                    reason=f"stored chunks do not cover the tensor ({_reason(exc, '', fqn)})",
                )
            )
    return out


def _check_chunks(
    backend: Backend,
    manifest: Manifest,
    chunks: list[ChunkRef],
    threads: int,
    on_chunk: ProgressStep | None,
) -> list[Problem]:
    local = threading.local()

    def check(c: ChunkRef) -> str | None:
        dec = getattr(local, "decoder", None)
        if dec is None:
            dec = local.decoder = ChunkDecoder()
        rec = manifest.records[c.fqn]
        assert isinstance(rec, TensorLeaf)
        return check_chunk(backend, c, itemsize=dtype_info(rec.dtype).itemsize, decoder=dec)

    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="treeckpt-verify") as pool:
        futures = {pool.submit(check, c): c for c in chunks}
        for fut in as_completed(futures):
            c = futures[fut]
            try:
                reason = fut.result()
            except Exception as exc:  # anything unforeseen is a finding, not a crash
                reason = f"cannot be checked ({type(exc).__name__}: {exc})"
            if reason is not None:
                problems.append(_chunk_problem(c, reason))
            if on_chunk is not None:
                on_chunk(c.length)
    problems.sort(key=lambda p: (p.file, p.offset or 0))
    return problems


def check_chunk(
    backend: Backend, c: ChunkRef, *, itemsize: int, decoder: ChunkDecoder
) -> str | None:
    """Why the stored chunk ``c`` is damaged, or ``None`` when it is intact.

    The full stored length is there, then ``decoder`` makes every check a
    load makes: of the whole chunk, and of each block as a partial load reads
    it. Decoded bytes go to the decoder's scratch buffer (raw chunks are not
    copied at all).
    """
    payload = decoder.stored(c.length)
    try:
        n = backend.readinto(c.file, c.offset, payload)
    except FileNotFoundError:
        return "the data file is missing"
    except OSError as exc:
        return f"read failed ({exc})"
    if n != c.length:
        return f"the data file is truncated ({n} of {c.length} bytes)"
    try:
        decoder.check(payload, c, "chunk")
        if c.blocks:
            decoder.check_blocks(payload, c, 0, len(c.blocks), "chunk")
        decoder.decode(payload, c, 0, max(1, len(c.blocks)), itemsize=itemsize, where="chunk")
    except CorruptChunkError as exc:
        return _reason(exc, "", "chunk")
    return None


def _chunk_problem(c: ChunkRef, reason: str) -> Problem:
    return Problem(file=c.file, fqn=c.fqn, offset=c.offset, length=c.length, reason=reason)


def _reason(exc: BaseException, root: str, name: str) -> str:
    """The error's message without the ``root/name: `` prefix the report shows anyway."""
    msg = str(exc)
    for prefix in (f"{root}/{name}: ", f"{name}: ", f"{root}: "):
        if prefix != ": " and msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg

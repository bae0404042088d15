"""Reading a committed checkpoint's records: the manifest and the chunk indexes.

A new save to the same path commits its manifest and then removes the files
of the checkpoint it replaces, so a reader that read the old manifest can
find the files it names gone. That is not damage: :func:`replacement` tells
the two apart by reading the manifest again (a new save id: the checkpoint
was replaced), and :func:`read_committed` reads the new one instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from treeckpt.core.extents import select_writers
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import ChunkIndex, ChunkRef, IndexRef, Manifest
from treeckpt.core.plan import StoredTensor
from treeckpt.core.specs import ShardSpec
from treeckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptChunkError,
    IncompleteCheckpointError,
    ManifestError,
)
from treeckpt.store import layout
from treeckpt.store.backends import Backend
from treeckpt.store.manifest import (
    MAX_INDEX_BYTES,
    MAX_MANIFEST_BYTES,
    decode_index,
    decode_manifest,
)

__all__ = [
    "StoredChunks",
    "has_dcp_metadata",
    "read_committed",
    "read_index",
    "read_indexes",
    "read_manifest",
    "replaced_error",
    "replacement",
    "stored_tensors",
]

T = TypeVar("T")


def has_dcp_metadata(backend: Backend) -> bool:
    """True when ``.metadata`` is there and is not treeckpt's marker: torch's DCP wrote it."""
    if backend.size(layout.DCP_MARKER) is None:
        return False
    head = backend.read_range(layout.DCP_MARKER, 0, layout.DCP_MARKER_HEAD_BYTES)
    return not layout.is_dcp_marker(head)


def read_manifest(backend: Backend) -> Manifest:
    """Read and validate the committed manifest.

    Raises:
        IncompleteCheckpointError: data files exist but no manifest was committed.
        CheckpointNotFoundError: nothing is there.
        ManifestError: the manifest is damaged or malformed.
    """
    try:
        data = backend.read_file(layout.MANIFEST, MAX_MANIFEST_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        leftovers = [n for n in backend.listdir() if n.startswith("data-")]
        if leftovers:
            raise IncompleteCheckpointError(
                f"{backend.root}: incomplete checkpoint: data from a save that never committed "
                f"({', '.join(leftovers[:3])}) but no {layout.MANIFEST}"
            ) from None
        raise CheckpointNotFoundError(
            f"{backend.root}: no checkpoint here (no {layout.MANIFEST})"
        ) from None
    except ValueError:
        raise ManifestError(
            f"{backend.root}/{layout.MANIFEST}: larger than the {MAX_MANIFEST_BYTES} byte cap"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{backend.root}/{layout.MANIFEST}: cannot be read ({exc})") from exc
    return decode_manifest(data, f"{backend.root}/{layout.MANIFEST}")


def read_index(backend: Backend, manifest: Manifest, ref: IndexRef) -> ChunkIndex:
    """Read and validate one writer's chunk index, and check its data files exist whole."""
    try:
        data = backend.read_file(ref.file, min(MAX_INDEX_BYTES, ref.size))
    except FileNotFoundError:
        raise ManifestError(
            f"{backend.root}/{ref.file}: chunk index is missing "
            f"({backend.root}/{layout.MANIFEST} refers to it)"
        ) from None
    except ValueError:
        raise ManifestError(
            f"{backend.root}/{ref.file}: larger than the {ref.size} bytes the manifest recorded"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{backend.root}/{ref.file}: cannot be read ({exc})") from exc
    index = decode_index(data, ref, manifest)
    for f in index.files:
        try:
            actual = backend.size(f.name)
        except OSError as exc:
            raise CheckpointError(f"{backend.root}/{f.name}: cannot be read ({exc})") from exc
        if actual is None:
            raise CorruptChunkError(
                f"{backend.root}/{f.name}: data file is missing "
                f"({backend.root}/{layout.MANIFEST} refers to it through {ref.file})"
            )
        if actual != f.size:
            raise CorruptChunkError(
                f"{backend.root}/{f.name}: data file has {actual} bytes, the index recorded {f.size} "
                "(truncated or replaced)"
            )
    return index


def read_indexes(
    backend: Backend, manifest: Manifest, ranks: Sequence[int] | None = None
) -> list[ChunkIndex]:
    """The chunk indexes of ``ranks`` (all writers by default)."""
    refs = [r for r in manifest.indexes if ranks is None or r.rank in ranks]
    return [read_index(backend, manifest, r) for r in refs]


def stored_tensors(manifest: Manifest, indexes: Sequence[ChunkIndex]) -> dict[str, StoredTensor]:
    """Every tensor of the manifest with its chunks gathered from ``indexes``."""
    chunks: dict[str, list[ChunkRef]] = {}
    for ix in indexes:
        for c in ix.chunks:
            chunks.setdefault(c.fqn, []).append(c)
    return {
        fqn: StoredTensor(
            fqn=fqn, dtype=rec.dtype, shape=rec.shape, chunks=tuple(chunks.get(fqn, ()))
        )
        for fqn, rec in manifest.records.items()
        if isinstance(rec, TensorLeaf)
    }


class StoredChunks(Mapping[str, StoredTensor]):
    """Every tensor of a checkpoint with its chunks, reading chunk indexes only when needed.

    ``stored[fqn]`` holds every chunk of ``fqn``: it reads the indexes of
    every writer of ``fqn`` (by the manifest's ``extents``; every index when
    the manifest has none). :meth:`for_requests` reads only the indexes the
    requested boxes intersect and returns those tensors with the chunks read
    so far, which cover the requests when the checkpoint is sound
    (``plan_load`` checks that they do). Indexes given at construction (read
    by another rank) are never read again; ``opened`` lists the files this
    object read, in order.
    """

    def __init__(
        self, backend: Backend, manifest: Manifest, indexes: Sequence[ChunkIndex] = ()
    ) -> None:
        self._backend = backend
        self.manifest = manifest
        self._tensors = {f: r for f, r in manifest.records.items() if isinstance(r, TensorLeaf)}
        self._refs = {r.rank: r for r in manifest.indexes}
        self._chunks: dict[int, dict[str, list[ChunkRef]]] = {}
        self.opened: list[str] = []
        for ix in indexes:
            self._add(ix)

    def _add(self, ix: ChunkIndex) -> None:
        by_fqn: dict[str, list[ChunkRef]] = {}
        for c in ix.chunks:
            by_fqn.setdefault(c.fqn, []).append(c)
        self._chunks[ix.rank] = by_fqn

    def _ensure(self, ranks: Sequence[int] | frozenset[int]) -> None:
        for rank in sorted(ranks):
            if rank not in self._chunks and rank in self._refs:
                ref = self._refs[rank]
                self.opened.append(ref.file)
                self._add(read_index(self._backend, self.manifest, ref))

    def _writers(self, fqn: str) -> Sequence[int] | frozenset[int]:
        ext = self.manifest.extents
        if ext is None:
            return tuple(self._refs)
        n = ext.tensors.get(fqn)
        return () if n is None else frozenset(ext.layouts[n].ranks.tolist())

    def _tensor(
        self, fqn: str, rec: TensorLeaf, ranks: Sequence[int] | frozenset[int]
    ) -> StoredTensor:
        chunks: list[ChunkRef] = []
        for rank in sorted(ranks):
            chunks += self._chunks.get(rank, {}).get(fqn, ())
        return StoredTensor(fqn=fqn, dtype=rec.dtype, shape=rec.shape, chunks=tuple(chunks))

    def __getitem__(self, fqn: str) -> StoredTensor:
        rec = self._tensors[fqn]
        ranks = self._writers(fqn)
        self._ensure(ranks)
        return self._tensor(fqn, rec, ranks)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def for_requests(self, requests: Sequence[ShardSpec]) -> dict[str, StoredTensor]:
        """The requested tensors, with the chunks of the indexes their boxes intersect."""
        ext = self.manifest.extents
        ranks: Sequence[int] | frozenset[int] = (
            tuple(self._refs) if ext is None else select_writers(ext, requests)
        )
        self._ensure(ranks)
        out = {}
        for spec in requests:
            rec = self._tensors.get(spec.fqn)
            if rec is not None and spec.fqn not in out:
                out[spec.fqn] = self._tensor(spec.fqn, rec, self._writers(spec.fqn))
        return out


def replacement(backend: Backend, manifest: Manifest) -> Manifest | None:
    """The manifest committed at ``backend`` now, if a save other than ``manifest``'s committed it.

    ``None``: ``manifest`` is still the committed one, so a file it names that
    is missing or damaged is missing or damaged, not replaced.

    Raises:
        CheckpointError: the manifest cannot be read now (the checkpoint was
            removed, or is damaged).
    """
    now = read_manifest(backend)
    return None if now.save_id == manifest.save_id else now


def replaced_error(
    backend: Backend, old: Manifest, new: Manifest, detail: str
) -> CheckpointReplacedError:
    """The error of a read whose checkpoint a new save replaced, and whose retry failed."""
    return CheckpointReplacedError(
        f"{backend.root}: the checkpoint was replaced while it was being read (save "
        f"{old.save_id}, then save {new.save_id}), and {detail}; read it again"
    )


def read_committed(backend: Backend, read: Callable[[Manifest], T]) -> tuple[Manifest, T]:
    """The committed manifest and ``read(manifest)`` (its chunk indexes), of one save.

    When ``read`` fails because a new save replaced the checkpoint meanwhile
    (its manifest has another save id now), the new checkpoint is read once.

    Raises:
        CheckpointReplacedError: it was replaced again while the new one was read.
        CheckpointError: what ``read`` raised, when the checkpoint was not replaced.
    """
    manifest = read_manifest(backend)
    try:
        return manifest, read(manifest)
    except CheckpointError:
        newer = replacement(backend, manifest)
        if newer is None:
            raise
    try:
        return newer, read(newer)
    except CheckpointError as exc:
        raise replaced_error(
            backend, manifest, newer, f"reading the new one failed too ({exc})"
        ) from exc

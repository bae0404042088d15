"""Reading a committed checkpoint's records: the manifest and the chunk indexes."""

from __future__ import annotations

from collections.abc import Sequence

from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import ChunkIndex, ChunkRef, IndexRef, Manifest
from treeckpt.core.plan import StoredTensor
from treeckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
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

__all__ = ["read_index", "read_indexes", "read_manifest", "stored_tensors"]


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
        raise ManifestError(f"{backend.root}/{ref.file}: chunk index is missing") from None
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
            raise CorruptChunkError(f"{backend.root}/{f.name}: data file is missing")
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

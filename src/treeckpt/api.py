"""The public API: save, load, restore, metadata.

Each function is a thin composition of the pure core, the store and the
shell. Without an initialised ``torch.distributed`` process group everything
runs in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from treeckpt.core.box import Box, full_box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf, TensorLib, ValueLeaf
from treeckpt.core.manifest import Manifest
from treeckpt.core.options import LoadOptions, SaveOptions
from treeckpt.core.plan import LoadPlan, StoredTensor, plan_load
from treeckpt.core.specs import ShardSpec
from treeckpt.errors import LeafNotFoundError, PlanError
from treeckpt.shell.committed import load_committed
from treeckpt.shell.coord import Coordinator, LocalCoordinator
from treeckpt.shell.load import load_tree, read_regions, read_stored, restore_tree
from treeckpt.shell.ranks import check_user_metadata, coordinator, open_save_dir
from treeckpt.shell.save import SaveResult, save_tree
from treeckpt.shell.tensors import allocate
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.reader import read_committed, read_indexes

__all__ = [
    "CheckpointInfo",
    "TensorInfo",
    "load",
    "metadata",
    "plan_reshard",
    "read_tensor",
    "restore",
    "save",
]


def _backend(path: Any) -> Backend:
    if isinstance(path, Backend):  # a backend of the caller's (a wrapper, a throttled one)
        return path
    return open_backend(str(path))


def _opened(path: Any) -> closing[Backend]:
    """The backend of ``path``, closed when the ``with`` block is left (also on failure)."""
    return closing(_backend(path))


def _read_on_ranks(
    path: Any,
    phase: str,
    options: LoadOptions,
    process_group: Any,
    read: Callable[[Backend, Coordinator, Manifest, Mapping[str, StoredTensor]], Any],
    *,
    fills_in_place: bool = False,
) -> Any:
    """``read(backend, coord, manifest, stored)`` on every rank of ``process_group``
    over the checkpoint committed at ``path``, read again (once) from the new
    manifest when a save replaces it meanwhile (see ``load_committed``)."""
    coord = coordinator(process_group, options.timeout_s)
    with _opened(path) as backend:
        return load_committed(
            backend,
            coord,
            phase,
            lambda manifest, stored: read(backend, coord, manifest, stored),
            fills_in_place=fills_in_place,
        )


def save(
    tree: Any,
    path: Any,
    *,
    options: SaveOptions | None = None,
    allow_pickle: bool = False,
    user_metadata: dict[str, Any] | None = None,
    process_group: Any = None,
) -> SaveResult:
    """Save a training-state tree to ``path`` (a directory path or fsspec URL).

    ``tree`` is any nesting of dicts, lists, tuples, namedtuples, dataclasses,
    tensors, numpy arrays, plain values and ``Stateful`` objects (modules,
    optimizers, schedulers, anything with ``state_dict``/``load_state_dict``).
    The save is durable when it returns and atomic: readers of ``path`` see
    the previous checkpoint or this one, never a mix.

    Args:
        tree: the state to save.
        path: checkpoint directory (created if needed) or fsspec URL, or a
            ``Backend`` (e.g. a ``ThrottledBackend`` modelling slow storage).
        options: chunking, compression and I/O threads; defaults suit most uses.
        allow_pickle: store leaves of other types with pickle (a loader must
            opt in too). Off by default: a checkpoint should not run code.
        user_metadata: a small JSON-able dict stored in the manifest.

    Raises:
        UnsupportedLeafError: a leaf cannot be stored (its FQN and type are named).
        FQNCollisionError: two paths render to the same FQN.
        RankConflictError: with several ranks, a value or a replicated plain
            tensor differs between ranks under one FQN, or the ranks' trees
            disagree on a container (the FQN and the ranks are named). Keys
            only some ranks hold are saved (the union of the ranks' trees).
        CheckpointError: any other failure; the previous checkpoint is intact.
    """
    options = options or SaveOptions()
    check_user_metadata(user_metadata)
    with _opened(path) as backend:
        open_save_dir(backend, options)
        return save_tree(
            tree,
            backend,
            options=options,
            coord=coordinator(process_group, options.timeout_s),
            allow_pickle=allow_pickle,
            user_metadata=user_metadata,
        )


def load(
    tree: Any,
    path: Any,
    *,
    strict: bool = True,
    allow_pickle: bool = False,
    options: LoadOptions | None = None,
    process_group: Any = None,
) -> Any:
    """Load the checkpoint at ``path`` into ``tree`` in place and return ``tree``.

    Tensors and arrays of the template are filled in place (a module's
    parameters, an optimizer's state); every mutable container (dict, list,
    OrderedDict, defaultdict, deque, dataclass instance) gets the loaded
    values (ints, floats, strings...) assigned, so ``tree["step"]`` is the
    checkpoint's afterwards; a tuple, namedtuple or frozen dataclass is
    rebuilt inside its parent (the return value differs from ``tree`` only
    when the root itself is immutable); ``Stateful`` objects get
    ``load_state_dict`` called. A fresh optimizer's state is created without
    a step: no parameter or gradient changes. Nothing changes when the
    template does not match.

    Args:
        strict: report keys missing from the checkpoint and keys the template
            lacks (all together, before anything changes). ``strict=False``
            loads what both sides have; shape mismatches are errors either
            way, and so are dtype differences other than exact conversions
            (bfloat16 into float32, int32 into int64: made and logged) unless
            ``options.allow_lossy_cast`` names the tensor.

    Raises:
        CheckpointNotFoundError / IncompleteCheckpointError: nothing committed at ``path``.
        LoadMismatchError: the template does not match (every problem listed).
        CorruptChunkError / ManifestError: damaged data (file and FQN named).
        CheckpointReplacedError: a new save replaced the checkpoint while it was
            being read, and reading the new one (once, refilling every tensor
            and value) failed too; the template may be partly filled.
    """
    options = options or LoadOptions()

    def read(
        backend: Backend, coord: Coordinator, manifest: Manifest, stored: Mapping[str, StoredTensor]
    ) -> Any:
        return load_tree(
            tree,
            backend,
            manifest,
            stored,
            strict=strict,
            allow_pickle=allow_pickle,
            options=options,
            rank=coord.rank,
            world_size=coord.world_size,
        )

    return _read_on_ranks(path, "load", options, process_group, read, fills_in_place=True)


def restore(
    path: Any,
    *,
    allow_pickle: bool = False,
    options: LoadOptions | None = None,
    process_group: Any = None,
) -> Any:
    """The saved tree with no template: same containers, keys and order, tensors on CPU.

    Modules and other ``Stateful`` objects come back as their state dicts;
    namedtuples and dataclasses as types of the same name and fields made on
    the fly (no code is imported from a checkpoint). A checkpoint replaced by
    a new save while it is read is read again, once, from the new manifest
    (``CheckpointReplacedError`` if that fails too).
    """
    options = options or LoadOptions()
    return _read_on_ranks(
        path,
        "restore",
        options,
        process_group,
        lambda backend, _, manifest, stored: restore_tree(
            backend, manifest, stored, allow_pickle=allow_pickle, options=options
        ),
    )


def read_tensor(path: Any, fqn: str, region: Box | tuple[slice, ...] | None = None) -> Any:
    """Read one tensor, or one region of it, reading only the chunks that cover it.

    ``region`` is a :class:`Box` in global coordinates or a tuple of
    unit-step slices (``(slice(0, 10), slice(None))``); ``None`` reads the
    whole tensor. Returns a CPU torch tensor (or numpy array, as saved).

    Raises:
        LeafNotFoundError: ``fqn`` is not a tensor of the checkpoint (also a ``KeyError``).
        CheckpointReplacedError: the checkpoint was replaced while being read,
            and reading the new one failed too.
    """
    with _opened(path) as backend:

        def read(manifest: Manifest, stored: Mapping[str, StoredTensor]) -> Any:
            rec = manifest.records.get(fqn)
            if not isinstance(rec, TensorLeaf):
                raise LeafNotFoundError(
                    f"{fqn!r} is not a tensor of the checkpoint at {backend.root}"
                )
            box = _region_box(rec.shape, region)
            spec = ShardSpec(fqn=fqn, dtype=rec.dtype, shape=rec.shape, boxes=(box,))
            plan_load(stored, [spec])  # coverage before allocation: shapes are untrusted
            lib: TensorLib = "numpy" if rec.lib != "torch" else "torch"
            out = allocate(TensorLeaf(lib=lib, dtype=rec.dtype, shape=box.sizes), fqn)
            read_regions(backend, manifest, stored, {fqn: [(box, out)]}, LoadOptions())
            return out

        return load_committed(backend, LocalCoordinator(), "read_tensor", read)


def _region_box(shape: tuple[int, ...], region: Box | tuple[slice, ...] | None) -> Box:
    if region is None:
        return full_box(shape)
    if isinstance(region, Box):
        if not full_box(shape).contains(region) or region.ndim != len(shape):
            raise PlanError(f"region {region} lies outside the tensor shape {list(shape)}")
        return region
    slices = tuple(region) + (slice(None),) * (len(shape) - len(region))
    if len(slices) != len(shape):
        raise PlanError(f"{len(region)} slices for a {len(shape)}-d tensor")
    offs, sizes = [], []
    for sl, dim in zip(slices, shape, strict=True):
        start, stop, step = sl.indices(dim)
        if step != 1:
            raise PlanError("only unit-step slices can be read")
        offs.append(start)
        sizes.append(max(0, stop - start))
    return Box(offsets=tuple(offs), sizes=tuple(sizes))


def plan_reshard(
    path: Any, specs_by_rank: Sequence[Sequence[ShardSpec]], *, options: LoadOptions | None = None
) -> list[LoadPlan]:
    """Dry run: the load plan of each target rank, before any tensor byte is read.

    ``specs_by_rank[r]`` lists what rank r would hold (a target layout on any
    world size; a spec's dtype is the destination's). Each returned plan
    reports bytes needed, bytes read, files, read amplification and the dtype
    conversions (``LoadPlan.report()``); a conversion that can lose bits is
    planned only when ``options.allow_lossy_cast`` names the FQN.
    """
    allow = (options or LoadOptions()).allows_lossy_cast
    with _opened(path) as backend:
        _, stored = read_committed(backend, lambda m: read_stored(backend, m))
    return [plan_load(stored, specs, allow_lossy_cast=allow) for specs in specs_by_rank]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One stored tensor, as described by the manifest and chunk indexes."""

    fqn: str
    lib: str
    dtype: str
    shape: tuple[int, ...]
    raw_bytes: int
    stored_bytes: int
    chunks: int
    codecs: dict[str, int]

    @property
    def ratio(self) -> float:
        """Compression ratio (raw / stored); 1.0 for raw chunks."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """What a checkpoint holds, read without touching tensor data."""

    path: str
    save_id: str
    world_size: int
    tensors: dict[str, TensorInfo]
    values: dict[str, Any]
    files: dict[str, int]
    user_metadata: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, Any] = field(default_factory=dict)

    @property
    def raw_bytes(self) -> int:
        return sum(t.raw_bytes for t in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        return sum(self.files.values())

    def __str__(self) -> str:
        lines = [
            f"checkpoint {self.path} (save {self.save_id}, {self.world_size} writer rank(s))",
            f"{len(self.tensors)} tensors, {self.raw_bytes:,} bytes raw, {self.stored_bytes:,} bytes "
            f"stored in {len(self.files)} files; {len(self.values)} values",
        ]
        for t in self.tensors.values():
            lines.append(
                f"  {t.fqn}: {t.dtype}{list(t.shape)} {t.raw_bytes:,} B -> {t.stored_bytes:,} B "
                f"({t.ratio:.2f}x, {t.chunks} chunks)"
            )
        for fqn, v in self.values.items():
            lines.append(f"  {fqn} = {v!r}")
        return "\n".join(lines)


def _value_preview(rec: LeafRecord) -> Any:
    if isinstance(rec, ValueLeaf):
        return rec.value
    if isinstance(rec, PickleLeaf):
        return f"<pickled object, {len(rec.data)} bytes>"
    return None


def metadata(path: Any) -> CheckpointInfo:
    """Structure, shapes, dtypes, sizes and codecs of a checkpoint, without reading tensor data."""
    with _opened(path) as backend:
        manifest, indexes = read_committed(backend, lambda m: read_indexes(backend, m))
    stats: dict[str, tuple[int, int, dict[str, int]]] = {}
    files: dict[str, int] = {}
    for ix in indexes:
        for f in ix.files:
            files[f.name] = f.size
        for c in ix.chunks:
            raw, stored, codecs = stats.setdefault(c.fqn, (0, 0, {}))
            codecs[c.codec] = codecs.get(c.codec, 0) + 1
            stats[c.fqn] = (raw + c.raw_length, stored + c.length, codecs)
    tensors = {}
    values = {}
    for fqn, rec in manifest.records.items():
        if isinstance(rec, TensorLeaf):
            raw, stored, codecs = stats.get(fqn, (0, 0, {}))
            tensors[fqn] = TensorInfo(
                fqn=fqn,
                lib=rec.lib,
                dtype=rec.dtype,
                shape=rec.shape,
                raw_bytes=_nbytes(rec),
                stored_bytes=stored,
                chunks=sum(codecs.values()),
                codecs=codecs,
            )
        else:
            values[fqn] = _value_preview(rec)
    return CheckpointInfo(
        path=backend.root,
        save_id=manifest.save_id,
        world_size=manifest.world_size,
        tensors=tensors,
        values=values,
        files=files,
        user_metadata=manifest.user_metadata,
        structure=manifest.structure,
    )


def _nbytes(rec: TensorLeaf) -> int:
    n = dtype_info(rec.dtype).itemsize
    for d in rec.shape:
        n *= d
    return n

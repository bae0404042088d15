"""The lazy checkpoint, its groups (subtrees) and its tensor handles."""

from __future__ import annotations

import difflib
import operator
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from treeckpt.core.box import Box, full_box
from treeckpt.core.dtypes import dtype_info, torch_dtype
from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf, TensorLib, ValueLeaf
from treeckpt.core.manifest import ChunkIndex, Manifest
from treeckpt.core.options import LoadOptions
from treeckpt.core.plan import LoadPlan, StoredTensor, plan_load
from treeckpt.core.specs import ShardSpec
from treeckpt.core.tree import build_tree
from treeckpt.errors import CheckpointError, LeafNotFoundError, ManifestError
from treeckpt.explore import _display
from treeckpt.explore._stats import StatsAccumulator, TensorStats
from treeckpt.shell.load import read_regions, value_of
from treeckpt.shell.tensors import allocate, finish_leaf
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.reader import read_indexes, read_manifest

__all__ = ["Checkpoint", "ChunkInfo", "Group", "TensorHandle", "open"]

#: Raw bytes read at a time by :meth:`TensorHandle.stats`.
STATS_BATCH_BYTES = 32 << 20


def open(
    path: str | os.PathLike[str] | Backend,
    *,
    allow_pickle: bool = False,
    options: LoadOptions | None = None,
) -> Checkpoint:
    """Open the checkpoint at ``path`` for browsing, reading only its manifest.

    Nothing else is read until it is needed: the chunk indexes the first time
    stored sizes, codecs, layout or data are asked for, and tensor bytes only
    by ``read()``, slicing and ``stats()``, which fetch just the chunks (and,
    for raw chunks, the checksummed blocks) covering the request. Every byte
    read is verified as a load verifies it.

    Args:
        path: checkpoint directory, fsspec URL (``memory://``, ``s3://``...),
            or an already opened store ``Backend``.
        allow_pickle: let ``ckpt[fqn]`` unpickle leaves saved with pickle
            (runs code from the checkpoint; off by default).
        options: I/O threads for reads.

    Raises:
        CheckpointNotFoundError / IncompleteCheckpointError: nothing committed at ``path``.
        ManifestError: the manifest is damaged.
    """
    backend = path if isinstance(path, Backend) else open_backend(os.fspath(path))
    try:
        manifest = read_manifest(backend)
    except BaseException:
        backend.close()
        raise
    return Checkpoint(
        _Source(backend, manifest, options or LoadOptions(), allow_pickle=allow_pickle)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkInfo:
    """One stored chunk of a tensor: which writer rank stored it, its region and its bytes."""

    rank: int
    box: Box
    file: str
    offset: int
    stored_bytes: int
    raw_bytes: int
    codec: str


class _Node:
    """A container of the saved tree: its FQN and its children, in saved order."""

    __slots__ = ("children", "fqn")

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn
        self.children: dict[str, _Node | str] = {}  # name -> group, or leaf FQN


class _LeafMark:
    __slots__ = ("fqn",)

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn


class _Source:
    """The shared state of one open checkpoint: backend, manifest, indexes read on demand."""

    def __init__(
        self, backend: Backend, manifest: Manifest, options: LoadOptions, *, allow_pickle: bool
    ) -> None:
        self.backend = backend
        self.manifest = manifest
        self.options = options
        self.allow_pickle = allow_pickle
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._indexes: list[ChunkIndex] | None = None
        self._chunks: dict[str, tuple[ChunkInfo, ...]] = {}
        self._stored: dict[str, StoredTensor] = {}
        self.root, self.groups = _build_nodes(manifest)
        self.handles: dict[str, TensorHandle] = {}

    @property
    def indexes(self) -> list[ChunkIndex]:
        with self._lock:
            if self._indexes is None:
                indexes = read_indexes(self.backend, self.manifest)
                chunks: dict[str, list[ChunkInfo]] = {}
                refs: dict[str, list[Any]] = {}
                for ix in indexes:
                    for c in ix.chunks:
                        refs.setdefault(c.fqn, []).append(c)
                        chunks.setdefault(c.fqn, []).append(
                            ChunkInfo(
                                rank=ix.rank,
                                box=c.box,
                                file=c.file,
                                offset=c.offset,
                                stored_bytes=c.length,
                                raw_bytes=c.raw_length,
                                codec=c.codec,
                            )
                        )
                self._chunks = {f: tuple(v) for f, v in chunks.items()}
                for fqn, rec in self.manifest.records.items():
                    if isinstance(rec, TensorLeaf):
                        self._stored[fqn] = StoredTensor(
                            fqn=fqn,
                            dtype=rec.dtype,
                            shape=rec.shape,
                            chunks=tuple(refs.get(fqn, ())),
                        )
                self._indexes = indexes
            return self._indexes

    def chunks(self, fqn: str) -> tuple[ChunkInfo, ...]:
        _ = self.indexes
        return self._chunks.get(fqn, ())

    def stored(self, fqn: str) -> StoredTensor:
        _ = self.indexes
        return self._stored[fqn]

    def plan(self, fqn: str, boxes: tuple[Box, ...]) -> LoadPlan:
        rec = self.manifest.records[fqn]
        assert isinstance(rec, TensorLeaf)
        spec = ShardSpec(fqn=fqn, dtype=rec.dtype, shape=rec.shape, boxes=boxes)
        return plan_load({fqn: self.stored(fqn)}, [spec])

    def read(self, fqn: str, boxes: tuple[Box, ...]) -> list[Any]:
        """Read each box of tensor ``fqn`` (global coordinates) into a fresh tensor or array."""
        rec = self.manifest.records[fqn]
        assert isinstance(rec, TensorLeaf)
        self.plan(fqn, boxes)  # coverage before allocation: shapes are untrusted
        lib: TensorLib = "torch" if rec.lib == "torch" else "numpy"
        outs = [allocate(TensorLeaf(lib=lib, dtype=rec.dtype, shape=b.sizes), fqn) for b in boxes]
        plan = read_regions(
            self.backend,
            self.manifest,
            {fqn: self.stored(fqn)},
            {fqn: list(zip(boxes, outs, strict=True))},
            self.options,
        )
        with self._lock:
            self.bytes_read += plan.read_stored_bytes
        return outs

    def entry(self, fqn: str) -> Any:
        rec = self.manifest.records[fqn]
        if isinstance(rec, TensorLeaf):
            handle = self.handles.get(fqn)
            if handle is None:
                handle = self.handles[fqn] = TensorHandle(self, fqn, rec)
            return handle
        return value_of(fqn, rec, allow_pickle=self.allow_pickle)


def _build_nodes(manifest: Manifest) -> tuple[_Node, dict[str, _Node]]:
    """The saved tree's containers from the structure record (validated by ``build_tree``)."""
    root = _Node("")
    groups: dict[str, _Node] = {"": root}
    placed: set[str] = set()
    try:
        tree = build_tree(manifest.structure, _LeafMark)
    except (ManifestError, RecursionError):
        tree = None

    def child_items(obj: Any) -> list[tuple[str, Any]] | None:
        if isinstance(obj, Mapping):
            return [(str(k), v) for k, v in obj.items()]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return [(f, getattr(obj, f)) for f in obj._fields]
        if isinstance(obj, list | tuple) or type(obj).__name__ == "deque":
            return [(str(i), v) for i, v in enumerate(obj)]
        if hasattr(obj, "__dataclass_fields__"):
            return [(f, getattr(obj, f)) for f in obj.__dataclass_fields__]
        return None

    stack: list[tuple[_Node, Any]] = [(root, tree)] if tree is not None else []
    while stack:
        node, obj = stack.pop()
        for name, child in child_items(obj) or []:
            if isinstance(child, _LeafMark):
                if child.fqn in manifest.records:
                    node.children[name] = child.fqn
                    placed.add(child.fqn)
                continue
            fqn = f"{node.fqn}.{name}" if node.fqn else name
            sub = _Node(fqn)
            node.children[name] = sub
            groups.setdefault(fqn, sub)
            stack.append((sub, child))
    for fqn in manifest.records:  # leaves the structure does not place: at the root
        if fqn not in placed:
            root.children[fqn] = fqn
    return root, groups


class Group(Mapping[str, Any]):
    """A subtree of the checkpoint: a mapping from child names to children.

    A child is a :class:`Group`, a :class:`TensorHandle` or a plain value.
    Keys may also be dotted paths below this group (``g["layers.0.weight"]``).
    Nothing is read from tensor data to list or index a group.
    """

    def __init__(self, source: _Source, node: _Node) -> None:
        self._src = source
        self._node = node

    @property
    def fqn(self) -> str:
        """The FQN prefix of this subtree (``""`` at the root)."""
        return self._node.fqn

    def __getitem__(self, key: str | int) -> Any:
        name = str(key)
        full = f"{self.fqn}.{name}" if self.fqn else name
        records = self._src.manifest.records
        child = self._node.children.get(name)
        if isinstance(child, _Node):
            return Group(self._src, child)
        if isinstance(child, str):
            return self._src.entry(child)
        if full in records:
            return self._src.entry(full)
        if full in self._src.groups:
            return Group(self._src, self._src.groups[full])
        near = difflib.get_close_matches(full, [*records, *self._src.groups], n=3)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise LeafNotFoundError(
            f"{full!r} is not a leaf or subtree of the checkpoint at {self._src.backend.root}{hint}"
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._node.children)

    def __len__(self) -> int:
        return len(self._node.children)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str | int):
            return False
        name = str(key)
        full = f"{self.fqn}.{name}" if self.fqn else name
        return (
            name in self._node.children
            or full in self._src.manifest.records
            or full in self._src.groups
        )

    def fqns(self) -> list[str]:
        """Every leaf FQN below this group, in saved order."""
        out: list[str] = []
        stack: list[_Node | str] = [self._node]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                out.append(item)
            else:
                stack.extend(reversed(item.children.values()))
        return out

    def tensors(self) -> dict[str, TensorHandle]:
        """FQN -> handle of every tensor below this group."""
        recs = self._src.manifest.records
        return {f: self._src.entry(f) for f in self.fqns() if isinstance(recs[f], TensorLeaf)}

    def leaf_values(self) -> dict[str, Any]:
        """FQN -> value of every non-tensor leaf below this group (pickles shown, not loaded)."""
        recs = self._src.manifest.records
        return {f: _preview(recs[f]) for f in self.fqns() if not isinstance(recs[f], TensorLeaf)}

    @property
    def tree(self) -> dict[str, Any]:
        """This subtree as nested dicts of tensor handles and values."""

        def build(node: _Node) -> dict[str, Any]:
            return {
                name: build(c) if isinstance(c, _Node) else self._src.entry(c)
                for name, c in node.children.items()
            }

        return build(self._node)

    @property
    def raw_bytes(self) -> int:
        """Raw size of every tensor below (from the manifest; no index read)."""
        recs = self._src.manifest.records
        return sum(_nbytes(r) for f in self.fqns() if isinstance(r := recs[f], TensorLeaf))

    @property
    def stored_bytes(self) -> int:
        """Stored size of every tensor below (reads the chunk indexes once)."""
        return sum(h.stored_bytes for h in self.tensors().values())

    def __repr__(self) -> str:
        return _display.render_text(self, max_lines=60)

    def summary(self, max_lines: int | None = None) -> str:
        """The plain-text tree (every line unless ``max_lines``)."""
        return _display.render_text(self, max_lines=max_lines)

    def _repr_html_(self) -> str:
        return _display.render_html(self)

    def _children(self) -> list[tuple[str, Group | str]]:
        """(name, subgroup or leaf FQN) in saved order (for display)."""
        return [
            (n, Group(self._src, c) if isinstance(c, _Node) else c)
            for n, c in self._node.children.items()
        ]

    def _record(self, fqn: str) -> LeafRecord:
        return self._src.manifest.records[fqn]

    def _handle(self, fqn: str) -> TensorHandle:
        handle = self._src.entry(fqn)
        assert isinstance(handle, TensorHandle)
        return handle


class Checkpoint(Group):
    """An open checkpoint: the root :class:`Group` plus what describes the save.

    Use it as a context manager (or call :meth:`close`) to release the storage
    handles; handles and groups taken from it need it open to read data.
    """

    def __init__(self, source: _Source) -> None:
        super().__init__(source, source.root)

    @property
    def path(self) -> str:
        """Where the checkpoint is (absolute path, or the URL's path)."""
        return self._src.backend.root

    @property
    def save_id(self) -> str:
        """The id of the save that committed this checkpoint (names its data files)."""
        return self._src.manifest.save_id

    @property
    def world_size(self) -> int:
        """How many ranks wrote this checkpoint."""
        return self._src.manifest.world_size

    @property
    def format_version(self) -> int:
        """The on-disk format version of the manifest."""
        return self._src.manifest.format_version

    @property
    def structure(self) -> dict[str, Any]:
        """The saved tree's structure record (see the format specification)."""
        return self._src.manifest.structure

    @property
    def user_metadata(self) -> dict[str, Any]:
        """The ``user_metadata`` dict given to ``save``."""
        return dict(self._src.manifest.user_metadata)

    @property
    def files(self) -> dict[str, int]:
        """Data file name -> size in bytes (reads the chunk indexes)."""
        return {f.name: f.size for ix in self._src.indexes for f in ix.files}

    @property
    def bytes_read(self) -> int:
        """Stored tensor bytes read so far through this object (indexes and manifest excluded)."""
        return self._src.bytes_read

    def close(self) -> None:
        """Release cached storage handles (a later read opens what it needs again)."""
        self._src.backend.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TensorHandle:
    """A tensor of the checkpoint, described without reading its data.

    ``read()`` gives the whole tensor, ``h[index]`` a part of it (ints,
    slices with positive steps and ``...``; only the chunks covering the
    index are read), ``stats()`` summary statistics computed chunk by chunk.
    Results are CPU torch tensors (numpy arrays for arrays saved from numpy).
    """

    def __init__(self, source: _Source, fqn: str, rec: TensorLeaf) -> None:
        self._src = source
        self.fqn = fqn
        self._rec = rec

    @property
    def shape(self) -> tuple[int, ...]:
        """The global shape (of the whole tensor, however it was sharded)."""
        return self._rec.shape

    @property
    def dtype(self) -> str:
        """The format's dtype code (``float32``, ``bfloat16``...); see :attr:`torch_dtype`."""
        return self._rec.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` of :attr:`dtype`."""
        return torch_dtype(self._rec.dtype)

    @property
    def lib(self) -> str:
        """What was saved: ``torch``, ``numpy`` or ``numpy-scalar``."""
        return self._rec.lib

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self._rec.shape)

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self._rec.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Raw size in bytes."""
        return _nbytes(self._rec)

    @property
    def chunks(self) -> tuple[ChunkInfo, ...]:
        """Every stored chunk (region, writer rank, file, sizes, codec)."""
        return self._src.chunks(self.fqn)

    @property
    def stored_bytes(self) -> int:
        """Bytes its chunks take in the data files (reads the chunk indexes once)."""
        return sum(c.stored_bytes for c in self.chunks)

    @property
    def ratio(self) -> float:
        """Compression ratio, raw / stored (1.0 for raw chunks)."""
        stored = self.stored_bytes
        return self.nbytes / stored if stored else 1.0

    @property
    def codecs(self) -> dict[str, int]:
        """Codec -> number of chunks stored with it (``raw``, ``zstd``, ``shuffle+zstd``...)."""
        out: dict[str, int] = {}
        for c in self.chunks:
            out[c.codec] = out.get(c.codec, 0) + 1
        return out

    @property
    def layout(self) -> dict[int, tuple[Box, ...]]:
        """Writer rank -> the regions (chunk boxes) it stored: the shard layout at save time."""
        out: dict[int, list[Box]] = {}
        for c in self.chunks:
            out.setdefault(c.rank, []).append(c.box)
        return {r: tuple(sorted(b, key=lambda x: x.offsets)) for r, b in sorted(out.items())}

    def read(self) -> Any:
        """The whole tensor (CPU)."""
        (out,) = self._src.read(self.fqn, (full_box(self.shape),))
        return finish_leaf(out, self._rec)

    def __getitem__(self, index: Any) -> Any:
        box, post = _index_box(self.shape, index)
        (out,) = self._src.read(self.fqn, (box,))
        if self._rec.lib == "numpy-scalar":
            return finish_leaf(out, self._rec)
        result = out[post]
        steps = any(isinstance(p, slice) and p.step not in (None, 1) for p in post)
        if steps:  # a strided view would keep the whole covering block alive
            result = result.clone() if isinstance(result, torch.Tensor) else np.array(result)
        return result

    def plan(self, index: Any = ...) -> LoadPlan:
        """Dry run: what reading ``h[index]`` would read (``.report()``), reading no data."""
        box, _ = _index_box(self.shape, index)
        return self._src.plan(self.fqn, (box,))

    def stats(self, *, batch_bytes: int = STATS_BATCH_BYTES) -> TensorStats:
        """Summary statistics (see :class:`TensorStats`), reading the tensor chunk by chunk.

        At most about ``batch_bytes`` raw bytes (or one chunk, if larger) are
        held at a time, so any size can be summarised.
        """
        self._src.plan(self.fqn, (full_box(self.shape),))  # the chunks tile the tensor
        acc = StatsAccumulator()
        batch: list[Box] = []
        size = 0

        def flush() -> None:
            for out in self._src.read(self.fqn, tuple(batch)):
                acc.add(out if isinstance(out, torch.Tensor) else torch.from_numpy(out))

        for c in sorted(self.chunks, key=lambda c: (c.file, c.offset)):
            if not c.box.volume:
                continue
            if batch and size + c.raw_bytes > batch_bytes:
                flush()
                batch, size = [], 0
            batch.append(c.box)
            size += c.raw_bytes
        if batch:
            flush()
        return acc.result()

    def __repr__(self) -> str:
        return _display.handle_text(self)

    def _repr_html_(self) -> str:
        return _display.handle_html(self)


def _index_box(shape: tuple[int, ...], index: Any) -> tuple[Box, tuple[Any, ...]]:
    """The box covering ``index`` and the index that picks the result out of that box."""
    items = index if isinstance(index, tuple) else (index,)
    ndim = len(shape)
    ellipses = [i for i, x in enumerate(items) if x is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        k = ellipses[0]
        fill = ndim - (len(items) - 1)
        items = (*items[:k], *(slice(None),) * max(fill, 0), *items[k + 1 :])
    if len(items) > ndim:
        raise IndexError(f"too many indices for a {ndim}-d tensor: {len(items)} were given")
    items = (*items, *(slice(None),) * (ndim - len(items)))
    offsets: list[int] = []
    sizes: list[int] = []
    post: list[Any] = []
    for d, (ix, dim) in enumerate(zip(items, shape, strict=True)):
        if isinstance(ix, slice):
            start, stop, step = ix.indices(dim)
            if step <= 0:
                raise IndexError("only positive slice steps can be read")
            n = len(range(start, stop, step))
            offsets.append(min(start, dim) if n else 0)
            sizes.append((n - 1) * step + 1 if n else 0)
            post.append(slice(None, None, step) if step != 1 else slice(None))
            continue
        if isinstance(ix, bool | np.bool_) or ix is None:
            raise TypeError(f"index {ix!r}: only ints, slices and ... can index a tensor handle")
        try:
            k = operator.index(ix)
        except TypeError:
            raise TypeError(
                f"index of type {type(ix).__name__}: only ints, slices and ... can index a "
                "tensor handle (read() it first for other indexing)"
            ) from None
        if not -dim <= k < dim:
            raise IndexError(f"index {k} is out of bounds for dimension {d} with size {dim}")
        offsets.append(k % dim)
        sizes.append(1)
        post.append(0)
    return Box(offsets=tuple(offsets), sizes=tuple(sizes)), tuple(post)


def _nbytes(rec: TensorLeaf) -> int:
    n = dtype_info(rec.dtype).itemsize
    for d in rec.shape:
        n *= d
    return n


def _preview(rec: LeafRecord) -> Any:
    if isinstance(rec, ValueLeaf):
        return rec.value
    if isinstance(rec, PickleLeaf):
        return f"<pickled object, {len(rec.data)} bytes>"
    raise CheckpointError("not a value")  # pragma: no cover

"""The shared state of one open checkpoint: backend, manifest, chunk indexes read on demand."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.leaves import TensorLeaf, TensorLib
from treeckpt.core.manifest import ChunkIndex, Manifest
from treeckpt.core.options import LoadOptions
from treeckpt.core.plan import LoadPlan, StoredTensor, plan_load
from treeckpt.core.specs import ShardSpec
from treeckpt.core.tree import build_tree
from treeckpt.errors import CheckpointError, CheckpointReplacedError, ManifestError
from treeckpt.shell.load import read_regions
from treeckpt.shell.tensors import allocate
from treeckpt.store.backends import Backend
from treeckpt.store.reader import read_indexes, replacement

__all__ = ["ChunkInfo", "Node", "Source", "nbytes"]

T = TypeVar("T")


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


class Node:
    """A container of the saved tree: its FQN and its children, in saved order."""

    __slots__ = ("children", "fqn")

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn
        self.children: dict[str, Node | str] = {}  # name -> group, or leaf FQN


class _LeafMark:
    __slots__ = ("fqn",)

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn


class Source:
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
        #: FQN -> its one ``TensorHandle``, made by the views (``_checkpoint``) on first use.
        self.handles: dict[str, object] = {}

    @property
    def indexes(self) -> list[ChunkIndex]:
        with self._lock:
            if self._indexes is None:
                indexes = self.unless_replaced(lambda: read_indexes(self.backend, self.manifest))
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
        plan = self.unless_replaced(
            lambda: read_regions(
                self.backend,
                self.manifest,
                {fqn: self.stored(fqn)},
                {fqn: list(zip(boxes, outs, strict=True))},
                self.options,
            )
        )
        with self._lock:
            self.bytes_read += plan.read_stored_bytes
        return outs

    def unless_replaced(self, read: Callable[[], T]) -> T:
        """``read()``; when it fails because a new save replaced the checkpoint since it
        was opened (its files are gone), a :class:`CheckpointReplacedError` that says so.

        An open checkpoint is one save's snapshot: it never switches to the new one.
        """
        try:
            return read()
        except CheckpointReplacedError:
            raise
        except CheckpointError as exc:
            try:
                newer = replacement(self.backend, self.manifest)
            except CheckpointError:
                newer = None
            if newer is None:
                raise
            raise CheckpointReplacedError(
                f"{self.backend.root}: the checkpoint was replaced by a new save since it was "
                f"opened (save {self.manifest.save_id}, now save {newer.save_id}); open it again"
            ) from exc


def _build_nodes(manifest: Manifest) -> tuple[Node, dict[str, Node]]:
    """The saved tree's containers from the structure record (validated by ``build_tree``)."""
    root = Node("")
    groups: dict[str, Node] = {"": root}
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
        if isinstance(obj, list | tuple | collections.deque):
            return [(str(i), v) for i, v in enumerate(obj)]
        if hasattr(obj, "__dataclass_fields__"):
            return [(f, getattr(obj, f)) for f in obj.__dataclass_fields__]
        return None

    stack: list[tuple[Node, Any]] = [(root, tree)] if tree is not None else []
    while stack:
        node, obj = stack.pop()
        for name, child in child_items(obj) or []:
            if isinstance(child, _LeafMark):
                if child.fqn in manifest.records:
                    node.children[name] = child.fqn
                    placed.add(child.fqn)
                continue
            fqn = f"{node.fqn}.{name}" if node.fqn else name
            sub = Node(fqn)
            node.children[name] = sub
            groups.setdefault(fqn, sub)
            stack.append((sub, child))
    for fqn in manifest.records:  # leaves the structure does not place: at the root
        if fqn not in placed:
            root.children[fqn] = fqn
    return root, groups


def nbytes(rec: TensorLeaf) -> int:
    n = dtype_info(rec.dtype).itemsize
    for d in rec.shape:
        n *= d
    return n

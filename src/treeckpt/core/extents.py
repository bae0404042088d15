"""Which writer's chunk index holds which part of which tensor: the root manifest's map.

A save of W ranks writes W chunk indexes. A loading rank needs only the
indexes whose chunks intersect the boxes it reads, and with FSDP-style
sharding that is a handful out of thousands. The root manifest therefore
records, for every tensor, the boxes each writer stored (``Extents``), and
:func:`select_writers` picks the writers a rank's requests need, with no
file read and no collective.

Many tensors share one layout (every Shard(0) tensor of the same number of
rows is cut the same way), so the map stores each distinct layout once and
each tensor names its layout. A dimension every box of a layout spans whole
is stored as "whole" (no numbers), so tensors of different widths share a
layout too. Sizes stay proportional to the number of distinct layouts times
the writers, not to tensors times writers.

The map is a hint that decides what is read, never what is trusted: the
coverage check of ``plan_load`` still runs on the chunks actually read, so a
wrong map can only make a load fail, never return wrong values.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from treeckpt.core.box_columns import stable_order
from treeckpt.core.plan_table import SavePlan
from treeckpt.core.specs import ShardSpec

__all__ = ["Extents", "Layout", "extents_of_plan", "select_writers", "writers_of"]

Ints = npt.NDArray[np.int64]
#: a layout's columns: int32 when its boxes fit, int64 otherwise
Cols = npt.NDArray[np.int32] | npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Layout:
    """Boxes of a tensor and the writer that stored each: box ``i`` is writer ``ranks[i]``'s.

    ``whole[j]`` is true when every box spans dimension ``j`` entirely;
    ``offsets`` and ``sizes`` are ``(n, k)``, one column per other dimension
    (``cut``), in order.
    """

    ranks: Cols
    offsets: Cols
    sizes: Cols
    whole: tuple[bool, ...]

    @classmethod
    def of(cls, ranks: Cols, offsets: Cols, sizes: Cols, whole: tuple[bool, ...]) -> Layout:
        """A layout holding its columns as int32 when every box's far edge fits (half the bytes)."""
        small = not len(ranks) or not offsets.size or int((offsets + sizes).max()) < (1 << 31)
        kind = np.int32 if small else np.int64
        return cls(
            ranks=np.ascontiguousarray(ranks, dtype=np.int32),
            offsets=np.ascontiguousarray(offsets, dtype=kind),
            sizes=np.ascontiguousarray(sizes, dtype=kind),
            whole=whole,
        )

    @property
    def cut(self) -> tuple[int, ...]:
        """The dimensions the boxes do not all span whole (the columns of ``offsets``)."""
        return tuple(d for d, w in enumerate(self.whole) if not w)

    def key(self) -> tuple[bytes, ...]:
        return (
            self.offsets.dtype.str.encode(),
            self.ranks.tobytes(),
            self.offsets.tobytes(),
            self.sizes.tobytes(),
            bytes(self.whole),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return self.whole == other.whole and self.key() == other.key()

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """Pickled small (rank 0 broadcasts the map to every rank): each column as
        differences between rows (writers count up by one, offsets by the sizes,
        sizes repeat), deflated; unpickled to the same columns, bit for bit."""
        cols = np.concatenate([self.ranks[:, None], self.offsets, self.sizes], axis=1)
        deltas = np.diff(cols, axis=0, prepend=np.zeros((1, cols.shape[1]), dtype=cols.dtype))
        packed = zlib.compress(
            np.ascontiguousarray(deltas.T, dtype=self.offsets.dtype).tobytes(), 6
        )
        return _unpack_layout, (packed, len(self.ranks), self.offsets.dtype.str, self.whole)


def _unpack_layout(packed: bytes, n: int, kind: str, whole: tuple[bool, ...]) -> Layout:
    """The layout ``Layout.__reduce__`` packed."""
    k = whole.count(False)
    cols = np.cumsum(
        np.frombuffer(zlib.decompress(packed), dtype=kind).reshape(1 + 2 * k, n), axis=1
    ).astype(kind)
    return Layout(
        ranks=cols[0].astype(np.int32),
        offsets=np.ascontiguousarray(cols[1 : 1 + k].T),
        sizes=np.ascontiguousarray(cols[1 + k :].T),
        whole=whole,
    )


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Extents:
    """The map: distinct ``layouts`` and, per tensor FQN, the number of its layout.

    A tensor absent from ``tensors`` has no chunks (it has no elements).
    """

    layouts: tuple[Layout, ...]
    tensors: Mapping[str, int]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Extents):
            return NotImplemented
        return self.layouts == other.layouts and dict(self.tensors) == dict(other.tensors)

    __hash__ = None  # type: ignore[assignment]

    @property
    def ranks(self) -> frozenset[int]:
        """Every writer the map names."""
        out: set[int] = set()
        for lay in self.layouts:
            out.update(np.unique(lay.ranks).tolist())
        return frozenset(out)


def extents_of_plan(plan: SavePlan) -> Extents:
    """The map of a whole save plan (the coordinator's): each writer's shard boxes per tensor.

    Shard boxes, not chunks: the chunks a writer cuts from a box tile it, so
    a request intersects the box exactly when it intersects one of its
    chunks, and a layout stays one row per writer.
    """
    t = plan.tensors
    n_t = len(t.fqns)
    if not len(plan.tensor):
        return Extents(layouts=(), tensors={})
    # One row per (tensor, rank, shard box), by tensor. Each rank's rows are in
    # tensor order with the chunks of one box together, so a stable sort by
    # tensor keeps the chunks of a box adjacent: dropping repeats is a diff.
    order = stable_order(plan.tensor, n_t)
    if not (plan.chunk_offsets is plan.shard_offsets and plan.chunk_sizes is plan.shard_sizes):
        # Some boxes were split into several chunks: keep one row per box.
        tensor, rank = plan.tensor[order], plan.rank[order]
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = (tensor[1:] != tensor[:-1]) | (rank[1:] != rank[:-1])
        for col in (*plan.shard_offsets.T, *plan.shard_sizes.T):
            c = col[order]
            keep[1:] |= c[1:] != c[:-1]
        order = order[keep]
    tensor, rank = plan.tensor[order], plan.rank[order]
    offs, sizes = plan.shard_offsets[order], plan.shard_sizes[order]
    starts = np.searchsorted(tensor, np.arange(n_t + 1))
    layouts: list[Layout] = []
    seen: dict[tuple[bytes, ...], int] = {}
    tensors: dict[str, int] = {}
    for ti in range(n_t):
        lo, hi = int(starts[ti]), int(starts[ti + 1])
        if lo == hi:
            continue
        shape = t.shapes[ti]
        ndims = len(shape)
        o, s = offs[lo:hi, :ndims], sizes[lo:hi, :ndims]
        whole = tuple(bool(not o[:, d].any() and (s[:, d] == shape[d]).all()) for d in range(ndims))
        cut = [d for d in range(ndims) if not whole[d]]
        lay = Layout.of(rank[lo:hi], o[:, cut], s[:, cut], whole)
        k = lay.key()
        if k not in seen:
            seen[k] = len(layouts)
            layouts.append(lay)
        tensors[t.fqns[ti]] = seen[k]
    return Extents(layouts=tuple(layouts), tensors=tensors)


def writers_of(extents: Extents, spec: ShardSpec) -> Ints:
    """The writers (sorted, distinct) whose boxes of ``spec.fqn`` intersect one of ``spec.boxes``."""
    n = extents.tensors.get(spec.fqn)
    boxes = [b for b in spec.boxes if not b.is_empty()]
    if n is None or not boxes:
        return np.zeros(0, dtype=np.int64)
    lay = extents.layouts[n]
    hit = np.zeros(len(lay.ranks), dtype=bool)
    for box in boxes:
        m = np.ones(len(lay.ranks), dtype=bool)
        for j, d in enumerate(lay.cut):
            lo, hi = box.offsets[d], box.offsets[d] + box.sizes[d]
            col_o = lay.offsets[:, j]
            m &= (col_o < hi) & (col_o.astype(np.int64) + lay.sizes[:, j] > lo)
        hit |= m
    return np.unique(lay.ranks[hit])


def select_writers(extents: Extents, requests: Sequence[ShardSpec]) -> frozenset[int]:
    """Every writer whose stored boxes intersect a requested box: the indexes a rank must read."""
    parts = [writers_of(extents, s) for s in requests]
    if not parts:
        return frozenset()
    return frozenset(np.unique(np.concatenate(parts)).tolist())

"""Save planning on columns: thousands of ranks in one process.

A planner over one Python object per box costs about 20 µs a box, so a
save of 4096 ranks x 1000 sharded tensors (4 million boxes) would take over a
minute on the coordinator. Here the boxes of all ranks are numpy columns
(``core/shard_table.py``: tensor id, rank, offsets, sizes, padded to a common rank of dimensions with
extent-1 dimensions), and the decisions of ``plan_save`` are made with sorts
and reductions:

- exact replicas are adjacent after one sort, so deduplication is a diff;
- a tensor's boxes must have the volume of its shape, and for the layouts
  sharding produces (slabs cut along one dimension) that no two overlap is checked
  between neighbours along that dimension; any other layout, and any tensor
  whose columns look wrong, goes through ``check_tiling`` box by box, which
  also words the error;
- replicated boxes go to the least-loaded holder in a loop over replicated
  boxes only;
- boxes within ``chunk_bytes`` are their own chunk; larger ones are split with
  ``split_box``;
- when no box is replicated or split and each rank lists its boxes in tensor
  order (sharded training, the common case), the plan is the input rows as
  they come, after the same checks.

The sort and the tiling checks are in ``core/box_columns.py``.

The result is one type, :class:`SavePlan`: the whole plan on the
coordinator, one rank's rows (``for_rank``) on every other rank. Each rank's
write items are built from its own rows only (``items_for``), so no process
ever holds an object per box of the whole job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from treeckpt.core.box import Box, split_box
from treeckpt.core.box_columns import (
    all_cols,
    check_tilings,
    prod_cols,
    sort_boxes,
    stable_order,
    tiling_error,
)
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.shard_table import (
    Ints,
    LocalTable,
    ShardTable,
    TensorTable,
    local_table,
    merge_tables,
)
from treeckpt.core.sizes import fmt_size
from treeckpt.core.specs import ShardSpec
from treeckpt.errors import PlanError

__all__ = ["SavePlan", "WriteItem", "plan_save", "plan_save_table", "stable_order"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteItem:
    """Rank ``rank`` writes region ``chunk`` of ``fqn``, taken from its local ``shard`` box."""

    fqn: str
    dtype: str
    rank: int
    shard: Box
    chunk: Box

    @property
    def nbytes(self) -> int:
        return self.chunk.volume * dtype_info(self.dtype).itemsize


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SavePlan:
    """Who writes what, as columns: item ``i`` is rank ``rank[i]`` writing chunk
    ``chunk_*[i]`` of tensor ``tensor[i]``, taken from its local box ``shard_*[i]``.

    Rows are sorted by rank, and within a rank in write order. ``tensors``
    describes every tensor of the save (FQN, dtype, global shape). The whole
    plan lives on the coordinator; ``for_rank`` is the view a rank receives
    and ``items_for`` its write items as objects. Two plans are equal when
    every column is.
    """

    tensors: TensorTable
    world: int
    rank: Ints
    tensor: Ints
    shard_offsets: Ints
    shard_sizes: Ints
    chunk_offsets: Ints
    chunk_sizes: Ints
    nbytes: Ints
    starts: Ints  # rows of rank r are starts[r]:starts[r + 1]

    @property
    def bytes_by_rank(self) -> tuple[int, ...]:
        cum = np.concatenate([[0], np.cumsum(self.nbytes)])
        return tuple(int(cum[self.starts[r + 1]] - cum[self.starts[r]]) for r in range(self.world))

    @property
    def chunks_by_rank(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.diff(self.starts))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SavePlan):
            return NotImplemented
        return (
            self.tensors == other.tensors
            and self.world == other.world
            and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _COLUMNS)
        )

    __hash__ = None  # type: ignore[assignment]

    def for_rank(self, rank: int) -> SavePlan:
        """Only ``rank``'s rows (what the coordinator sends that rank)."""
        lo, hi = int(self.starts[rank]), int(self.starts[rank + 1])
        starts = np.zeros(self.world + 1, dtype=np.int64)
        starts[rank + 1 :] = hi - lo
        return SavePlan(
            tensors=self.tensors,
            world=self.world,
            rank=self.rank[lo:hi],
            tensor=self.tensor[lo:hi],
            shard_offsets=self.shard_offsets[lo:hi],
            shard_sizes=self.shard_sizes[lo:hi],
            chunk_offsets=self.chunk_offsets[lo:hi],
            chunk_sizes=self.chunk_sizes[lo:hi],
            nbytes=self.nbytes[lo:hi],
            starts=starts,
        )

    def items_for(self, rank: int) -> tuple[WriteItem, ...]:
        """Rank ``rank``'s write items, as objects."""
        out = []
        for i in range(int(self.starts[rank]), int(self.starts[rank + 1])):
            ti = int(self.tensor[i])
            ndims = len(self.tensors.shapes[ti])
            out.append(
                WriteItem(
                    fqn=self.tensors.fqns[ti],
                    dtype=self.tensors.dtypes[ti],
                    rank=rank,
                    shard=Box(
                        offsets=tuple(int(x) for x in self.shard_offsets[i, :ndims]),
                        sizes=tuple(int(x) for x in self.shard_sizes[i, :ndims]),
                    ),
                    chunk=Box(
                        offsets=tuple(int(x) for x in self.chunk_offsets[i, :ndims]),
                        sizes=tuple(int(x) for x in self.chunk_sizes[i, :ndims]),
                    ),
                )
            )
        return tuple(out)

    def report(self) -> str:
        """A dry-run cost report: raw bytes and chunks each rank will write."""
        by_rank, chunks = self.bytes_by_rank, self.chunks_by_rank
        lines = [
            f"save plan: {len(self.tensors.fqns)} tensors, {fmt_size(sum(by_rank))} raw, "
            f"{self.world} ranks"
        ]
        for r, (b, c) in enumerate(zip(by_rank, chunks, strict=True)):
            lines.append(f"  rank {r}: {fmt_size(b)} in {c} chunks")
        return "\n".join(lines)


_COLUMNS = (
    "rank",
    "tensor",
    "shard_offsets",
    "shard_sizes",
    "chunk_offsets",
    "chunk_sizes",
    "nbytes",
    "starts",
)


def plan_save(specs_by_rank: Sequence[Sequence[ShardSpec]], *, chunk_bytes: int) -> SavePlan:
    """Plan a save from every rank's shard specs.

    Checks that all ranks agree on each tensor's dtype and shape, and that the
    boxes of each tensor tile its shape (no gaps; overlaps only as exact
    replicas). A box held by one rank is written by it; a replicated box is
    written once, by the holder with the fewest bytes assigned so far (largest
    boxes first, ties to the lowest rank), which spreads replicated tensors
    (DDP, ``Replicate()``) across ranks. Assigned boxes are split into chunks
    of at most ``chunk_bytes``.

    A save does the same in two steps: every rank builds its own columns
    (``local_table``) and the coordinator plans them (``plan_save_table``).

    Raises:
        PlanError: ranks disagree, or the boxes of a tensor do not tile it
            (the FQN and the ranks or boxes are named).
    """
    return plan_save_table(
        [local_table(specs, rank) for rank, specs in enumerate(specs_by_rank)],
        chunk_bytes=chunk_bytes,
    )


def plan_save_table(tables: Sequence[LocalTable], *, chunk_bytes: int) -> SavePlan:
    """``plan_save`` on every rank's columns (see the module docstring)."""
    if chunk_bytes <= 0:
        raise PlanError(f"chunk size must be positive, got {chunk_bytes}")
    t = merge_tables(tables)
    itemsize = np.asarray([dtype_info(d).itemsize for d in t.tensors.dtypes] or [1], dtype=np.int64)

    # Empty boxes hold nothing to write (uneven sharding makes many of them).
    dims = t.offsets.shape[1]
    # Column by column: numpy reduces a short inner axis slowly.
    nonempty = all_cols([t.sizes[:, d] > 0 for d in range(dims)], len(t.tensor))
    if nonempty.all():  # no empty box (even sharding): no gather, strided views
        keep = None
        tensor, rank_kept = t.tensor, t.rank
        off_cols = [t.offsets[:, d] for d in range(dims)]
        size_cols = [t.sizes[:, d] for d in range(dims)]
    else:
        keep = np.flatnonzero(nonempty)
        tensor, rank_kept = t.tensor[keep], t.rank[keep]
        # Columns one by one: gathering 1-d columns is cheaper than 2-d rows, and
        # the 2-d rows are gathered once, in sorted order, below.
        off_cols = [t.offsets[keep, d] for d in range(dims)]
        size_cols = [t.sizes[keep, d] for d in range(dims)]
    del nonempty
    # Bounds: negative values are refused by Box itself; check the far edges.
    if len(tensor):
        outside = np.zeros(len(tensor), dtype=bool)
        for d in range(dims):
            outside |= (off_cols[d] + size_cols[d]) > t.shape[tensor, d]
        if outside.any():
            tiling_error(t, int(tensor[np.argmax(outside)]))
    order, sorted_key, in_key = sort_boxes(t, tensor, rank_kept, off_cols, size_cols)
    del off_cols, size_cols
    tensor_in = tensor
    sel = order if keep is None else keep[order]
    tensor = t.tensor[sel]
    n = len(tensor)
    new_group = np.ones(n, dtype=bool)
    if n > 1 and sorted_key is not None:  # one packed word: replicas have equal keys
        np.not_equal(sorted_key[1:], sorted_key[:-1], out=new_group[1:])
    elif n > 1:
        same = tensor[1:] == tensor[:-1]
        for d in range(dims):
            for cols in (t.offsets, t.sizes):
                sc = cols[sel, d]
                same &= sc[1:] == sc[:-1]
        new_group[1:] = ~same
    del sorted_key
    distinct = bool(new_group.all())
    if distinct:  # no replica: every box is its own group
        g_tensor, g_off, g_size = tensor, t.offsets[sel], t.sizes[sel]
    else:
        group_start = np.flatnonzero(new_group)
        # The 2-d rows are gathered once, for the distinct boxes only.
        g_sel = sel[group_start]
        g_tensor, g_off, g_size = tensor[group_start], t.offsets[g_sel], t.sizes[g_sel]
        g_count = np.diff(np.append(group_start, n))
    del new_group

    g_vol = prod_cols(g_size)
    check_tilings(t, g_tensor, g_off, g_size, g_vol)

    g_bytes = g_vol * itemsize[g_tensor]
    if (
        distinct
        and in_key is not None
        and bool((g_bytes <= chunk_bytes).all())
        and _ranks_in_key_order(in_key, rank_kept)
    ):
        # The common case (sharded, no replica, no split, each rank describing
        # its boxes in tensor order): the plan is the input rows as they come.
        del g_off, g_size, g_vol, g_bytes, order, sel, tensor
        so = t.offsets if keep is None else t.offsets[keep]
        ss = t.sizes if keep is None else t.sizes[keep]
        return _plan(t, rank_kept, tensor_in, so, ss, so, ss, itemsize)

    # Assignment: unique boxes to their holder; replicas to the least loaded.
    rank = t.rank[sel]
    if distinct:
        group_start = np.arange(n)
        g_count = np.ones(n, dtype=np.int64)
    g_rank = rank[group_start].copy()
    load = np.bincount(
        g_rank[g_count == 1], weights=g_bytes[g_count == 1].astype(np.float64), minlength=t.world
    )
    replicated = np.flatnonzero(g_count > 1)
    if len(replicated):
        for g in replicated[np.argsort(-g_bytes[replicated], kind="stable")]:
            holders = rank[group_start[g] : group_start[g] + g_count[g]]  # ascending
            r = int(holders[np.argmin(load[holders])])
            g_rank[g] = r
            load[r] += float(g_bytes[g])

    # Chunks: a box within chunk_bytes is its own chunk; larger ones are split.
    fits = g_bytes <= chunk_bytes
    split = np.flatnonzero(~fits)
    if len(split):
        rows_t, rows_r = [g_tensor[fits]], [g_rank[fits]]
        rows_so, rows_ss = [g_off[fits]], [g_size[fits]]
        rows_co, rows_cs = [rows_so[0]], [rows_ss[0]]
    else:  # the common case: every box is one chunk, no copy
        rows_t, rows_r, rows_so, rows_ss = [g_tensor], [g_rank], [g_off], [g_size]
        rows_co, rows_cs = rows_so, rows_ss
    for g in split:
        ti = int(g_tensor[g])
        ndims = len(t.tensors.shapes[ti])
        box = Box(
            offsets=tuple(int(x) for x in g_off[g, :ndims]),
            sizes=tuple(int(x) for x in g_size[g, :ndims]),
        )
        chunks = split_box(box, int(itemsize[ti]), chunk_bytes)
        k = len(chunks)
        co = np.zeros((k, dims), dtype=np.int64)
        cs = np.ones((k, dims), dtype=np.int64)
        for j, c in enumerate(chunks):
            co[j, :ndims], cs[j, :ndims] = c.offsets, c.sizes
        rows_t.append(np.full(k, ti, dtype=np.int64))
        rows_r.append(np.full(k, g_rank[g], dtype=np.int64))
        rows_so.append(np.repeat(g_off[g : g + 1], k, axis=0))
        rows_ss.append(np.repeat(g_size[g : g + 1], k, axis=0))
        rows_co.append(co)
        rows_cs.append(cs)
    it_t, it_r = _cat(rows_t), _cat(rows_r)
    it_so, it_ss = _cat(rows_so), _cat(rows_ss)
    # Whole boxes come in (tensor, offsets) order, then the chunks of split
    # boxes in the same order; a stable sort by rank keeps that order within
    # each rank (whole boxes first, then split chunks).
    by = stable_order(it_r, t.world)
    it_r, it_t = it_r[by], it_t[by]
    so, ss = it_so[by], it_ss[by]
    if len(split):
        co, cs = _cat(rows_co)[by], _cat(rows_cs)[by]
    else:  # chunks are the shard boxes: the same columns
        co, cs = so, ss
    return _plan(t, it_r, it_t, so, ss, co, cs, itemsize)


def _plan(
    t: ShardTable,
    rank: Ints,
    tensor: Ints,
    so: Ints,
    ss: Ints,
    co: Ints,
    cs: Ints,
    itemsize: Ints,
) -> SavePlan:
    return SavePlan(
        tensors=t.tensors,
        world=t.world,
        rank=rank,
        tensor=tensor,
        shard_offsets=so,
        shard_sizes=ss,
        chunk_offsets=co,
        chunk_sizes=cs,
        nbytes=prod_cols(cs) * itemsize[tensor],
        starts=np.searchsorted(rank, np.arange(t.world + 1)).astype(np.int64),
    )


def _ranks_in_key_order(key: Ints, rank: Ints) -> bool:
    """Whether each rank's rows (rows come in rank order) have increasing keys."""
    if len(key) < 2:
        return True
    return bool(((key[1:] > key[:-1]) | (rank[1:] != rank[:-1])).all())


def _cat(parts: list[Ints]) -> Ints:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

"""Sorting and tiling checks on box columns, for the save planner (``core/plan_table.py``).

``sort_boxes`` orders every rank's boxes so that exact replicas are adjacent
(packed keys, radix sorts where they fit); ``check_tilings`` checks that each
tensor's distinct boxes tile its shape, vectorized for slab layouts, and
``tiling_error`` words the error box by box.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from treeckpt.core.box import Box, check_tiling
from treeckpt.core.shard_table import Ints, ShardTable

__all__ = ["all_cols", "check_tilings", "prod_cols", "sort_boxes", "stable_order", "tiling_error"]


def stable_order(keys: Ints, bound: int) -> Ints:
    """``argsort(keys, kind="stable")`` for keys in ``[0, bound)``: a radix sort below 2^16."""
    if bound <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys, kind="stable")


def all_cols(cols: list[npt.NDArray[np.bool_]], n: int) -> npt.NDArray[np.bool_]:
    out = np.ones(n, dtype=bool)
    for c in cols:
        out &= c
    return out


def prod_cols(rows: Ints) -> Ints:
    """The product of each row of a 2-d array (column by column)."""
    out = np.ones(len(rows), dtype=np.int64)
    for d in range(rows.shape[1]):
        out *= rows[:, d]
    return out


def sort_boxes(
    t: ShardTable, tensor: Ints, rank: Ints, off_cols: list[Ints], size_cols: list[Ints]
) -> tuple[Ints, Ints | None, Ints | None]:
    """The order of boxes by (tensor, offsets, sizes, rank), so exact replicas are adjacent.

    The sort keys are packed into as few int64 words as fit, each field
    bounded by the largest value its column holds. Rows come in rank order
    (``merge_tables`` joins the ranks in order), so a stable sort on
    (tensor, offsets, sizes) leaves equal boxes in rank order without a rank
    field. When a tensor-id sort alone leaves the boxes sorted (Shard(0) in
    rank order, the common layout), that radix sort is the whole sort.
    Returns the order, and when the key is one word (equal boxes, and only
    they, have equal keys) that key in this order and in the rows' order.
    """
    assert len(rank) < 2 or bool((rank[1:] >= rank[:-1]).all()), "rows must come in rank order"
    n_t = len(t.tensors.fqns)
    if len(tensor) == 0:
        return np.zeros(0, dtype=np.int64), None, None
    # most significant first: tensor, offsets, sizes
    fields = [(tensor, max(1, n_t))]
    fields += [(c, int(c.max()) + 1) for c in off_cols]
    fields += [(c, int(c.max()) + 1) for c in size_cols]
    keys: list[Ints] = []
    key: Ints | None = None
    span = 1
    for col, bound in fields:
        if bound == 1:  # an all-zero column orders nothing
            continue
        if key is not None and span * bound < (1 << 62):
            key = key * bound + col
            span *= bound
        else:
            if key is not None:
                keys.append(key)
            key, span = col.copy(), bound
    assert key is not None
    keys.append(key)
    if len(keys) == 1:
        if span <= 1 << 16:
            order = stable_order(keys[0], span)
            return order, keys[0][order], keys[0]
        order = stable_order(tensor, max(1, n_t))
        sorted_key = keys[0][order]
        if bool((sorted_key[1:] >= sorted_key[:-1]).all()):
            return order, sorted_key, keys[0]
        order = np.argsort(keys[0], kind="stable")
        return order, keys[0][order], keys[0]
    return np.lexsort(tuple(reversed(keys))), None, None


def check_tilings(t: ShardTable, g_tensor: Ints, g_off: Ints, g_size: Ints, vol: Ints) -> None:
    """Every tensor's distinct boxes tile its shape (vectorized for slab layouts)."""
    n_tensors = len(t.tensors.fqns)
    starts = np.searchsorted(g_tensor, np.arange(n_tensors + 1))
    # Exact per-tensor volume sums (reduceat on int64, empty groups handled).
    sums = np.zeros(n_tensors, dtype=np.int64)
    nonempty = starts[:-1] < starts[1:]
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(vol, starts[:-1][nonempty])
    expected = np.asarray([math.prod(s) for s in t.tensors.shapes] or [0], dtype=np.int64)[
        :n_tensors
    ]
    suspect = sums != expected
    # Slabs: every box spans the whole shape in all dims but (at most) one.
    cut_dims = np.stack(
        [
            np.bincount(
                g_tensor, weights=g_size[:, d] != t.shape[:, d][g_tensor], minlength=n_tensors
            )
            for d in range(g_size.shape[1])
        ],
        axis=1,
    )
    slab = (cut_dims > 0).sum(axis=1) <= 1
    suspect |= ~slab
    if len(g_tensor) > 1:
        # Neighbours along the cut dim (rows are sorted by offsets) must not overlap.
        cut = np.argmax(cut_dims, axis=1)
        if (cut == cut[0]).all():  # every tensor cut along the same dim: plain columns
            start, size = g_off[:, int(cut[0])], g_size[:, int(cut[0])]
        else:
            d = cut[g_tensor]
            rows = np.arange(len(g_tensor))
            start, size = g_off[rows, d], g_size[rows, d]
        end = start + size
        same_t = g_tensor[1:] == g_tensor[:-1]
        overlap = same_t & (start[1:] < end[:-1])
        suspect[g_tensor[1:][overlap]] = True
    for ti in np.flatnonzero(suspect):
        tiling_error(t, int(ti), g_tensor, g_off, g_size)


def tiling_error(
    t: ShardTable,
    ti: int,
    g_tensor: Ints | None = None,
    g_off: Ints | None = None,
    g_size: Ints | None = None,
) -> None:
    """Check tensor ``ti`` box by box; raises the worded PlanError (returns if it tiles)."""
    ndims = len(t.tensors.shapes[ti])
    if g_tensor is None or g_off is None or g_size is None:
        rows = np.flatnonzero(t.tensor == ti)
        offs, sizes = t.offsets[rows], t.sizes[rows]
    else:
        rows = np.flatnonzero(g_tensor == ti)
        offs, sizes = g_off[rows], g_size[rows]
    boxes = [
        Box(offsets=tuple(int(x) for x in o[:ndims]), sizes=tuple(int(x) for x in s[:ndims]))
        for o, s in zip(offs, sizes, strict=True)
    ]
    check_tiling(t.tensors.shapes[ti], boxes, what=t.tensors.fqns[ti])

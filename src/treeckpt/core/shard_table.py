"""Every rank's shard specs as numpy columns, the input of save planning.

Each rank turns its own specs into a :class:`LocalTable` (``local_table``:
tensor ids, offsets and sizes, padded to a common number of dimensions with
extent-1 dimensions); the coordinator joins them into one
:class:`ShardTable` (``merge_tables``), agreeing tensor ids across ranks.
Columns, not an object per box: the coordinator of thousands of ranks plans
millions of boxes in seconds (``core/plan_table.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from treeckpt.core.specs import ShardSpec
from treeckpt.errors import PlanError

__all__ = ["Ints", "LocalTable", "ShardTable", "TensorTable", "local_table", "merge_tables"]

Ints = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorTable:
    """The tensors a rank describes: parallel tuples (compared in C across ranks)."""

    fqns: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class LocalTable:
    """One rank's shard specs as columns: box ``i`` belongs to tensor ``tensor[i]``."""

    tensors: TensorTable
    tensor: Ints
    offsets: Ints  # (n, d): d is this rank's largest tensor rank, lower ranks padded
    sizes: Ints


def local_table(specs: Sequence[ShardSpec], rank: int = 0) -> LocalTable:
    """Columns of one rank's specs (refuses an FQN described twice or a box of the wrong rank)."""
    fqns = tuple(s.fqn for s in specs)
    if len(set(fqns)) != len(fqns):
        seen: set[str] = set()
        dup = next(f for f in fqns if f in seen or seen.add(f))  # type: ignore[func-returns-value]
        raise PlanError(f"{dup}: rank {rank} describes the tensor twice")
    tensor: list[int] = []
    dims = max([1, *(len(s.shape) for s in specs)])
    pad0, pad1 = (0,) * dims, (1,) * dims
    offsets: list[tuple[int, ...]] = []
    sizes: list[tuple[int, ...]] = []
    for i, s in enumerate(specs):
        ndims = len(s.shape)
        for box in s.boxes:
            if box.ndim != ndims:
                raise PlanError(
                    f"{s.fqn}: rank {rank} gives a {box.ndim}-d box for a {ndims}-d tensor"
                )
            tensor.append(i)
            offsets.append(box.offsets + pad0[ndims:])
            sizes.append(box.sizes + pad1[ndims:])
    return LocalTable(
        tensors=TensorTable(
            fqns=fqns, dtypes=tuple(s.dtype for s in specs), shapes=tuple(s.shape for s in specs)
        ),
        tensor=np.asarray(tensor, dtype=np.int64),
        offsets=np.asarray(offsets, dtype=np.int64).reshape(len(offsets), dims),
        sizes=np.asarray(sizes, dtype=np.int64).reshape(len(sizes), dims),
    )


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ShardTable:
    """Every rank's boxes: box ``i`` is rank ``rank[i]``'s, of tensor ``tensor[i]``."""

    tensors: TensorTable
    world: int
    tensor: Ints
    rank: Ints
    offsets: Ints  # (n, D)
    sizes: Ints  # (n, D)
    shape: Ints  # (T, D), padded with 1


def merge_tables(tables: Sequence[LocalTable]) -> ShardTable:
    """All ranks' columns, with tensor ids agreed across ranks.

    Raises PlanError when two ranks give one FQN different dtypes or shapes.
    """
    first = tables[0].tensors if tables else TensorTable(fqns=(), dtypes=(), shapes=())
    ids: dict[str, int] = {f: i for i, f in enumerate(first.fqns)}
    fqns, dtypes, shapes = list(first.fqns), list(first.dtypes), list(first.shapes)
    owner = dict.fromkeys(first.fqns, 0)
    parts: list[Ints] = []
    for rank, t in enumerate(tables):
        if t.tensors == first:  # the common case: one comparison in C
            parts.append(t.tensor)
            continue
        remap = np.empty(len(t.tensors.fqns), dtype=np.int64)
        for j, (f, d, s) in enumerate(
            zip(t.tensors.fqns, t.tensors.dtypes, t.tensors.shapes, strict=True)
        ):
            i = ids.get(f)
            if i is None:
                i = ids[f] = len(fqns)
                fqns.append(f)
                dtypes.append(d)
                shapes.append(s)
                owner[f] = rank
            elif dtypes[i] != d or shapes[i] != s:
                raise PlanError(
                    f"{f}: rank {owner[f]} has dtype {dtypes[i]} shape {list(shapes[i])} but "
                    f"rank {rank} has dtype {d} shape {list(s)}"
                )
            remap[j] = i
        parts.append(remap[t.tensor])
    dims = max([1, *(len(s) for s in shapes)])
    counts = [len(t.offsets) for t in tables]
    n = sum(counts)
    offsets = np.zeros((n, dims), dtype=np.int64)
    sizes = np.ones((n, dims), dtype=np.int64)
    row = 0
    for t, k in zip(tables, counts, strict=True):
        d = t.offsets.shape[1]
        offsets[row : row + k, :d] = t.offsets
        sizes[row : row + k, :d] = t.sizes
        row += k
    shape_arr = np.ones((len(shapes), dims), dtype=np.int64)
    for i, s in enumerate(shapes):
        shape_arr[i, : len(s)] = s
    return ShardTable(
        tensors=TensorTable(fqns=tuple(fqns), dtypes=tuple(dtypes), shapes=tuple(shapes)),
        world=len(tables),
        tensor=np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64),
        rank=np.repeat(np.arange(len(tables), dtype=np.int64), counts),
        offsets=offsets,
        sizes=sizes,
        shape=shape_arr,
    )

"""Hypothesis strategies for box geometry, shard layouts and shard specs.

A *layout* is what every rank holds of one tensor: ``layout[r]`` is the tuple
of boxes rank ``r`` holds (often one box, sometimes none, several for a
ShardedTensor). The layouts drawn here are the ones sharding produces:

- :func:`tilings`: each element held by exactly one rank. Grid cuts along one
  or two dims (``Shard(d)`` on a 1-d or 2-d mesh), cut points drawn at random,
  evenly (``numpy.array_split``) or as ``torch.chunk`` / DTensor does (the
  trailing shards empty). Repeated cut points give empty shards.
- :func:`replicated_layouts`: HSDP and DDP: ranks ``j, j + s, j + 2s, ...``
  hold the same shard ``j`` of an ``s``-way tiling.
- :func:`layouts`: either of those, or a tiling whose cells each go to a
  random non-empty set of ranks.

>>> from hypothesis import given
>>> @given(shard_specs(4))
... def test_plans(specs_by_rank): ...

Trees of training state (:func:`trees`) mix every container kind the format
records with typed values and small tensors; compare a round trip with
:func:`treeckpt.testing.assert_same_tree`.

This module imports hypothesis, which is only a test dependency.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from hypothesis import strategies as st

from treeckpt.core.box import Box, full_box
from treeckpt.core.dtypes import DTYPES
from treeckpt.core.specs import ShardSpec

__all__ = [
    "EXAMPLE_DATACLASSES",
    "EXAMPLE_NAMEDTUPLES",
    "Layout",
    "boxes",
    "boxes_in",
    "cut_points",
    "dtype_codes",
    "grid_tilings",
    "layouts",
    "plain_values",
    "rank_trees",
    "replicated_layouts",
    "shapes",
    "shard_specs",
    "tensor_leaves",
    "tilings",
    "tree_keys",
    "trees",
]

Layout = tuple[tuple[Box, ...], ...]
"""``layout[r]``: the boxes rank ``r`` holds of one tensor."""


def shapes(
    *, min_dims: int = 0, max_dims: int = 3, min_side: int = 0, max_side: int = 8
) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes, including 0-d and shapes with a zero-size dim."""
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(
        tuple
    )


def dtype_codes() -> st.SearchStrategy[str]:
    """Codes of the format's dtype table (itemsizes 1 to 16)."""
    return st.sampled_from(sorted(DTYPES))


@st.composite
def boxes_in(draw: st.DrawFn, shape: Sequence[int], *, allow_empty: bool = True) -> Box:
    """A box inside a tensor of ``shape`` (empty ones too unless ``allow_empty=False``)."""
    offsets = []
    sizes = []
    for size in shape:
        if allow_empty:
            lo = draw(st.integers(0, size))
            hi = draw(st.integers(lo, size))
        else:
            lo = draw(st.integers(0, max(size - 1, 0)))
            hi = draw(st.integers(min(lo + 1, size), size))
        offsets.append(lo)
        sizes.append(hi - lo)
    return Box(offsets=tuple(offsets), sizes=tuple(sizes))


@st.composite
def boxes(
    draw: st.DrawFn,
    *,
    min_dims: int = 0,
    max_dims: int = 3,
    max_offset: int = 8,
    max_side: int = 8,
    ndim: int | None = None,
) -> Box:
    """Any box (not tied to a shape); ``ndim`` fixes the rank."""
    n = ndim if ndim is not None else draw(st.integers(min_dims, max_dims))
    offsets = draw(st.lists(st.integers(0, max_offset), min_size=n, max_size=n))
    sizes = draw(st.lists(st.integers(0, max_side), min_size=n, max_size=n))
    return Box(offsets=tuple(offsets), sizes=tuple(sizes))


@st.composite
def cut_points(draw: st.DrawFn, size: int, pieces: int) -> tuple[int, ...]:
    """``pieces + 1`` non-decreasing bounds from 0 to ``size``: piece i is ``[b[i], b[i+1])``.

    Drawn at random (equal cut points make empty pieces), evenly like
    ``numpy.array_split``, or like ``torch.chunk`` / DTensor ``Shard`` (pieces of
    ``ceil(size / pieces)``, so the trailing ones may be short or empty).
    """
    if pieces < 1:
        raise ValueError(f"pieces must be at least 1, got {pieces}")
    mode = draw(st.sampled_from(["random", "even", "chunk"]))
    if mode == "random":
        inner = sorted(
            draw(st.lists(st.integers(0, size), min_size=pieces - 1, max_size=pieces - 1))
        )
        return (0, *inner, size)
    if mode == "even":
        base, extra = divmod(size, pieces)
        bounds = [0]
        for i in range(pieces):
            bounds.append(bounds[-1] + base + (1 if i < extra else 0))
        return tuple(bounds)
    step = -(-size // pieces)
    return tuple(min(i * step, size) for i in range(pieces + 1))


def _grid(shape: Sequence[int], cuts: dict[int, tuple[int, ...]]) -> list[Box]:
    """Cells of the grid cutting ``shape`` at ``cuts[d]`` along each dim d, row-major."""
    cells = [Box(offsets=(0,) * len(shape), sizes=tuple(shape))]
    for d in sorted(cuts):
        bounds = cuts[d]
        cells = [
            Box(
                offsets=(*c.offsets[:d], lo, *c.offsets[d + 1 :]),
                sizes=(*c.sizes[:d], hi - lo, *c.sizes[d + 1 :]),
            )
            for c in cells
            for lo, hi in itertools.pairwise(bounds)
        ]
    return cells


@st.composite
def grid_tilings(draw: st.DrawFn, shape: Sequence[int], *, max_pieces: int = 4) -> tuple[Box, ...]:
    """Boxes tiling ``shape`` exactly: a grid cut along one or two dims (empty cells included)."""
    shape = tuple(shape)
    if not shape:
        return (full_box(()),)
    ncut = draw(st.integers(1, min(2, len(shape))))
    dims = draw(st.permutations(range(len(shape))))[:ncut]
    cuts = {}
    for d in dims:
        pieces = draw(st.integers(1, max_pieces))
        cuts[d] = draw(cut_points(shape[d], pieces))
    return tuple(_grid(shape, cuts))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def tilings(draw: st.DrawFn, shape: Sequence[int], n_ranks: int) -> Layout:
    """A layout of ``shape`` over ``n_ranks`` ranks with no replicas.

    Either one box per rank from a grid of exactly ``n_ranks`` cells (a mesh of
    ``a x b`` ranks cutting one or two dims), or the cells of a random grid
    scattered over the ranks (some ranks hold several boxes, some none).
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be at least 1, got {n_ranks}")
    shape = tuple(shape)
    if not shape:
        holder = draw(st.integers(0, n_ranks - 1))
        return tuple((full_box(()),) if r == holder else () for r in range(n_ranks))
    if draw(st.booleans()):
        a = draw(st.sampled_from(_divisors(n_ranks)))
        b = n_ranks // a
        dims = draw(st.permutations(range(len(shape))))
        cuts = {dims[0]: draw(cut_points(shape[dims[0]], a))}
        if b > 1:
            if len(shape) >= 2:
                cuts[dims[1]] = draw(cut_points(shape[dims[1]], b))
            else:  # one dim only: cut it into all n_ranks pieces
                cuts[dims[0]] = draw(cut_points(shape[dims[0]], n_ranks))
        cells = _grid(shape, cuts)
        return tuple((c,) for c in cells)
    scattered = draw(grid_tilings(shape, max_pieces=max(2, min(n_ranks, 6))))
    owners = [draw(st.integers(0, n_ranks - 1)) for _ in scattered]
    return tuple(
        tuple(c for c, o in zip(scattered, owners, strict=True) if o == r) for r in range(n_ranks)
    )


@st.composite
def replicated_layouts(
    draw: st.DrawFn, shape: Sequence[int], n_ranks: int, *, replicas: int | None = None
) -> Layout:
    """HSDP / DDP: an ``s``-way tiling, each shard held by ``replicas`` ranks.

    ``n_ranks = replicas * s``; rank ``k`` holds shard ``k % s`` (a row-major
    ``(replicas, s)`` mesh), so the holders of a shard are ``j, j + s, ...``.
    ``replicas`` defaults to a drawn divisor of ``n_ranks`` (``n_ranks`` itself
    is DDP: every rank holds everything).
    """
    if replicas is None:
        replicas = draw(st.sampled_from([d for d in _divisors(n_ranks) if d > 1] or [1]))
    if n_ranks % replicas:
        raise ValueError(f"replicas ({replicas}) must divide n_ranks ({n_ranks})")
    s = n_ranks // replicas
    shards = draw(tilings(shape, s))
    return tuple(shards[k % s] for k in range(n_ranks))


@st.composite
def _scattered_replicas(draw: st.DrawFn, shape: Sequence[int], n_ranks: int) -> Layout:
    cells = draw(grid_tilings(shape))
    held: list[list[Box]] = [[] for _ in range(n_ranks)]
    for c in cells:
        for r in sorted(draw(st.sets(st.integers(0, n_ranks - 1), min_size=1, max_size=4))):
            held[r].append(c)
    return tuple(tuple(h) for h in held)


def layouts(shape: Sequence[int], n_ranks: int) -> st.SearchStrategy[Layout]:
    """Any layout sharding produces: a tiling, HSDP/DDP replicas, or cells on random rank sets."""
    return st.one_of(
        tilings(shape, n_ranks),
        replicated_layouts(shape, n_ranks),
        _scattered_replicas(shape, n_ranks),
    )


@st.composite
def shard_specs(
    draw: st.DrawFn,
    n_ranks: int,
    *,
    min_tensors: int = 1,
    max_tensors: int = 3,
    shape: st.SearchStrategy[tuple[int, ...]] | None = None,
    dtype: st.SearchStrategy[str] | None = None,
    layout: Callable[[tuple[int, ...], int], st.SearchStrategy[Layout]] = layouts,
) -> list[list[ShardSpec]]:
    """What every rank describes in one save: ``specs[r]`` are rank r's ShardSpecs.

    Tensors are named ``layers.<i>.w``. A rank that holds nothing of a tensor
    sometimes omits it and sometimes lists it with no boxes; each rank lists
    its tensors in its own order (``plan_save`` must not care).
    """
    shape_st = shape if shape is not None else shapes()
    dtype_st = dtype if dtype is not None else dtype_codes()
    n_tensors = draw(st.integers(min_tensors, max_tensors))
    per_rank: list[list[ShardSpec]] = [[] for _ in range(n_ranks)]
    for t in range(n_tensors):
        tshape = draw(shape_st)
        code = draw(dtype_st)
        held = draw(layout(tshape, n_ranks))
        for r, bxs in enumerate(held):
            if len(bxs) > 0 or draw(st.booleans()):
                per_rank[r].append(
                    ShardSpec(fqn=f"layers.{t}.w", dtype=code, shape=tshape, boxes=bxs)
                )
    if draw(st.booleans()):
        per_rank = [draw(st.permutations(specs)) for specs in per_rank]
    return per_rank


# ------------------------------------------------------------------ trees

ExamplePoint = collections.namedtuple("ExamplePoint", ["x", "y"])
ExampleEmptyTuple = collections.namedtuple("ExampleEmptyTuple", [])


class ExamplePair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class ExampleState:
    step: Any
    payload: Any


@dataclasses.dataclass(frozen=True)
class ExampleFrozen:
    value: Any


@dataclasses.dataclass
class ExamplePrivate:
    """A dataclass with a private field and a field outside ``__init__``."""

    _cache: Any
    visible: Any
    derived: Any = dataclasses.field(init=False, default=None)


@dataclasses.dataclass
class ExampleEmpty:
    pass


EXAMPLE_NAMEDTUPLES: tuple[type[Any], ...] = (
    ExamplePoint,
    ExampleEmptyTuple,
    ExamplePair,
)
EXAMPLE_DATACLASSES: tuple[type[Any], ...] = (
    ExampleState,
    ExampleFrozen,
    ExamplePrivate,
    ExampleEmpty,
)

_SPECIAL_FLOATS = (
    math.nan,
    -math.nan,
    struct.unpack("<d", struct.pack("<Q", 0x7FF0_0000_0000_0001))[0],  # signalling NaN payload
    -0.0,
    0.0,
    math.inf,
    -math.inf,
    5e-324,
    1.7976931348623157e308,
)
_SPECIAL_INTS = (2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**100, -(10**100))


def plain_values() -> st.SearchStrategy[Any]:
    """Values the manifest stores typed: None, bool, big ints, any float, str, bytes."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(_SPECIAL_INTS),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(_SPECIAL_FLOATS),
        st.text(max_size=8),
        st.binary(max_size=8),
    )


_TORCH_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
)
_NUMPY_DTYPES = ("float32", "float64", "int64", "int16", "uint8", "bool", "complex128")


@st.composite
def tensor_leaves(draw: st.DrawFn) -> Any:
    """Small torch tensors, numpy arrays and numpy scalars of several dtypes (0-d included)."""
    shape = draw(shapes(max_dims=2, max_side=3))
    n = math.prod(shape)
    start = draw(st.integers(-5, 5))
    kind = draw(st.sampled_from(["torch", "numpy", "numpy-scalar"]))
    if kind == "torch":
        dtype = draw(st.sampled_from(_TORCH_DTYPES))
        base = torch.arange(start, start + n, dtype=torch.float64)
        if dtype == torch.bool:
            return (base.remainder(2) == 1).reshape(shape)
        return base.to(dtype).reshape(shape)
    npdtype = draw(st.sampled_from(_NUMPY_DTYPES))
    arr = np.arange(start, start + n).astype(npdtype).reshape(shape)
    if kind == "numpy-scalar":
        return arr.reshape(-1)[0] if n else np.dtype(npdtype).type(0)
    return arr


def tree_keys() -> st.SearchStrategy[str | int]:
    """Dict keys: str without dots (a dot would make FQNs ambiguous) or int of any size."""
    return st.one_of(
        st.text(
            alphabet=st.characters(codec="utf-8", exclude_characters="."),
            max_size=6,
        ),
        st.integers(),
    )


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # Keys unique by their rendering: {"1": a, 1: b} would collide in FQNs.
    # (Keys are drawn first, so the uniqueness filter's repr stays small.)
    items = st.lists(tree_keys(), max_size=4, unique_by=str).flatmap(
        lambda keys: st.tuples(*[children] * len(keys)).map(
            lambda values: list(zip(keys, values, strict=True))
        )
    )
    small = st.lists(children, max_size=4)

    def build(cls: type[Any]) -> st.SearchStrategy[Any]:
        if cls in EXAMPLE_NAMEDTUPLES:
            n = len(cls._fields)
            return st.tuples(*[children] * n).map(lambda xs: cls(*xs))
        names = [f.name for f in dataclasses.fields(cls)]
        init = [f.name for f in dataclasses.fields(cls) if f.init]

        def make(values: tuple[Any, ...]) -> Any:
            obj = cls(**{k: v for k, v in zip(names, values, strict=True) if k in init})
            for k, v in zip(names, values, strict=True):
                if k not in init:
                    object.__setattr__(obj, k, v)
            return obj

        return st.tuples(*[children] * len(names)).map(make)

    return st.one_of(
        items.map(dict),
        items.map(collections.OrderedDict),
        items.map(lambda kv: collections.defaultdict(list, kv)),
        small,
        small.map(tuple),
        st.tuples(small, st.none() | st.integers(4, 6)).map(
            lambda t: collections.deque(t[0], maxlen=t[1])
        ),
        st.sampled_from(EXAMPLE_NAMEDTUPLES + EXAMPLE_DATACLASSES).flatmap(build),
    )


def trees(
    leaves: st.SearchStrategy[Any] | None = None, *, max_leaves: int = 20
) -> st.SearchStrategy[Any]:
    """Nested training state: dicts (str and int keys, insertion order), OrderedDicts,
    ``defaultdict(list)``, lists, tuples, deques, namedtuples and dataclasses over
    :func:`plain_values` and :func:`tensor_leaves`. No two paths render to one FQN."""
    base = leaves if leaves is not None else st.one_of(plain_values(), tensor_leaves())
    return st.recursive(base, _containers, max_leaves=max_leaves)


@st.composite
def rank_trees(draw: st.DrawFn, *, max_ranks: int = 4) -> list[Any]:
    """The trees of 1 to ``max_ranks`` ranks of one save, which merge without conflict.

    Every rank holds one shared subtree (``"shared"``), a random share of a
    few optional entries (alike wherever present) and an entry of its own
    (``"rank_<r>"``), as a data loader's per-rank state is.
    """
    shared = draw(trees(max_leaves=8))
    optional = draw(st.dictionaries(st.sampled_from("abcd"), trees(max_leaves=4), max_size=3))
    out = []
    for r in range(draw(st.integers(1, max_ranks))):
        keep = draw(st.lists(st.sampled_from(sorted(optional) or ["-"]), unique=True))
        tree = {"shared": shared, **{k: optional[k] for k in keep if k in optional}}
        tree[f"rank_{r}"] = draw(trees(max_leaves=4))
        out.append(tree)
    return out

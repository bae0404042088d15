"""core/box.py: Box geometry, split_box and check_tiling, checked against numpy indexing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from treeckpt.core.box import Box, check_tiling, full_box, split_box
from treeckpt.errors import CheckpointError, PlanError
from treeckpt.testing.strategies import boxes, boxes_in, grid_tilings, layouts, shapes

# ------------------------------------------------------------------ Box


def _mask(shape: tuple[int, ...], box: Box | None) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    if box is not None:
        m[box.slices()] = True
    return m


@st.composite
def two_boxes(draw: st.DrawFn) -> tuple[Box, Box]:
    n = draw(st.integers(0, 3))
    return draw(boxes(ndim=n)), draw(boxes(ndim=n))


def test_box_rejects_bad_fields() -> None:
    with pytest.raises(PlanError, match="2 offsets but 1 sizes"):
        Box(offsets=(0, 0), sizes=(1,))
    with pytest.raises(PlanError, match="negative"):
        Box(offsets=(-1,), sizes=(1,))
    with pytest.raises(PlanError, match="negative"):
        Box(offsets=(0,), sizes=(-1,))
    assert issubclass(PlanError, CheckpointError)
    assert issubclass(PlanError, ValueError)


def test_box_is_frozen_and_hashable() -> None:
    b = Box(offsets=(1, 2), sizes=(3, 4))
    with pytest.raises(AttributeError):
        b.sizes = (1, 1)  # type: ignore[misc]
    assert {b, Box(offsets=(1, 2), sizes=(3, 4))} == {b}
    assert b.ndim == 2
    assert b.volume == 12
    assert b.ends == (4, 6)


def test_zero_d_box() -> None:
    b = full_box(())
    assert b.ndim == 0
    assert b.volume == 1
    assert not b.is_empty()
    assert b.intersect(b) == b
    assert b.contains(b)
    assert b.slices() == ()
    assert np.asarray(7.0)[b.slices()] == 7.0


@given(two_boxes())
@example((Box(offsets=(0,), sizes=(3,)), Box(offsets=(3,), sizes=(2,))))  # touching, no overlap
@example((Box(offsets=(2,), sizes=(0,)), Box(offsets=(0,), sizes=(5,))))  # empty inside a box
def test_intersect_matches_numpy_masks(pair: tuple[Box, Box]) -> None:
    a, b = pair
    shape = tuple(max(x, y) for x, y in zip(a.ends, b.ends, strict=True))
    ab, ba = a.intersect(b), b.intersect(a)
    assert ab == ba
    expected = _mask(shape, a) & _mask(shape, b)
    assert np.array_equal(_mask(shape, ab), expected)
    if ab is None:
        assert not expected.any()
    else:
        assert ab.volume == int(expected.sum()) > 0
        assert a.contains(ab)
        assert b.contains(ab)
        assert ab.intersect(a) == ab


@given(two_boxes())
def test_contains_matches_numpy_masks(pair: tuple[Box, Box]) -> None:
    a, b = pair
    shape = tuple(max(x, y) for x, y in zip(a.ends, b.ends, strict=True))
    inside = not (_mask(shape, b) & ~_mask(shape, a)).any()
    assert a.contains(b) == inside


@given(st.data(), shapes(max_dims=4))
def test_slices_and_relative_to_select_the_same_elements(
    data: st.DataObject, shape: tuple[int, ...]
) -> None:
    outer = data.draw(boxes_in(shape))
    inner = data.draw(boxes_in(outer.sizes))
    inner = Box(
        offsets=tuple(o + i for o, i in zip(outer.offsets, inner.offsets, strict=True)),
        sizes=inner.sizes,
    )
    assert outer.contains(inner)
    g = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    local = g[outer.slices()]
    assert local.shape == outer.sizes
    rel = inner.relative_to(outer)
    assert rel.sizes == inner.sizes
    assert np.array_equal(local[rel.slices()], g[inner.slices()])


# ------------------------------------------------------------------ split_box


def _split_dim(box: Box, chunks: tuple[Box, ...]) -> int | None:
    dims = [d for d in range(box.ndim) if any(c.sizes[d] != box.sizes[d] for c in chunks)]
    return max(dims) if dims else None


@given(
    st.data(),
    shapes(max_dims=4, max_side=7),
    st.sampled_from([1, 2, 4, 8, 16]),
    st.integers(1, 300),
)
@example(data=None, shape=(5, 4), itemsize=4, max_bytes=32)  # the docstring's example
@example(data=None, shape=(3, 2), itemsize=16, max_bytes=5)  # an element bigger than a chunk
@example(data=None, shape=(), itemsize=8, max_bytes=1)
@example(data=None, shape=(2, 0, 3), itemsize=4, max_bytes=1)
def test_split_box_tiles_the_box_in_row_major_runs(
    data: st.DataObject | None, shape: tuple[int, ...], itemsize: int, max_bytes: int
) -> None:
    box = full_box(shape) if data is None else data.draw(boxes_in(shape))
    chunks = split_box(box, itemsize, max_bytes)
    if box.is_empty():
        assert chunks == ()
        return
    # Disjoint, inside the box, covering every element exactly once.
    count = np.zeros(shape, dtype=np.int64)
    for c in chunks:
        assert not c.is_empty()
        assert box.contains(c)
        count[c.slices()] += 1
    assert np.array_equal(count, _mask(shape, box).astype(np.int64))
    # At most max_bytes, unless the chunk is one element that alone exceeds it.
    for c in chunks:
        assert c.volume * itemsize <= max_bytes or (c.volume == 1 and itemsize > max_bytes)
    if box.volume * itemsize <= max_bytes:
        assert chunks == (box,)
    # In order, each a contiguous run of the box's row-major order, runs abutting.
    ids = np.arange(box.volume).reshape(box.sizes)
    pos = 0
    for c in chunks:
        run = ids[c.relative_to(box).slices()].ravel()
        assert np.array_equal(run, np.arange(pos, pos + c.volume))
        pos += c.volume
    assert pos == box.volume
    # Chunks are as large as max_bytes allows: only the last chunk of each run
    # along the split dim may be smaller (no needless tiny chunks).
    d = _split_dim(box, chunks)
    if d is not None:
        inner = itemsize * math.prod(box.sizes[d + 1 :])
        step = max(1, max_bytes // inner)
        assert all(c.sizes[:d] == (1,) * d for c in chunks)
        assert all(c.sizes[d] <= step for c in chunks)
        full_runs = box.sizes[d] // step
        assert len(chunks) == math.prod(box.sizes[:d]) * (full_runs + (box.sizes[d] % step > 0))


def test_split_box_rejects_non_positive_chunk_size() -> None:
    with pytest.raises(PlanError, match="positive"):
        split_box(full_box((4,)), 4, 0)


def test_split_box_docstring_example() -> None:
    assert [b.sizes for b in split_box(full_box((5, 4)), 4, 32)] == [(2, 4), (2, 4), (1, 4)]
    assert [b.offsets for b in split_box(full_box((5, 4)), 4, 32)] == [(0, 0), (2, 0), (4, 0)]


def test_split_box_keeps_offsets_of_a_shard() -> None:
    shard = Box(offsets=(8, 2), sizes=(3, 4))
    chunks = split_box(shard, 2, 8)  # a row of 4 x 2 bytes fits exactly
    assert [c.offsets for c in chunks] == [(8, 2), (9, 2), (10, 2)]
    assert all(c.sizes == (1, 4) for c in chunks)


# ------------------------------------------------------------------ check_tiling


@given(st.data(), shapes(max_dims=4), st.integers(1, 8))
def test_check_tiling_accepts_layouts_with_exact_replicas(
    data: st.DataObject, shape: tuple[int, ...], n: int
) -> None:
    layout = data.draw(layouts(shape, n))
    check_tiling(shape, [b for held in layout for b in held], what="w")


@st.composite
def tiling_and_victim(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box], int]:
    shape = draw(shapes(min_dims=1, max_dims=3, min_side=1))
    cells = [c for c in draw(grid_tilings(shape)) if not c.is_empty()]
    return shape, cells, draw(st.integers(0, len(cells) - 1))


@given(tiling_and_victim())
def test_check_tiling_rejects_a_gap(case: tuple[tuple[int, ...], list[Box], int]) -> None:
    shape, cells, i = case
    del cells[i]
    with pytest.raises(PlanError, match=r"model\.w: .*gap"):
        check_tiling(shape, cells, what="model.w")


@given(tiling_and_victim(), st.data())
def test_check_tiling_rejects_a_partial_overlap(
    case: tuple[tuple[int, ...], list[Box], int], data: st.DataObject
) -> None:
    shape, cells, i = case
    # Grow one cell by one element along some dim where it can grow.
    c = cells[i]
    growable = [d for d in range(c.ndim) if c.ends[d] < shape[d] or c.offsets[d] > 0]
    assume(growable)
    d = data.draw(st.sampled_from(growable))
    if c.ends[d] < shape[d]:
        grown = Box(offsets=c.offsets, sizes=(*c.sizes[:d], c.sizes[d] + 1, *c.sizes[d + 1 :]))
    else:
        grown = Box(
            offsets=(*c.offsets[:d], c.offsets[d] - 1, *c.offsets[d + 1 :]),
            sizes=(*c.sizes[:d], c.sizes[d] + 1, *c.sizes[d + 1 :]),
        )
    cells[i] = grown
    with pytest.raises(PlanError, match=r"model\.w: shards .* overlap without being replicas"):
        check_tiling(shape, cells, what="model.w")


@given(tiling_and_victim(), st.data())
def test_check_tiling_rejects_an_overlap_that_keeps_the_count(
    case: tuple[tuple[int, ...], list[Box], int], data: st.DataObject
) -> None:
    """A shifted shard overlaps a neighbour and leaves a gap: element counts alone would pass."""
    shape, cells, i = case
    c = cells[i]
    movable = [d for d in range(c.ndim) if c.sizes[d] < shape[d]]
    assume(movable)
    d = data.draw(st.sampled_from(movable))
    step = 1 if c.ends[d] < shape[d] else -1
    shifted = Box(offsets=(*c.offsets[:d], c.offsets[d] + step, *c.offsets[d + 1 :]), sizes=c.sizes)
    assume(shifted not in cells)
    cells[i] = shifted
    assert sum(b.volume for b in cells) == math.prod(shape)
    with pytest.raises(PlanError, match=r"model\.w: shards .* overlap without being replicas"):
        check_tiling(shape, cells, what="model.w")


def test_check_tiling_rejects_out_of_bounds_and_wrong_rank() -> None:
    with pytest.raises(PlanError, match=r"emb: shard \[offsets \[2\], sizes \[3\]\] lies outside"):
        check_tiling(
            (4,), [Box(offsets=(0,), sizes=(2,)), Box(offsets=(2,), sizes=(3,))], what="emb"
        )
    with pytest.raises(PlanError, match=r"emb: .* outside"):
        check_tiling((4,), [Box(offsets=(0, 0), sizes=(4, 1))], what="emb")


def test_check_tiling_edge_cases() -> None:
    check_tiling((), [full_box(())], what="s")
    check_tiling((), [full_box(()), full_box(())], what="s")  # replicated scalar
    with pytest.raises(PlanError, match="s: scalar tensor has no stored shard"):
        check_tiling((), [], what="s")
    check_tiling((0, 3), [], what="e")  # nothing to cover
    check_tiling((0, 3), [Box(offsets=(0, 0), sizes=(0, 3))], what="e")
    with pytest.raises(PlanError, match=r"e: .*cover 0 of 6"):
        check_tiling((2, 3), [Box(offsets=(2, 0), sizes=(0, 3))], what="e")
    # Overlap found even when the boxes are far apart in sort order along the swept dim.
    overlapping = [
        Box(offsets=(0, 0), sizes=(4, 1)),
        Box(offsets=(1, 0), sizes=(1, 1)),
        Box(offsets=(2, 0), sizes=(1, 1)),
        Box(offsets=(3, 0), sizes=(1, 1)),
    ]
    with pytest.raises(PlanError, match="overlap"):
        check_tiling((4, 1), overlapping, what="o")

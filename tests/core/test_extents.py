"""The writers' map: which chunk indexes a loading rank's boxes need (pure, no files)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from treeckpt.core.box import Box
from treeckpt.core.extents import Extents, Layout, extents_of_plan, select_writers, writers_of
from treeckpt.core.plan import plan_save
from treeckpt.core.specs import ShardSpec


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    per = -(-n // world)
    lo = min(n, rank * per)
    return lo, min(n, lo + per) - lo


def _shard(fqn: str, shape: tuple[int, ...], dim: int, rank: int, world: int) -> ShardSpec:
    lo, n = _rows(shape[dim], rank, world)
    offs = [0] * len(shape)
    sizes = list(shape)
    offs[dim], sizes[dim] = lo, n
    box = Box(offsets=tuple(offs), sizes=tuple(sizes))
    return ShardSpec(fqn=fqn, dtype="float32", shape=shape, boxes=(box,))


def _specs(world: int) -> list[list[ShardSpec]]:
    """Shard(0) (uneven, empty shards), Shard(1), a 2-d mesh, a replica, a 0-d tensor."""
    out = []
    for r in range(world):
        s = [
            _shard("a", (7, 5), 0, r, world),
            _shard("a2", (7, 9), 0, r, world),  # same cut as "a": shares its layout
            _shard("b", (4, 9), 1, r, world),
            _shard("c", (3,), 0, r, world),
            ShardSpec(
                fqn="d", dtype="float32", shape=(6, 6), boxes=(Box(offsets=(0, 0), sizes=(6, 6)),)
            ),
            ShardSpec(fqn="s", dtype="float32", shape=(), boxes=(Box(offsets=(), sizes=()),)),
        ]
        lo0, n0 = _rows(8, r // 2, max(1, world // 2))
        lo1, n1 = _rows(6, r % 2, 2)
        if world % 2 == 0:
            s.append(
                ShardSpec(
                    fqn="m",
                    dtype="float32",
                    shape=(8, 6),
                    boxes=(Box(offsets=(lo0, lo1), sizes=(n0, n1)),),
                )
            )
        out.append(s)
    return out


def _brute(plan, requests: list[ShardSpec]) -> frozenset[int]:  # type: ignore[no-untyped-def]
    """Writers owning a chunk that intersects a requested box, by plain box intersection."""
    got = set()
    for rank in range(plan.world):
        for item in plan.items_for(rank):
            for spec in requests:
                if spec.fqn != item.fqn:
                    continue
                for box in spec.boxes:
                    if not box.is_empty() and item.chunk.intersect(box) is not None:
                        got.add(rank)
    return frozenset(got)


@pytest.mark.parametrize("save_world", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("load_world", [1, 2, 3, 4, 5])
def test_selection_is_exactly_the_writers_whose_chunks_intersect(
    save_world: int, load_world: int
) -> None:
    plan = plan_save(_specs(save_world), chunk_bytes=24)  # small chunks: boxes are split
    ext = extents_of_plan(plan)
    for rank in range(load_world):
        requests = [
            _shard("a", (7, 5), 1, rank, load_world),  # resharded along the other dim
            _shard("a2", (7, 9), 0, rank, load_world),
            _shard("b", (4, 9), 0, rank, load_world),
            _shard("c", (3,), 0, rank, load_world),
            _shard("d", (6, 6), 0, rank, load_world),
            ShardSpec(fqn="s", dtype="float32", shape=(), boxes=(Box(offsets=(), sizes=()),)),
        ]
        if save_world % 2 == 0:
            requests.append(_shard("m", (8, 6), 1, rank, load_world))
        assert select_writers(ext, requests) == _brute(plan, requests), (rank, load_world)


def test_random_boxes_select_exactly() -> None:
    rng = random.Random(5)
    plan = plan_save(_specs(4), chunk_bytes=40)
    ext = extents_of_plan(plan)
    shapes = {"a": (7, 5), "a2": (7, 9), "b": (4, 9), "c": (3,), "d": (6, 6), "m": (8, 6)}
    for _ in range(300):
        fqn = rng.choice(list(shapes))
        shape = shapes[fqn]
        offs = tuple(rng.randrange(d) for d in shape)
        sizes = tuple(rng.randrange(0, d - o + 1) for o, d in zip(offs, shape, strict=True))
        spec = ShardSpec(
            fqn=fqn, dtype="float32", shape=shape, boxes=(Box(offsets=offs, sizes=sizes),)
        )
        assert select_writers(ext, [spec]) == _brute(plan, [spec])


def test_layouts_are_shared() -> None:
    ext = extents_of_plan(plan_save(_specs(4), chunk_bytes=1 << 20))
    assert ext.tensors["a"] == ext.tensors["a2"]  # same rows cut, different widths
    assert ext.tensors["a"] != ext.tensors["b"]
    lay = ext.layouts[ext.tensors["a"]]
    assert lay.whole == (False, True)
    assert lay.ranks.tolist() == [0, 1, 2, 3]
    assert lay.offsets[:, 0].tolist() == [0, 2, 4, 6]
    assert lay.sizes[:, 0].tolist() == [2, 2, 2, 1]
    # the replicated tensor is written once: one writer, the whole box
    d = ext.layouts[ext.tensors["d"]]
    assert len(d.ranks) == 1 and d.whole == (True, True)
    assert ext.ranks == frozenset({0, 1, 2, 3})


def test_no_writer_for_unknown_or_empty_requests() -> None:
    ext = extents_of_plan(plan_save(_specs(2), chunk_bytes=1 << 20))
    empty = Box(offsets=(3, 0), sizes=(0, 5))
    assert (
        writers_of(ext, ShardSpec(fqn="a", dtype="float32", shape=(7, 5), boxes=(empty,))).size == 0
    )
    assert writers_of(ext, ShardSpec(fqn="zz", dtype="float32", shape=(1,), boxes=())).size == 0
    assert select_writers(ext, []) == frozenset()


def test_extents_compare_by_value() -> None:
    a = extents_of_plan(plan_save(_specs(3), chunk_bytes=64))
    b = extents_of_plan(plan_save(_specs(3), chunk_bytes=64))
    c = extents_of_plan(plan_save(_specs(2), chunk_bytes=64))
    assert a == b and a != c
    assert Extents(layouts=(), tensors={}) == extents_of_plan(plan_save([[]], chunk_bytes=64))
    assert isinstance(a.layouts[0].ranks, np.ndarray)


def _same_columns(a: Layout, b: Layout) -> bool:
    return a.whole == b.whole and all(
        x.dtype == y.dtype and x.shape == y.shape and x.flags.c_contiguous and np.array_equal(x, y)
        for x, y in ((a.ranks, b.ranks), (a.offsets, b.offsets), (a.sizes, b.sizes))
    )


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6])
def test_extents_pickle_to_the_same_columns(world: int) -> None:
    ext = extents_of_plan(plan_save(_specs(world), chunk_bytes=40))
    back = pickle.loads(pickle.dumps(ext, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == ext
    assert all(_same_columns(a, b) for a, b in zip(back.layouts, ext.layouts, strict=True))


def test_wide_and_irregular_layouts_pickle_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    big = Layout.of(
        np.asarray([5, 0, 2], dtype=np.int64),
        np.asarray([[1 << 40, 0], [0, 7], [3, (1 << 62) - 9]], dtype=np.int64),
        np.asarray([[1, 1 << 33], [9, 1], [1 << 41, 8]], dtype=np.int64),
        (False, True, False),
    )
    assert big.offsets.dtype == np.int64
    small = Layout.of(
        rng.integers(0, 1 << 20, 50),
        rng.integers(0, 1 << 30, (50, 1)),
        rng.integers(1, 1 << 30, (50, 1)),
        (True, False),
    )
    empty = Layout.of(
        np.zeros(0, np.int64), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64), ()
    )
    for lay in (big, small, empty):
        back = pickle.loads(pickle.dumps(lay))
        assert _same_columns(back, lay)


def test_a_regular_layout_pickles_small() -> None:
    """4096 writers of a Shard(0) tensor: a few hundred bytes, not 12 per writer."""
    n = 4096
    lay = Layout.of(np.arange(n), (np.arange(n) * 3)[:, None], np.full((n, 1), 3), (False, True))
    assert len(pickle.dumps(lay, protocol=pickle.HIGHEST_PROTOCOL)) < 600

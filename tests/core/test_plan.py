"""core/plan.py: plan_save and plan_load, property-tested through a simulated save and load.

The resharding test is the real one: a global array per tensor is cut into the
chunks plan_save assigns (each rank copying from its own shard), written to
fake data files, and reassembled by plan_load's read items into the shards of
a different world size, which must equal numpy slices of the global array.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from treeckpt.core.box import Box, full_box, split_box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.manifest import ChunkRef
from treeckpt.core.plan import LoadPlan, SavePlan, StoredTensor, WriteItem, plan_load, plan_save
from treeckpt.core.specs import ShardSpec, full_spec
from treeckpt.errors import PlanError
from treeckpt.testing.strategies import (
    Layout,
    layouts,
    replicated_layouts,
    shapes,
    shard_specs,
    tilings,
)

SpecsByRank = list[list[ShardSpec]]


@dataclass(frozen=True)
class SaveCase:
    specs: SpecsByRank
    chunk_bytes: int


@st.composite
def save_cases(draw: st.DrawFn, max_ranks: int = 16) -> SaveCase:
    n = draw(st.integers(1, max_ranks))
    # Half the tensors have 2-3 dims, so grid cuts along two dims are common.
    shape = st.one_of(shapes(), shapes(min_dims=2, max_dims=3, min_side=1))
    specs = draw(shard_specs(n, max_tensors=3, shape=shape))
    chunk_bytes = draw(st.one_of(st.integers(1, 64), st.integers(65, 4096)))
    return SaveCase(specs=specs, chunk_bytes=chunk_bytes)


@dataclass(frozen=True)
class TensorMeta:
    fqn: str
    dtype: str
    shape: tuple[int, ...]


def _plan_tensors(plan: SavePlan) -> tuple[TensorMeta, ...]:
    """The plan's tensor table, one object per tensor."""
    t = plan.tensors
    return tuple(
        TensorMeta(fqn=f, dtype=d, shape=s)
        for f, d, s in zip(t.fqns, t.dtypes, t.shapes, strict=True)
    )


def _rank_items(plan: SavePlan) -> tuple[tuple[WriteItem, ...], ...]:
    """Every rank's view of the plan: its write items."""
    return tuple(plan.items_for(r) for r in range(plan.world))


def _metas(specs: SpecsByRank) -> dict[str, TensorMeta]:
    out: dict[str, TensorMeta] = {}
    for rank_specs in specs:
        for s in rank_specs:
            out.setdefault(s.fqn, TensorMeta(fqn=s.fqn, dtype=s.dtype, shape=s.shape))
    return out


def _holders(specs: SpecsByRank) -> dict[str, dict[Box, set[int]]]:
    out: dict[str, dict[Box, set[int]]] = {}
    for rank, rank_specs in enumerate(specs):
        for s in rank_specs:
            for b in s.boxes:
                out.setdefault(s.fqn, {}).setdefault(b, set()).add(rank)
    return out


def _element_bytes(meta: TensorMeta, salt: int) -> np.ndarray:
    """A global tensor as raw bytes (shape + (itemsize,)); every element's bytes differ."""
    itemsize = dtype_info(meta.dtype).itemsize
    n = math.prod(meta.shape)
    ids = (np.arange(n, dtype="<u8") + np.uint64(salt) * np.uint64(1_000_003)).view(np.uint8)
    ids = ids.reshape(n, 8)
    wide = np.concatenate([ids, ids ^ 0xA5], axis=1)[:, :itemsize]
    return np.ascontiguousarray(wide.reshape((*meta.shape, itemsize)))


@dataclass
class Written:
    """What a simulated save leaves behind: stored tensors, data files and the source arrays."""

    stored: dict[str, StoredTensor]
    files: dict[str, bytes]
    data: dict[str, np.ndarray]


def simulate_save(plan: SavePlan) -> Written:
    """Every rank copies its chunks out of its own shard into its own data file."""
    tensors = _plan_tensors(plan)
    data = {t.fqn: _element_bytes(t, i) for i, t in enumerate(tensors)}
    refs: dict[str, list[ChunkRef]] = {t.fqn: [] for t in tensors}
    files: dict[str, bytes] = {}
    for rank, items in enumerate(_rank_items(plan)):
        name = f"{rank:05d}.data"
        buf = bytearray()
        for it in items:
            local = data[it.fqn][it.shard.slices()]  # all the rank has of this tensor
            raw = np.ascontiguousarray(local[it.chunk.relative_to(it.shard).slices()]).tobytes()
            assert len(raw) == it.nbytes
            refs[it.fqn].append(
                ChunkRef(
                    fqn=it.fqn,
                    box=it.chunk,
                    file=name,
                    offset=len(buf),
                    length=len(raw),
                    codec="raw",
                    raw_length=len(raw),
                    checksum="",
                )
            )
            buf += raw
        if buf:
            files[name] = bytes(buf)
    stored = {
        t.fqn: StoredTensor(fqn=t.fqn, dtype=t.dtype, shape=t.shape, chunks=tuple(refs[t.fqn]))
        for t in tensors
    }
    return Written(stored=stored, files=files, data=data)


def execute_load(
    plan: LoadPlan, requests: Sequence[ShardSpec], files: dict[str, bytes]
) -> dict[tuple[str, Box], tuple[np.ndarray, np.ndarray]]:
    """Run the read items: (fqn, box) -> (bytes filled in, how often each element was written)."""
    out: dict[tuple[str, Box], tuple[np.ndarray, np.ndarray]] = {}
    for req in requests:
        itemsize = dtype_info(req.dtype).itemsize
        for box in req.boxes:
            dst = np.full((*box.sizes, itemsize), 0xEE, dtype=np.uint8)
            out[(req.fqn, box)] = (dst, np.zeros(box.sizes, dtype=np.int64))
    for item in plan.items:
        ref = item.chunk
        dst, count = out[(item.fqn, item.request)]
        raw = files[ref.file][ref.offset : ref.offset + ref.length]
        chunk = np.frombuffer(raw, dtype=np.uint8).reshape((*ref.box.sizes, dst.shape[-1]))
        assert item.src.sizes == item.dst.sizes
        assert full_box(ref.box.sizes).contains(item.src)
        assert full_box(item.request.sizes).contains(item.dst)
        dst[item.dst.slices()] = chunk[item.src.slices()]
        count[item.dst.slices()] += 1
    return out


# ------------------------------------------------------------------ plan_save


def check_save_plan(specs: SpecsByRank, chunk_bytes: int, plan: SavePlan) -> None:
    metas = _metas(specs)
    holders = _holders(specs)
    assert {t.fqn: t for t in _plan_tensors(plan)} == metas
    by_rank = _rank_items(plan)
    assert len(by_rank) == plan.world == len(specs)
    for rank, items in enumerate(by_rank):
        view = plan.for_rank(rank)  # what the coordinator sends the rank: its items only
        assert view.items_for(rank) == items
        assert view.chunks_by_rank == tuple(
            len(items) if r == rank else 0 for r in range(plan.world)
        )
    counts = {fqn: np.zeros(m.shape, dtype=np.int64) for fqn, m in metas.items()}
    for rank, items in enumerate(by_rank):
        for it in items:
            meta = metas[it.fqn]
            assert it.rank == rank
            assert it.dtype == meta.dtype
            assert rank in holders[it.fqn][it.shard], "a rank writes a box it does not hold"
            assert it.shard.contains(it.chunk)
            assert not it.chunk.is_empty()
            itemsize = dtype_info(meta.dtype).itemsize
            assert it.nbytes == it.chunk.volume * itemsize
            assert it.nbytes <= chunk_bytes or it.chunk.volume == 1
            counts[it.fqn][it.chunk.slices()] += 1
    for fqn, count in counts.items():
        assert (count == 1).all(), f"{fqn}: some element written {count.max()} or 0 times"
    assert plan.bytes_by_rank == tuple(sum(i.nbytes for i in items) for items in by_rank)
    assert sum(plan.bytes_by_rank) == sum(
        math.prod(m.shape) * dtype_info(m.dtype).itemsize for m in metas.values()
    )
    assert plan.chunks_by_rank == tuple(len(items) for items in by_rank)


@given(save_cases())
@example(SaveCase(specs=[[full_spec("x", "float32", (3, 5))]] * 2, chunk_bytes=8))
@example(SaveCase(specs=[[full_spec("s", "complex128", ())]] * 3, chunk_bytes=1))
def test_plan_save_writes_every_element_once(case: SaveCase) -> None:
    plan = plan_save(case.specs, chunk_bytes=case.chunk_bytes)
    check_save_plan(case.specs, case.chunk_bytes, plan)


@given(save_cases())
def test_plan_save_is_deterministic(case: SaveCase) -> None:
    a = plan_save(case.specs, chunk_bytes=case.chunk_bytes)
    b = plan_save(copy.deepcopy(case.specs), chunk_bytes=case.chunk_bytes)
    assert a == b
    assert a.report() == b.report()
    if a.world > 1 and a.chunks_by_rank[0]:
        assert a != a.for_rank(1)  # equality compares the columns


@st.composite
def replica_group_cases(draw: st.DrawFn) -> tuple[SpecsByRank, int]:
    n = draw(st.integers(2, 16))
    replicas = draw(st.sampled_from([d for d in range(2, n + 1) if n % d == 0]))

    def layout(shape: tuple[int, ...], n_ranks: int) -> st.SearchStrategy[Layout]:
        return replicated_layouts(shape, n_ranks, replicas=replicas)

    specs = draw(shard_specs(n, min_tensors=1, max_tensors=8, layout=layout))
    return specs, replicas


@given(replica_group_cases())
@example(([[full_spec(f"p{i}", "float32", (4,)) for i in range(6)] for _ in range(4)], 4))
def test_plan_save_balances_replicas_across_their_holders(case: tuple[SpecsByRank, int]) -> None:
    """HSDP/DDP: rank k holds shard k % s. Replicated boxes go to one holder each, and within
    each replica group the bytes written differ by at most the largest replicated box."""
    specs, replicas = case
    n = len(specs)
    s = n // replicas
    plan = plan_save(specs, chunk_bytes=1 << 20)
    check_save_plan(specs, 1 << 20, plan)
    metas = _metas(specs)
    written = plan.bytes_by_rank
    for j in range(s):
        group = list(range(j, n, s))
        largest = max(
            (
                b.volume * dtype_info(metas[fqn].dtype).itemsize
                for fqn, by_box in _holders(specs).items()
                for b, ranks in by_box.items()
                if ranks == set(group)
            ),
            default=0,
        )
        loads = [written[r] for r in group]
        assert max(loads) - min(loads) <= largest, (group, loads, largest)


def test_plan_save_ddp_spreads_tensors_largest_first() -> None:
    sizes = [8, 7, 6, 5, 4, 3, 2, 1]
    specs = [[full_spec(f"w{i}", "int8", (sz,)) for i, sz in enumerate(sizes)] for _ in range(3)]
    plan = plan_save(specs, chunk_bytes=1024)
    owner = {it.fqn: r for r, items in enumerate(_rank_items(plan)) for it in items}
    # Greedy on the least-loaded rank, largest first, ties to the lowest rank.
    assert owner == {"w0": 0, "w1": 1, "w2": 2, "w3": 2, "w4": 1, "w5": 0, "w6": 0, "w7": 1}
    assert plan.bytes_by_rank == (13, 12, 11)
    # Within a rank, items follow tree order (the order tensors were first described).
    assert [it.fqn for it in plan.items_for(0)] == ["w0", "w5", "w6"]


def test_plan_save_exclusive_loads_steer_replicas() -> None:
    """A rank already writing a big exclusive shard gets no replicated tensor."""
    big = [
        ShardSpec(
            fqn="emb", dtype="float32", shape=(100,), boxes=(Box(offsets=(0,), sizes=(100,)),)
        )
    ]
    rest = [ShardSpec(fqn="emb", dtype="float32", shape=(100,), boxes=())]
    specs = [[*big, full_spec("b", "float32", (10,))], [*rest, full_spec("b", "float32", (10,))]]
    plan = plan_save(specs, chunk_bytes=1 << 20)
    assert [it.fqn for it in plan.items_for(1)] == ["b"]


def test_plan_save_empty_world_and_empty_tensors() -> None:
    empty_plan = plan_save([], chunk_bytes=8)
    assert (empty_plan.world, _plan_tensors(empty_plan), _rank_items(empty_plan)) == (0, (), ())
    empty = ShardSpec(
        fqn="e", dtype="int8", shape=(0, 4), boxes=(Box(offsets=(0, 0), sizes=(0, 4)),)
    )
    plan = plan_save([[empty], [empty]], chunk_bytes=8)
    assert _plan_tensors(plan) == (TensorMeta(fqn="e", dtype="int8", shape=(0, 4)),)
    assert _rank_items(plan) == ((), ())


@given(save_cases(max_ranks=8), st.data())
def test_plan_save_names_both_ranks_when_they_disagree(case: SaveCase, data: st.DataObject) -> None:
    specs = [list(s) for s in case.specs]
    placed = [(r, i) for r, rank_specs in enumerate(specs) for i in range(len(rank_specs))]
    others = {r for r, _ in placed}
    if len(others) < 2:
        return
    r, i = data.draw(st.sampled_from(placed))
    spec = specs[r][i]
    if data.draw(st.booleans()):
        bad = replace(spec, dtype="uint8" if spec.dtype != "uint8" else "int8")
    else:
        bad = replace(spec, shape=(*spec.shape, 1), boxes=())
    specs[r][i] = bad
    describers = [
        q for q, rank_specs in enumerate(specs) if any(s.fqn == spec.fqn for s in rank_specs)
    ]
    if len(describers) < 2:
        return
    first = describers[0]
    second = describers[1] if first == r else r
    with pytest.raises(PlanError) as info:
        plan_save(specs, chunk_bytes=case.chunk_bytes)
    msg = str(info.value)
    assert msg.startswith(f"{spec.fqn}: rank {first} has dtype ")
    assert f"rank {second} has dtype " in msg


@given(save_cases(max_ranks=8), st.data())
def test_plan_save_rejects_a_layout_with_a_hole(case: SaveCase, data: st.DataObject) -> None:
    """Every holder of one non-empty box forgets it: the FQN is named, and nothing is planned."""
    holders = _holders(case.specs)
    boxes = sorted(
        ((fqn, b) for fqn, by_box in holders.items() for b in by_box if not b.is_empty()),
        key=lambda fb: (fb[0], fb[1].offsets, fb[1].sizes),
    )
    assume(boxes)
    fqn, gone = data.draw(st.sampled_from(boxes))
    specs = [
        [
            replace(s, boxes=tuple(b for b in s.boxes if b != gone)) if s.fqn == fqn else s
            for s in rank_specs
        ]
        for rank_specs in case.specs
    ]
    with pytest.raises(PlanError, match=rf"^{fqn}: .*(gap|no stored shard)"):
        plan_save(specs, chunk_bytes=case.chunk_bytes)


def test_plan_save_disagreement_message() -> None:
    a = full_spec("m.w", "float32", (4, 4))
    specs = [[a], [a], [full_spec("m.w", "bfloat16", (4, 4))]]
    with pytest.raises(
        PlanError,
        match=r"m\.w: rank 0 has dtype float32 shape \[4, 4\] but rank 2 has dtype bfloat16 shape \[4, 4\]",
    ):
        plan_save(specs, chunk_bytes=64)


def test_plan_save_rejects_a_tensor_described_twice_by_one_rank() -> None:
    a = full_spec("m.w", "float32", (4,))
    with pytest.raises(PlanError, match=r"m\.w: rank 1 describes the tensor twice"):
        plan_save([[a], [a, a]], chunk_bytes=64)


def test_plan_save_rejects_boxes_of_the_wrong_rank() -> None:
    spec = ShardSpec(
        fqn="m.w", dtype="float32", shape=(4,), boxes=(Box(offsets=(0, 0), sizes=(4, 1)),)
    )
    with pytest.raises(PlanError, match=r"m\.w: rank 0 gives a 2-d box for a 1-d tensor"):
        plan_save([[spec]], chunk_bytes=64)


def test_plan_save_rejects_layouts_that_do_not_tile() -> None:
    def half(lo: int) -> ShardSpec:
        return ShardSpec(
            fqn="m.w", dtype="float32", shape=(8,), boxes=(Box(offsets=(lo,), sizes=(4,)),)
        )

    with pytest.raises(PlanError, match=r"m\.w: .*gap"):
        plan_save([[half(0)], [half(0)]], chunk_bytes=64)
    with pytest.raises(PlanError, match=r"m\.w: .*overlap"):
        plan_save([[half(0)], [half(4)], [half(2)]], chunk_bytes=64)


@given(st.integers(1, 8), st.integers(1, 100))
def test_plan_save_report_mentions_every_rank(n: int, chunk_bytes: int) -> None:
    specs = [[full_spec("w", "float32", (10,))] for _ in range(n)]
    report = plan_save(specs, chunk_bytes=chunk_bytes).report()
    assert report.startswith(f"save plan: 1 tensors, 40 B raw, {n} ranks")
    assert all(f"rank {r}:" in report for r in range(n))


def test_plan_save_scale_smoke() -> None:
    """256 ranks x 200 FSDP-sharded tensors plans in one process (not timed strictly)."""
    world, tensors = 256, 200
    names = [f"layers.{t}.weight" for t in range(tensors)]
    shards = [(Box(offsets=(r * 16, 0), sizes=(16, 1024)),) for r in range(world)]
    specs = [
        [ShardSpec(fqn=n, dtype="bfloat16", shape=(4096, 1024), boxes=b) for n in names]
        for b in shards
    ]
    start = time.perf_counter()
    plan = plan_save(specs, chunk_bytes=16 << 20)
    elapsed = time.perf_counter() - start
    assert plan.chunks_by_rank == (tensors,) * world
    assert len(set(plan.bytes_by_rank)) == 1
    assert elapsed < 60, f"planning took {elapsed:.1f} s"


# ------------------------------------------------------------------ plan_load


@st.composite
def reshard_cases(draw: st.DrawFn) -> tuple[SaveCase, list[list[ShardSpec]]]:
    """A save on n ranks, and the requests of every rank of a load on m ranks."""
    case = draw(save_cases())
    metas = list(_metas(case.specs).values())
    m = draw(st.integers(1, 16))
    requests: list[list[ShardSpec]] = [[] for _ in range(m)]
    for meta in metas:
        layout = draw(layouts(meta.shape, m))
        for r, bxs in enumerate(layout):
            if bxs:
                requests[r].append(
                    ShardSpec(fqn=meta.fqn, dtype=meta.dtype, shape=meta.shape, boxes=bxs)
                )
    return case, requests


@given(reshard_cases())
@example(
    (
        SaveCase(specs=[[full_spec("w", "float32", (5, 3))]], chunk_bytes=8),
        [
            [
                ShardSpec(
                    fqn="w",
                    dtype="float32",
                    shape=(5, 3),
                    boxes=(Box(offsets=(0, 1), sizes=(5, 2)),),
                )
            ],
            [
                ShardSpec(
                    fqn="w",
                    dtype="float32",
                    shape=(5, 3),
                    boxes=(Box(offsets=(0, 0), sizes=(5, 1)),),
                )
            ],
        ],
    )
)
def test_reshard_reproduces_the_global_tensor(case: tuple[SaveCase, list[list[ShardSpec]]]) -> None:
    save, requests = case
    saved = simulate_save(plan_save(save.specs, chunk_bytes=save.chunk_bytes))
    for rank_requests in requests:
        plan = plan_load(saved.stored, rank_requests)
        filled = execute_load(plan, rank_requests, saved.files)
        needed = 0
        for req in rank_requests:
            itemsize = dtype_info(req.dtype).itemsize
            for box in req.boxes:
                got, count = filled[(req.fqn, box)]
                assert (count == 1).all(), (
                    f"{req.fqn} {box}: elements read {count.max()} or 0 times"
                )
                assert np.array_equal(got, saved.data[req.fqn][box.slices()])
                needed += box.volume * itemsize
        assert plan.needed_bytes == needed
        chunks = plan.chunks
        assert len({(c.file, c.offset) for c in chunks}) == len(chunks)
        assert plan.read_raw_bytes == sum(c.raw_length for c in chunks)
        assert plan.read_stored_bytes == sum(c.length for c in chunks)
        assert plan.files == tuple(sorted({c.file for c in chunks}))
        assert plan.read_amplification >= 1.0
        assert plan.report().startswith(f"load plan: {len(plan.items)} read items")


@given(save_cases())
def test_loading_whole_tensors_reads_each_chunk_once(case: SaveCase) -> None:
    saved = simulate_save(plan_save(case.specs, chunk_bytes=case.chunk_bytes))
    requests = [full_spec(st_.fqn, st_.dtype, st_.shape) for st_ in saved.stored.values()]
    plan = plan_load(saved.stored, requests)
    filled = execute_load(plan, requests, saved.files)
    for req in requests:
        got, count = filled[(req.fqn, full_box(req.shape))]
        assert (count == 1).all()
        assert np.array_equal(got, saved.data[req.fqn])
    assert plan.read_amplification == 1.0
    assert plan.read_raw_bytes == plan.needed_bytes == sum(len(f) for f in saved.files.values())
    assert len(plan.items) == sum(len(s.chunks) for s in saved.stored.values())


def test_read_amplification_counts_whole_chunks() -> None:
    saved = simulate_save(plan_save([[full_spec("w", "int8", (10, 10))]], chunk_bytes=50))
    # Two chunks of 5 rows; one element of each costs both chunks.
    req = ShardSpec(
        fqn="w", dtype="int8", shape=(10, 10), boxes=(Box(offsets=(4, 3), sizes=(2, 1)),)
    )
    plan = plan_load(saved.stored, [req])
    assert plan.needed_bytes == 2
    assert plan.read_raw_bytes == 100
    assert plan.read_amplification == 50.0
    assert len(plan.items) == 2
    assert plan.files == ("00000.data",)
    empty = plan_load(saved.stored, [])
    assert empty.items == () and empty.read_amplification == 1.0


@st.composite
def stored_and_victim(draw: st.DrawFn) -> tuple[dict[str, StoredTensor], str, int]:
    case = draw(save_cases(max_ranks=6))
    stored = simulate_save(plan_save(case.specs, chunk_bytes=case.chunk_bytes)).stored
    with_chunks = sorted(fqn for fqn, s in stored.items() if s.chunks)
    if not with_chunks:
        stored = simulate_save(
            plan_save([[full_spec("layers.0.w", "int8", (3,))]], chunk_bytes=1)
        ).stored
        with_chunks = ["layers.0.w"]
    fqn = draw(st.sampled_from(with_chunks))
    return stored, fqn, draw(st.integers(0, len(stored[fqn].chunks) - 1))


def _full_requests(stored: dict[str, StoredTensor]) -> list[ShardSpec]:
    return [full_spec(s.fqn, s.dtype, s.shape) for s in stored.values()]


@given(stored_and_victim())
def test_plan_load_rejects_a_missing_chunk(case: tuple[dict[str, StoredTensor], str, int]) -> None:
    stored, fqn, i = case
    chunks = list(stored[fqn].chunks)
    del chunks[i]
    stored[fqn] = replace(stored[fqn], chunks=tuple(chunks))
    with pytest.raises(PlanError, match=rf"^{fqn}: "):
        plan_load(stored, _full_requests(stored))


@given(stored_and_victim())
def test_plan_load_rejects_a_duplicate_chunk(
    case: tuple[dict[str, StoredTensor], str, int],
) -> None:
    stored, fqn, i = case
    chunks = stored[fqn].chunks
    twin = replace(chunks[i], offset=chunks[i].offset + 10**6)  # same box, other bytes
    stored[fqn] = replace(stored[fqn], chunks=(*chunks, twin))
    with pytest.raises(PlanError, match=rf"^{fqn}: the checkpoint stores the same chunk twice"):
        plan_load(stored, _full_requests(stored))


@given(stored_and_victim())
def test_plan_load_rejects_overlapping_chunks(
    case: tuple[dict[str, StoredTensor], str, int],
) -> None:
    stored, fqn, i = case
    chunks = list(stored[fqn].chunks)
    c = chunks[i]
    shape = stored[fqn].shape
    if c.box.volume == math.prod(shape):
        return  # the only chunk: nothing to overlap
    chunks[i] = replace(c, box=full_box(shape))
    stored[fqn] = replace(stored[fqn], chunks=tuple(chunks))
    with pytest.raises(PlanError, match=rf"^{fqn}: shards .* overlap"):
        plan_load(stored, _full_requests(stored))


def _shifts(box: Box, shape: tuple[int, ...]) -> list[Box]:
    """The box moved by one element along each dim, where it stays inside ``shape``."""
    out = []
    for d in range(len(shape)):
        for step in (-1, 1):
            lo = box.offsets[d] + step
            if lo >= 0 and lo + box.sizes[d] <= shape[d]:
                out.append(
                    Box(offsets=(*box.offsets[:d], lo, *box.offsets[d + 1 :]), sizes=box.sizes)
                )
    return out


@given(save_cases(max_ranks=6), st.data())
def test_plan_load_rejects_a_shifted_chunk(case: SaveCase, data: st.DataObject) -> None:
    """A chunk moved by one element overlaps a neighbour and leaves a gap: the element
    count of a full request still matches, so only the overlap check can catch it."""
    stored = simulate_save(plan_save(case.specs, chunk_bytes=case.chunk_bytes)).stored
    taken = {fqn: {c.box for c in st_.chunks} for fqn, st_ in stored.items()}
    candidates = [
        (fqn, i, moved)
        for fqn, st_ in sorted(stored.items())
        for i, c in enumerate(st_.chunks)
        for moved in _shifts(c.box, st_.shape)
        if moved not in taken[fqn]
    ]
    if not candidates:  # e.g. only whole-tensor or single-element chunks
        stored = simulate_save(plan_save([[full_spec("w", "int8", (4,))]], chunk_bytes=2)).stored
        candidates = [("w", 0, Box(offsets=(1,), sizes=(2,)))]
    fqn, i, moved = data.draw(st.sampled_from(candidates))
    chunks = list(stored[fqn].chunks)
    chunks[i] = replace(chunks[i], box=moved)
    stored[fqn] = replace(stored[fqn], chunks=tuple(chunks))
    with pytest.raises(PlanError, match=rf"^{fqn}: shards .* overlap without being replicas"):
        plan_load(stored, [full_spec(fqn, stored[fqn].dtype, stored[fqn].shape)])


def test_plan_load_checks_only_what_it_reads() -> None:
    """Coverage is checked per request: a rank is not refused for chunks it never touches."""
    saved = simulate_save(plan_save([[full_spec("w", "int8", (10, 4))]], chunk_bytes=8))
    assert len(saved.stored["w"].chunks) == 5
    holed = {"w": replace(saved.stored["w"], chunks=saved.stored["w"].chunks[1:])}
    top = ShardSpec(
        fqn="w", dtype="int8", shape=(10, 4), boxes=(Box(offsets=(0, 0), sizes=(2, 4)),)
    )
    rest = ShardSpec(
        fqn="w", dtype="int8", shape=(10, 4), boxes=(Box(offsets=(2, 0), sizes=(8, 4)),)
    )
    filled = execute_load(plan_load(holed, [rest]), [rest], saved.files)
    assert np.array_equal(filled[("w", rest.boxes[0])][0], saved.data["w"][2:])
    with pytest.raises(
        PlanError,
        match=r"^w: stored chunks cover 0 of the 8 elements of the requested region offsets \[0, 0\] sizes \[2, 4\]",
    ):
        plan_load(holed, [top])


def test_plan_load_rejects_nested_chunks() -> None:
    """Two different stored chunks giving the same part of a request are not replicas."""

    def ref(lo: int, size: int) -> ChunkRef:
        return ChunkRef(
            fqn="w",
            box=Box(offsets=(lo,), sizes=(size,)),
            file="f",
            offset=lo * 100,
            length=size,
            codec="raw",
            raw_length=size,
            checksum="",
        )

    stored = {"w": StoredTensor(fqn="w", dtype="int8", shape=(4,), chunks=(ref(0, 4), ref(0, 2)))}
    req = ShardSpec(fqn="w", dtype="int8", shape=(4,), boxes=(Box(offsets=(0,), sizes=(2,)),))
    with pytest.raises(PlanError, match=r"^w: "):
        plan_load(stored, [req])


def test_plan_load_checks_the_request() -> None:
    stored = simulate_save(plan_save([[full_spec("m.w", "float32", (4, 2))]], chunk_bytes=8)).stored
    with pytest.raises(PlanError, match=r"m\.v: not in the checkpoint"):
        plan_load(stored, [full_spec("m.v", "float32", (4, 2))])
    with pytest.raises(
        PlanError,
        match=r"m\.w: checkpoint has dtype float32 shape \[4, 2\], request has dtype float16 shape \[4, 2\]",
    ):
        plan_load(stored, [full_spec("m.w", "float16", (4, 2))])
    with pytest.raises(PlanError, match=r"m\.w: .*request has dtype float32 shape \[2, 4\]"):
        plan_load(stored, [full_spec("m.w", "float32", (2, 4))])
    outside = ShardSpec(
        fqn="m.w", dtype="float32", shape=(4, 2), boxes=(Box(offsets=(3, 0), sizes=(2, 2)),)
    )
    with pytest.raises(PlanError, match=r"m\.w: stored chunks cover 2 of the 4 elements"):
        plan_load(stored, [outside])
    nothing = ShardSpec(
        fqn="m.w", dtype="float32", shape=(4, 2), boxes=(Box(offsets=(4, 0), sizes=(0, 2)),)
    )
    assert plan_load(stored, [nothing]).items == ()


def test_plan_load_scalar_and_empty_tensors() -> None:
    specs = [[full_spec("step", "int64", ()), full_spec("e", "float32", (0, 3))]] * 2
    saved = simulate_save(plan_save(specs, chunk_bytes=4))
    assert len(saved.stored["step"].chunks) == 1
    assert saved.stored["e"].chunks == ()
    requests = _full_requests(saved.stored)
    plan = plan_load(saved.stored, requests)
    filled = execute_load(plan, requests, saved.files)
    got, count = filled[("step", full_box(()))]
    assert count == 1 and np.array_equal(got, saved.data["step"])
    assert plan.needed_bytes == 8


def test_plan_load_scales_with_what_it_reads() -> None:
    """A rank asking for one row of a tensor stored as 10,000 chunks touches one chunk."""
    saved = simulate_save(plan_save([[full_spec("emb", "float32", (10_000, 4))]], chunk_bytes=16))
    req = ShardSpec(
        fqn="emb",
        dtype="float32",
        shape=(10_000, 4),
        boxes=(Box(offsets=(5_000, 0), sizes=(1, 4)),),
    )
    plan = plan_load(saved.stored, [req])
    assert [i.chunk.box for i in plan.items] == [Box(offsets=(5_000, 0), sizes=(1, 4))]


@given(st.data(), st.integers(1, 16), st.integers(1, 16))
def test_tilings_of_two_world_sizes_reshard(data: st.DataObject, n: int, m: int) -> None:
    """Shard(d) on n ranks saved, loaded on m ranks as another tiling: every rank gets its slice."""
    shape = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple))
    src = data.draw(tilings(shape, n))
    dst = data.draw(tilings(shape, m))
    specs = [[ShardSpec(fqn="w", dtype="float16", shape=shape, boxes=b)] for b in src]
    saved = simulate_save(plan_save(specs, chunk_bytes=data.draw(st.integers(1, 40))))
    for bxs in dst:
        reqs = [ShardSpec(fqn="w", dtype="float16", shape=shape, boxes=bxs)]
        filled = execute_load(plan_load(saved.stored, reqs), reqs, saved.files)
        for box in bxs:
            got, count = filled[("w", box)]
            assert (count == 1).all()
            assert np.array_equal(got, saved.data["w"][box.slices()])


def _reference_items(specs: SpecsByRank, chunk_bytes: int) -> list[list[WriteItem]]:
    """The save plan, one box object at a time: what the columnar planner must equal exactly."""
    order: list[str] = []
    meta: dict[str, ShardSpec] = {}
    holders: dict[tuple[str, Box], list[int]] = {}
    for rank, rank_specs in enumerate(specs):
        for s in rank_specs:
            if s.fqn not in meta:
                meta[s.fqn] = s
                order.append(s.fqn)
            for b in s.boxes:
                if b.volume:
                    holders.setdefault((s.fqn, b), []).append(rank)
    tid = {f: i for i, f in enumerate(order)}
    boxes = sorted(holders, key=lambda k: (tid[k[0]], k[1].offsets, k[1].sizes))
    nbytes = {k: k[1].volume * dtype_info(meta[k[0]].dtype).itemsize for k in boxes}
    writer = {k: holders[k][0] for k in boxes if len(holders[k]) == 1}
    load = [0] * len(specs)
    for k, r in writer.items():
        load[r] += nbytes[k]
    for k in sorted((k for k in boxes if len(holders[k]) > 1), key=lambda k: -nbytes[k]):
        r = min(holders[k], key=lambda h: load[h])  # ties to the lowest rank
        writer[k] = r
        load[r] += nbytes[k]
    # Each rank writes its whole boxes first, then the chunks of its split boxes.
    out: list[list[WriteItem]] = [[] for _ in specs]
    for split in (False, True):
        for k in boxes:
            f, box = k
            if (nbytes[k] > chunk_bytes) != split:
                continue
            s = meta[f]
            chunks = split_box(box, dtype_info(s.dtype).itemsize, chunk_bytes) if split else [box]
            out[writer[k]] += [
                WriteItem(fqn=f, dtype=s.dtype, rank=writer[k], shard=box, chunk=c) for c in chunks
            ]
    return out


def _int8(fqn: str, shape: tuple[int, ...], *boxes: tuple[int, int]) -> ShardSpec:
    return ShardSpec(
        fqn=fqn,
        dtype="int8",
        shape=shape,
        boxes=tuple(Box(offsets=(o,), sizes=(n,)) for o, n in boxes),
    )


@given(save_cases(), st.booleans())
@example(
    SaveCase(
        specs=[
            [
                ShardSpec(
                    fqn="w",
                    dtype="float32",
                    shape=(4, 3),
                    boxes=(Box(offsets=(2, 0), sizes=(2, 3)),),
                ),
                full_spec("b", "int8", (5,)),
            ],
            [
                ShardSpec(
                    fqn="w",
                    dtype="float32",
                    shape=(4, 3),
                    boxes=(Box(offsets=(0, 0), sizes=(2, 3)),),
                ),
                full_spec("b", "int8", (5,)),
            ],
        ],
        chunk_bytes=8,
    ),
    True,
)
# rank 1 lists its tensors in another order than rank 0, and its boxes of c backwards
@example(
    SaveCase(
        specs=[
            [_int8("a", (3,), (0, 1)), _int8("b", (2,), (0, 1))],
            [_int8("b", (2,), (1, 1)), _int8("a", (3,), (1, 2)), _int8("c", (4,), (2, 2), (0, 2))],
        ],
        chunk_bytes=64,
    ),
    False,
)
def test_plan_save_equals_the_box_by_box_plan(case: SaveCase, reverse: bool) -> None:
    """Every column, in every rank's order, also when the ranks hold their slabs in reverse."""
    specs = case.specs[::-1] if reverse else case.specs
    plan = plan_save(specs, chunk_bytes=case.chunk_bytes)
    expected = _reference_items(specs, case.chunk_bytes)
    assert [list(plan.items_for(r)) for r in range(len(specs))] == expected
    assert plan.nbytes.dtype == np.int64
    assert plan.nbytes.tolist() == [it.nbytes for items in expected for it in items]

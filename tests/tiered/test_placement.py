"""Partner choice and the restore decision: pure functions, no processes."""

from __future__ import annotations

import itertools
import random

import pytest

from treeckpt.errors import OptionsError
from treeckpt.tiered import StepCopy, Transfer, decide_restore, partners, sources, step_kind


def _layouts(world: int) -> list[list[int]]:
    """Even nodes of every size that gives >= 2 nodes, and a few uneven ones."""
    out = [[r // per for r in range(world)] for per in range(1, world) if -(-world // per) >= 2]
    rng = random.Random(world)
    for _ in range(3):
        k = rng.randint(2, world)
        nodes = list(range(k)) + [rng.randrange(k) for _ in range(world - k)]
        rng.shuffle(nodes)
        out.append(nodes)
    return out


@pytest.mark.parametrize("world", range(2, 65))
def test_no_shard_has_all_its_copies_on_one_node(world: int) -> None:
    for nodes in _layouts(world):
        n_nodes = len(set(nodes))
        for replicas in range(1, min(3, n_nodes - 1) + 1):
            ps = partners(nodes, replicas)
            for rank, mine in enumerate(ps):
                homes = [nodes[rank]] + [nodes[p] for p in mine]
                assert len(set(homes)) == replicas + 1, (nodes, replicas, rank, mine)
            # Losing any `replicas` nodes leaves a copy of every rank's shards
            # (implied by the above; checked outright on small layouts).
            if n_nodes > 8:
                continue
            for lost in itertools.combinations(sorted(set(nodes)), replicas):
                for rank, mine in enumerate(ps):
                    assert {nodes[rank], *(nodes[p] for p in mine)} - set(lost)
            # Each rank receives from as many as it is the partner of.
            srcs = sources(nodes, replicas)
            assert sum(map(len, srcs)) == world * replicas
            for rank, mine in enumerate(ps):
                for p in mine:
                    assert rank in srcs[p]


def test_partners_of_two_even_nodes() -> None:
    assert partners([0, 0, 1, 1]) == ((2,), (3,), (0,), (1,))
    assert partners([0, 0, 1]) == ((2,), (2,), (0,))
    assert partners([5, 3, 5, 3], 1) == ((1,), (0,), (3,), (2,))
    assert partners([0, 1, 2], 2) == ((1, 2), (2, 0), (0, 1))


def test_partners_need_enough_nodes() -> None:
    with pytest.raises(OptionsError, match="need at least 2 nodes; the job has 1"):
        partners([0, 0, 0], 1)
    with pytest.raises(OptionsError, match="replicas must be an int >= 0"):
        partners([0, 1], -1)
    assert partners([0, 0], 0) == ((), ())


def test_step_kind() -> None:
    assert [step_kind(s, 2, 6) for s in range(7)] == [
        "durable", "none", "memory", "none", "memory", "none", "durable",
    ]  # fmt: skip
    assert step_kind(3, 2, None) == "none"
    assert step_kind(3, 2, None, durable=True) == "durable"
    assert step_kind(6, 2, 6, durable=False) == "memory"


def _copy(
    step: int, valid: set[int], writers: set[int] = frozenset({0, 1, 2, 3}), m: str = "m"
) -> StepCopy:  # type: ignore[assignment]
    return StepCopy(
        step=step,
        manifest=f"{m}{step}",
        writers=frozenset(writers),
        valid=frozenset(valid),
        sizes={w: 100 for w in valid},
    )


def test_restore_picks_newest_whole_step_and_fetches_what_a_node_lacks() -> None:
    # Node leaders 0 and 2. Step 4: node 0 holds all, node 2 was wiped.
    inv = {0: [_copy(2, {0, 1, 2, 3}), _copy(4, {0, 1, 2, 3})], 2: []}
    d = decide_restore(inv, [0, 2])
    assert d is not None
    assert (d.step, d.manifest, d.manifest_from) == (4, "m4", 0)
    assert d.transfers == tuple(Transfer(writer=w, src=0, dst=2, nbytes=100) for w in range(4))
    assert d.sources == {0: dict.fromkeys(range(4)), 2: dict.fromkeys(range(4), 0)}


def test_restore_skips_a_step_with_a_shard_on_no_survivor() -> None:
    # Step 6 lacks writer 3 everywhere (both its copies were lost): step 4 it is.
    inv = {0: [_copy(4, {0, 1, 2, 3}), _copy(6, {0, 1})], 2: [_copy(4, {2, 3}), _copy(6, {0, 2})]}
    d = decide_restore(inv, [0, 2])
    assert d is not None and d.step == 4
    assert d.transfers == (
        Transfer(writer=0, src=0, dst=2, nbytes=100),
        Transfer(writer=1, src=0, dst=2, nbytes=100),
    )


def test_restore_spreads_sends_over_holders_and_finds_nothing_whole() -> None:
    inv = {0: [_copy(4, {0, 1}, {0, 1})], 2: [_copy(4, {0, 1}, {0, 1})], 4: []}
    d = decide_restore(inv, [0, 2, 4])
    assert d is not None
    assert d.transfers == (
        Transfer(writer=0, src=0, dst=4, nbytes=100),
        Transfer(writer=1, src=2, dst=4, nbytes=100),
    )
    assert decide_restore({0: [_copy(4, {0}, {0, 1})], 2: [_copy(4, {1}, {0, 1})]}, [0, 2])
    assert decide_restore({0: [_copy(4, {0}, {0, 1})], 2: [_copy(4, {0}, {0, 1})]}, [0, 2]) is None
    assert decide_restore({0: [], 2: []}, [0, 2]) is None


def test_restore_does_not_mix_two_saves_of_one_step() -> None:
    # Step 4 saved twice (a crashed run, then a rerun): copies of different manifests never mix.
    inv = {0: [_copy(4, {0, 1}, m="a")], 2: [_copy(4, {2, 3}, m="b")]}
    assert decide_restore(inv, [0, 2]) is None
    inv = {0: [_copy(4, {0, 1, 2, 3}, m="a")], 2: [_copy(4, {2, 3}, m="b")]}
    d = decide_restore(inv, [0, 2])
    assert d is not None and d.manifest == "a4" and len(d.transfers) == 4


def test_restore_spreads_transfers_over_the_ranks_of_both_nodes() -> None:
    inv = {0: [_copy(4, {0, 1, 2, 3})], 2: []}
    d = decide_restore(inv, [0, 2], {0: (0, 1), 2: (2, 3)})
    assert d is not None
    assert [(t.writer, t.src, t.dst) for t in d.transfers] == [
        (0, 0, 2), (1, 1, 3), (2, 0, 2), (3, 1, 3),
    ]  # fmt: skip
    assert d.sources == {0: dict.fromkeys(range(4)), 2: {0: 0, 1: 1, 2: 0, 3: 1}}

"""core/merge.py: the union of every rank's tree, its conflicts, and replica digests."""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from treeckpt.core.leaves import PickleLeaf, TensorLeaf, ValueLeaf
from treeckpt.core.merge import (
    MergedTree,
    TreeDescription,
    exact_key,
    merge_trees,
    replica_conflicts,
)
from treeckpt.core.tree import build_tree, find_subtree, flatten_tree, iter_leaf_fqns
from treeckpt.errors import RankConflictError
from treeckpt.store.manifest import encode_record
from treeckpt.testing.strategies import plain_values, rank_trees, trees

HINT = (
    'save per-rank state under per-rank keys (e.g. f"rng.rank_{rank}") or make it equal '
    "on every rank"
)


def _d(tree: Any) -> TreeDescription:
    flat = flatten_tree(tree)
    return TreeDescription(structure=flat.structure, records=flat.records)


def _conflict(*trees: Any) -> str:
    with pytest.raises(RankConflictError) as info:
        merge_trees([_d(t) for t in trees])
    return str(info.value)


PREFIX = "the ranks' trees contradict each other: "


# ------------------------------------------------------------------ unions


def test_alike_ranks_give_the_coordinators_tree_unchanged() -> None:
    one = _d({"w": torch.zeros(2), "step": 3})
    merged = merge_trees([one, one, one])
    assert merged.structure is one.structure
    assert merged.records == one.records
    assert merged.holders == {}


def test_equal_trees_from_distinct_objects_merge_to_the_same_tree() -> None:
    a, b = _d({"w": torch.zeros(2), "x": math.nan}), _d({"w": torch.ones(2), "x": math.nan})
    merged = merge_trees([a, b])
    assert merged.structure == a.structure
    assert list(merged.records) == ["w", "x"]
    assert merged.holders == {}


def test_per_rank_keys_are_kept_with_their_ranks() -> None:
    ranks = [
        _d({"model": {"w": torch.zeros(2)}, "dl": {f"dp_rank_{r}": b"s%d" % r, "world": 3}})
        for r in range(3)
    ]
    merged = merge_trees(ranks)
    assert merged.structure == {
        "type": "dict",
        "keys": ["model", "dl"],
        "children": [
            {"type": "dict", "keys": ["w"], "children": [{"leaf": "model.w"}]},
            {
                "type": "dict",
                "keys": ["dp_rank_0", "world", "dp_rank_1", "dp_rank_2"],
                "children": [
                    {"leaf": "dl.dp_rank_0"},
                    {"leaf": "dl.world"},
                    {"leaf": "dl.dp_rank_1"},
                    {"leaf": "dl.dp_rank_2"},
                ],
            },
        ],
    }
    assert list(merged.records) == [
        "model.w",
        "dl.dp_rank_0",
        "dl.world",
        "dl.dp_rank_1",
        "dl.dp_rank_2",
    ]
    assert merged.records["dl.dp_rank_2"] == ValueLeaf(value=b"s2")
    assert merged.holders == {"dl.dp_rank_0": (0,), "dl.dp_rank_1": (1,), "dl.dp_rank_2": (2,)}


def test_a_subtree_some_ranks_lack_is_held_by_the_others() -> None:
    a = _d({"opt": {"state": {0: {"step": 1}}}, "x": 1})
    b = _d({"opt": {"state": {}}, "x": 1})
    merged = merge_trees([a, b, a])
    assert merged.holders == {"opt.state.0.step": (0, 2)}
    assert build_tree(merged.structure, lambda f: f) == {"opt": {"state": {0: {"step": "opt.state.0.step"}}}, "x": "x"}  # fmt: skip


def test_int_and_str_keys_stay_distinct_and_dict_kinds_keep_their_header() -> None:
    a = _d(collections.OrderedDict([(1, "a")]))
    b = _d(collections.OrderedDict([(2, "b")]))
    merged = merge_trees([a, b])
    assert merged.structure == {
        "type": "odict",
        "keys": [{"int": "1"}, {"int": "2"}],
        "children": [{"leaf": "1"}, {"leaf": "2"}],
    }


# --------------------------------------------------------------- conflicts


def test_different_values_name_the_fqn_and_the_ranks() -> None:
    msg = _conflict({"step": 3}, {"step": 4}, {"step": 3})
    assert msg == (
        PREFIX + f"'step' holds different values on different ranks (ranks 0, 2: int 3; "
        f"rank 1: int 4); {HINT}"
    )


@pytest.mark.parametrize(
    ("a", "b", "shown"),
    [
        (1, True, "int 1; rank 1: bool True"),
        (1, 1.0, "int 1; rank 1: float 1.0"),
        (0.0, -0.0, "float 0.0; rank 1: float -0.0"),
        (
            math.nan,
            -math.nan,
            "float nan (bits 7ff8000000000000); rank 1: float nan (bits fff8000000000000)",
        ),
        ("a", b"a", "str 'a'; rank 1: bytes b'a'"),
        (None, 0, "NoneType None; rank 1: int 0"),
        ("x" * 50, "y" * 50, "str of length 50; rank 1: str of length 50"),
    ],
)
def test_values_compare_by_their_exact_stored_form(a: Any, b: Any, shown: str) -> None:
    msg = _conflict({"v": a}, {"v": b})
    assert (
        msg == PREFIX + f"'v' holds different values on different ranks (rank 0: {shown}); {HINT}"
    )


def test_nan_equals_nan_and_pickles_compare_by_bytes() -> None:
    assert merge_trees([_d({"v": math.nan}), _d({"v": math.nan})]).holders == {}
    a = TreeDescription(structure={"leaf": ""}, records={"": PickleLeaf(data=b"1")})
    b = TreeDescription(structure={"leaf": ""}, records={"": PickleLeaf(data=b"2")})
    with pytest.raises(RankConflictError, match="rank 0: pickled object of 1 bytes; rank 1"):
        merge_trees([a, b])


def test_a_tensor_on_one_rank_and_a_value_on_another() -> None:
    assert _conflict({"w": torch.zeros(2)}, {"w": 2}) == PREFIX + (
        "'w' is a tensor on some ranks and a value on others (rank 0: torch tensor "
        "float32[2]; rank 1: int 2)"
    )


def test_tensors_of_different_shapes_or_libraries() -> None:
    assert _conflict({"w": torch.zeros(2)}, {"w": torch.zeros(2).numpy()}) == PREFIX + (
        "'w' is a tensor of different dtypes or shapes on different ranks (rank 0: torch "
        "tensor float32[2]; rank 1: numpy tensor float32[2])"
    )


@pytest.mark.parametrize(
    ("a", "b", "sides"),
    [
        ({"x": [1]}, {"x": {"0": 1}}, "rank 0: list of 1; rank 1: dict"),
        ({"x": [1]}, {"x": [1, 2]}, "rank 0: list of 1; rank 1: list of 2"),
        ({"x": [1]}, {"x": (1,)}, "rank 0: list of 1; rank 1: tuple of 1"),
        ({"x": {"a": 1}}, {"x": 1}, "rank 0: dict; rank 1: a leaf"),
        (
            {"x": collections.defaultdict(list)},
            {"x": collections.defaultdict(int)},
            "rank 0: defaultdict(list); rank 1: defaultdict(int)",
        ),
        (
            {"x": collections.deque([1], maxlen=2)},
            {"x": collections.deque([1])},
            "rank 0: deque of 1 (maxlen 2); rank 1: deque of 1 (maxlen None)",
        ),
    ],
)
def test_different_container_kinds_at_one_path(a: Any, b: Any, sides: str) -> None:
    assert _conflict(a, b) == PREFIX + f"'x' is not the same kind of node on every rank ({sides})"


def test_namedtuples_of_other_fields_and_the_root_conflict() -> None:
    p = collections.namedtuple("P", ["a", "b"])
    q = collections.namedtuple("P", ["a", "c"])
    assert _conflict(p(1, 2), q(1, 2)) == PREFIX + (
        "'<root>' is not the same kind of node on every rank (rank 0: namedtuple P(a, b); "
        "rank 1: namedtuple P(a, c))"
    )


def test_two_paths_rendering_to_one_fqn_on_different_ranks() -> None:
    assert _conflict({"a.b": 1}, {"a": {"b": 1}}) == PREFIX + (
        "two paths render to the FQN 'a.b': ['a.b'] on rank 0 and ['a']['b'] on rank 1; "
        "rename one of the keys"
    )
    assert "two paths render to the FQN 'x.1'" in _conflict({"x": {1: 0}}, {"x": {"1": 0}})


def test_every_conflict_is_reported_up_to_five() -> None:
    msg = _conflict({f"k{i}": i for i in range(7)}, {f"k{i}": -i - 1 for i in range(7)})
    assert msg.count("holds different values") == 5
    assert msg.endswith("; and 2 more")


def test_merge_needs_a_tree() -> None:
    with pytest.raises(ValueError, match="at least one tree"):
        merge_trees([])


# ----------------------------------------------------------------- replicas


def test_replica_conflicts() -> None:
    assert replica_conflicts([{"w": "a", "u": "x"}, {"w": "a"}, {}]) == []
    assert replica_conflicts([{"w": "a"}, {"w": "b"}, {"w": "a"}]) == [
        "'w': a plain tensor saved from several ranks with different bytes (ranks 0, 2 vs "
        f"rank 1); only one copy would be stored: {HINT}, or save it as a DTensor"
    ]


# --------------------------------------------------------------- properties


@given(plain_values(), plain_values())
@example(math.nan, math.nan)
@example(0.0, -0.0)
@example(1, True)
@example(1, 1.0)
def test_exact_key_equals_iff_the_stored_forms_do(a: Any, b: Any) -> None:
    ra, rb = ValueLeaf(value=a), ValueLeaf(value=b)
    assert (exact_key(ra) == exact_key(rb)) == (encode_record(ra) == encode_record(rb))


def _records_of(tree: TreeDescription) -> dict[str, Any]:
    return {f: exact_key(r) for f, r in tree.records.items()}


@given(rank_trees())
def test_the_union_holds_every_ranks_leaves_exactly(per_rank: list[Any]) -> None:
    descs = [_d(t) for t in per_rank]
    merged = merge_trees(descs)
    world = len(descs)
    # A valid structure record naming each record once, in record order.
    assert iter_leaf_fqns(merged.structure) == list(merged.records)
    build_tree(merged.structure, lambda f: None)
    union: dict[str, list[int]] = {}
    for r, d in enumerate(descs):
        for fqn, key in _records_of(d).items():
            assert exact_key(merged.records[fqn]) == key
            union.setdefault(fqn, []).append(r)
        # Every leaf of this rank sits at its own path in the union.
        for fqn, path in flatten_tree(per_rank[r]).paths.items():
            assert find_subtree(merged.structure, path) == {"leaf": fqn}
    assert set(merged.records) == set(union)
    assert merged.holders == {f: tuple(r) for f, r in union.items() if len(r) < world}


@given(rank_trees(), st.randoms(use_true_random=False))
def test_the_union_does_not_depend_on_rank_order_but_for_order(
    per_rank: list[Any], rnd: Any
) -> None:
    descs = [_d(t) for t in per_rank]
    order = list(range(len(descs)))
    rnd.shuffle(order)
    a = merge_trees(descs)
    b = merge_trees([descs[i] for i in order])
    assert {f: exact_key(r) for f, r in a.records.items()} == {
        f: exact_key(r) for f, r in b.records.items()
    }
    assert {f: {order[i] for i in r} for f, r in b.holders.items()} == {
        f: set(r) for f, r in a.holders.items()
    }


@given(trees(max_leaves=10), st.integers(1, 4))
def test_merging_copies_of_one_tree_gives_that_tree(tree: Any, world: int) -> None:
    copies = [_d(tree) for _ in range(world)]
    merged = merge_trees(copies)
    assert merged.structure == copies[0].structure
    assert list(merged.records) == list(copies[0].records)
    assert merged.holders == {}


@given(plain_values(), plain_values())
def test_two_values_merge_exactly_when_their_stored_forms_are_equal(a: Any, b: Any) -> None:
    same = encode_record(ValueLeaf(value=a)) == encode_record(ValueLeaf(value=b))
    try:
        merged: MergedTree | None = merge_trees([_d({"v": a}), _d({"v": b})])
    except RankConflictError:
        merged = None
    assert (merged is not None) == same


def test_tensor_leaf_records_compare_exactly() -> None:
    a = TensorLeaf(lib="torch", dtype="float32", shape=(2,))
    assert exact_key(a) == exact_key(TensorLeaf(lib="torch", dtype="float32", shape=(2,)))
    assert exact_key(a) != exact_key(TensorLeaf(lib="torch", dtype="float32", shape=(2, 1)))


# ----------------------------------------------------- entries left out (None)


def _left_out(tree: Any, keys: set[str]) -> TreeDescription:
    """``tree``'s description with the root entries under ``keys`` left out (like rank 0's)."""
    d = _d(tree)
    root = d.structure
    children = [
        None if k in keys else c for k, c in zip(root["keys"], root["children"], strict=True)
    ]
    kept = {f: r for f, r in d.records.items() if f.split(".")[0] not in keys}
    return TreeDescription(structure={**root, "children": children}, records=kept)


def test_a_left_out_entry_is_rank_0s_entry() -> None:
    base = {"model": {"w": torch.zeros(2)}, "step": 3, "dl": {"dp_rank_0": 0}}
    ranks = [_d(base)] + [
        _left_out({"model": {"w": torch.zeros(2)}, "step": 3, "dl": {f"dp_rank_{r}": r}}, {"model", "step"})
        for r in (1, 2)
    ]  # fmt: skip
    full = merge_trees(
        [_d({"model": {"w": torch.zeros(2)}, "step": 3, "dl": {f"dp_rank_{r}": r}}) for r in range(3)]
    )  # fmt: skip
    merged = merge_trees(ranks)
    assert merged.structure == full.structure
    assert list(merged.records) == list(full.records)
    assert merged.holders == full.holders == {f"dl.dp_rank_{r}": (r,) for r in range(3)}


def test_a_sent_entry_still_conflicts_with_rank_0s_naming_every_rank() -> None:
    ranks = [
        _d({"step": 3, "lr": 1.0}),
        _left_out({"step": 4, "lr": 1.0}, {"lr"}),
        _left_out({"step": 3, "lr": 1.0}, {"step", "lr"}),
    ]
    with pytest.raises(RankConflictError) as info:
        merge_trees(ranks)
    assert str(info.value) == PREFIX + (
        f"'step' holds different values on different ranks (ranks 0, 2: int 3; rank 1: int 4); {HINT}"
    )


def test_a_left_out_entry_must_stand_for_one_of_rank_0s() -> None:
    with pytest.raises(ValueError, match=r"^'x': a left-out child that rank 0 does not have$"):
        merge_trees([_d({"a": 1}), _left_out({"x": 1}, {"x"})])
    nested = TreeDescription(
        structure={"type": "dict", "keys": ["a"], "children": [
            {"type": "dict", "keys": ["b"], "children": [None]}]},
        records={},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^'a': a left-out child below the root$"):
        merge_trees([_d({"a": {"b": 1}}), nested])

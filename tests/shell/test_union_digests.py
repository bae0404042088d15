"""shell/union.py: tree digests, top-level parts, replica digests (one process)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import xxhash
from hypothesis import given

from treeckpt.core.merge import exact_key, merge_trees
from treeckpt.core.tree import flatten_tree
from treeckpt.shell.union import (
    describe_parts,
    describe_tree,
    is_plain,
    part_digests,
    replica_digests,
    tensor_digest,
    tree_digest,
)
from treeckpt.testing.strategies import rank_trees


def test_tree_digest_is_equal_exactly_when_structure_and_stored_values_are() -> None:
    def digest(tree: Any) -> str:
        return tree_digest(flatten_tree(tree))

    base = {"w": torch.zeros(2), "x": math.nan, "k": {1: "a"}}
    assert digest(base) == digest({"w": torch.ones(2), "x": math.nan, "k": {1: "a"}})
    for other in (
        {"w": torch.zeros(3), "x": math.nan, "k": {1: "a"}},
        {"w": torch.zeros(2), "x": -math.nan, "k": {1: "a"}},
        {"w": torch.zeros(2), "x": math.nan, "k": {"1": "a"}},
        {"w": torch.zeros(2), "k": {1: "a"}, "x": math.nan},
        {"w": torch.zeros(2), "x": math.nan, "k": [1]},
    ):
        assert digest(other) != digest(base), other
    assert digest({"v": 1}) != digest({"v": True}) != digest({"v": 1.0})


def test_parts_leave_out_the_entries_the_coordinator_has_alike() -> None:
    rank0 = flatten_tree({"model": {"w": torch.zeros(2)}, "step": 3, "dl": {"dp_rank_0": b"a"}})
    rank1 = flatten_tree({"model": {"w": torch.zeros(2)}, "step": 3, "dl": {"dp_rank_1": b"b"}})
    parts = describe_parts(rank1, part_digests(rank0))
    assert parts.structure == {
        "type": "dict",
        "keys": ["model", "step", "dl"],
        "children": [None, None, {"type": "dict", "keys": ["dp_rank_1"], "children": [
            {"leaf": "dl.dp_rank_1"}]}],
    }  # fmt: skip
    assert dict(parts.records) == {"dl.dp_rank_1": rank1.records["dl.dp_rank_1"]}
    # A root that is no dict is sent whole.
    assert part_digests(flatten_tree([1, 2])) is None
    assert describe_parts(flatten_tree([1, 2]), None).structure == flatten_tree([1, 2]).structure


@given(rank_trees())
def test_merging_parts_gives_what_merging_whole_trees_gives(per_rank: list[Any]) -> None:
    flats = [flatten_tree(t) for t in per_rank]
    whole = merge_trees([describe_tree(f) for f in flats])
    theirs = part_digests(flats[0])
    parts = [describe_tree(flats[0])] + [describe_parts(f, theirs) for f in flats[1:]]
    merged = merge_trees(parts)
    assert merged.structure == whole.structure
    assert list(merged.records) == list(whole.records)
    assert all(exact_key(merged.records[f]) == exact_key(r) for f, r in whole.records.items())
    assert merged.holders == whole.holders


def test_tensor_digest_is_xxh3_128_of_the_row_major_bytes() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for obj, raw in [
        (t, t.numpy().tobytes()),
        (t.t(), t.t().contiguous().numpy().tobytes()),
        (torch.tensor([True, False]), b"\x01\x00"),
        (torch.tensor([1 + 2j]).conj(), torch.tensor([1 - 2j]).numpy().tobytes()),
        (np.float32(3.0), np.float32(3.0).tobytes()),
        (np.arange(6, dtype=np.int16).reshape(2, 3)[:, 1], np.array([1, 4], np.int16).tobytes()),
        (torch.empty(0), b""),
    ]:
        assert tensor_digest(obj) == xxhash.xxh3_128_hexdigest(raw)
    assert tensor_digest(torch.zeros(1)) != tensor_digest(torch.tensor([-0.0]))


def test_plain_leaves_and_replica_digests() -> None:
    assert is_plain(torch.zeros(1)) and is_plain(torch.nn.Parameter(torch.zeros(1)))
    assert is_plain(np.zeros(1)) and is_plain(np.float64(1.0))
    assert not is_plain(1.0)
    local = {"a": [(None, torch.ones(2))], "b": [(None, torch.zeros(2))]}
    got = replica_digests(local, ("a", "b"), {"b": "known"})  # type: ignore[arg-type]
    assert got == {"a": tensor_digest(torch.ones(2)), "b": "known"}

#!/usr/bin/env python
"""What a multi-rank save spends comparing ranks, on the GPT-2-small + AdamW state.

    .venv/bin/python benchmarks/bench_replicas.py [--state fp32] [--rounds 5] [--quick]

- tree digest: the xxh3-128 of the structure and every leaf record that each
  rank of a multi-rank save sends with its description (every save);
- replica digests: the xxh3-128 of every plain tensor of the state, which each
  rank holding a replicated plain tensor (DDP, or any plain tensor saved from
  several ranks) computes once per save (``SaveOptions.check_replicas``);
- flatten: ``flatten_tree`` of the same state, for scale;
- the tree round of a save whose ranks differ (``--ranks`` simulated ranks,
  each with its own ``dataloader.dp_rank_<r>`` entry, as torchtitan saves):
  the bytes each rank sends (pickled), and rank 0's merge.

CPU tensors only (a CUDA tensor is copied to the host 64 MiB at a time).
Medians over the rounds, printed as a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchlib.contenders import import_treeckpt
from benchlib.state import GPT2_QUICK, GPT2_SMALL, build_state
from benchlib.tree import tensor_bytes, tensor_count


def _median_s(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ranks", type=int, default=1024)
    args = parser.parse_args()
    import_treeckpt(Path(__file__).resolve().parent.parent)
    from treeckpt.core.merge import merge_trees
    from treeckpt.core.tree import flatten_tree
    from treeckpt.shell.union import (
        describe_parts,
        describe_tree,
        is_plain,
        part_digests,
        tensor_digest,
        tree_digest,
    )

    torch.set_num_threads(1)
    dtype = torch.float32 if args.state == "fp32" else torch.bfloat16
    state = build_state(GPT2_QUICK if args.quick else GPT2_SMALL, dtype, seed=0)
    nbytes = tensor_bytes(state)
    flat = flatten_tree(state)
    plain = [obj for obj in flat.leaves.values() if is_plain(obj)]
    rows = [
        ("flatten_tree", _median_s(lambda: flatten_tree(state), args.rounds)),
        ("tree digest", _median_s(lambda: tree_digest(flat), args.rounds)),
        ("replica digests", _median_s(lambda: [tensor_digest(t) for t in plain], args.rounds)),
    ]

    # The tree round: what each rank sends, and the merge on rank 0.
    def rank_state(r: int) -> object:
        return {**state, "dataloader": {f"dp_rank_{r}": bytes(200), "world_size": args.ranks}}

    base_flat = flatten_tree(rank_state(0))
    theirs = part_digests(base_flat)
    sent = []
    for r in range(1, args.ranks):
        blob = pickle.dumps(describe_parts(flatten_tree(rank_state(r)), theirs))
        sent.append(pickle.loads(blob))  # as gathered: distinct objects
    base = describe_tree(base_flat)
    gc.collect()
    merge_s = _median_s(lambda: merge_trees([base, *sent]), args.rounds)
    gb = nbytes / 1e9
    print(
        f"state: {args.state}, {tensor_count(state)} tensors, {gb:.3f} GB, {len(flat.records)} leaves"
    )
    print()
    print("| step | median ms | ms per GB of tensors |")
    print("|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s * 1e3:.1f} | {s * 1e3 / gb:.1f} |")
    print()
    whole = len(pickle.dumps(describe_tree(base_flat)))
    print(f"tree round, {args.ranks} ranks with per-rank data-loader entries:")
    print(f"- each rank sends {len(blob)} bytes (its whole tree would be {whole})")
    print(f"- rank 0 merges them in {merge_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

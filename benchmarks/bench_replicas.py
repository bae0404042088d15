#!/usr/bin/env python
"""What a multi-rank save spends comparing ranks, on the GPT-2-small + AdamW state.

    .venv/bin/python benchmarks/bench_replicas.py [--state fp32] [--rounds 5] [--quick]

- tree digest: the xxh3-128 of the structure and every leaf record that each
  rank of a multi-rank save sends with its description (every save);
- replica digests: the xxh3-128 of every plain tensor of the state, which each
  rank holding a replicated plain tensor (DDP, or any plain tensor saved from
  several ranks) computes once per save (``SaveOptions.check_replicas``);
- flatten: ``flatten_tree`` of the same state, for scale.

CPU tensors only (a CUDA tensor is copied to the host 64 MiB at a time).
Medians over the rounds, printed as a markdown table.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    import_treeckpt(Path(__file__).resolve().parent.parent)
    from treeckpt.core.tree import flatten_tree
    from treeckpt.shell.union import is_plain, tensor_digest, tree_digest

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
    gb = nbytes / 1e9
    print(
        f"state: {args.state}, {tensor_count(state)} tensors, {gb:.3f} GB, {len(flat.records)} leaves"
    )
    print()
    print("| step | median ms | ms per GB of tensors |")
    print("|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s * 1e3:.1f} | {s * 1e3 / gb:.1f} |")


if __name__ == "__main__":
    main()

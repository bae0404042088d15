"""Planning at scale, in one process, no collectives.

``plan_save`` and ``plan_load`` for N simulated ranks each holding a Shard(0)
slice (FSDP-style, uneven) of T tensors, as ANCHORS.md measures DCP.

    .venv/bin/python benchmarks/bench_plan_scale.py --ranks 256 1024 4096 --tensors 1000
"""

from __future__ import annotations

import argparse
import time

from treeckpt import Box, ShardSpec, plan_load, plan_save
from treeckpt.core.manifest import ChunkRef
from treeckpt.core.plan import StoredTensor


def _shapes(tensors: int) -> list[tuple[int, int]]:
    return [(1024 + (i % 7) * 64, 768) for i in range(tensors)]


def _shard(shape: tuple[int, int], rank: int, ranks: int) -> Box:
    per = -(-shape[0] // ranks)
    lo = min(shape[0], rank * per)
    hi = min(shape[0], lo + per)
    return Box(offsets=(lo, 0), sizes=(hi - lo, shape[1]))


def run(ranks: int, tensors: int) -> dict[str, float]:
    shapes = _shapes(tensors)
    t0 = time.perf_counter()
    specs = [
        [
            ShardSpec(fqn=f"layers.{i}.w", dtype="bfloat16", shape=s, boxes=(_shard(s, r, ranks),))
            for i, s in enumerate(shapes)
        ]
        for r in range(ranks)
    ]
    t1 = time.perf_counter()
    plan = plan_save(specs, chunk_bytes=16 << 20)
    t2 = time.perf_counter()
    chunks: dict[str, list[ChunkRef]] = {}
    for rank_items in plan.items:
        for n, it in enumerate(rank_items):
            chunks.setdefault(it.fqn, []).append(
                ChunkRef(
                    fqn=it.fqn,
                    box=it.chunk,
                    file=f"r{it.rank}.bin",
                    offset=n,
                    length=it.nbytes,
                    codec="raw",
                    raw_length=it.nbytes,
                    checksum="xxh3-64:0000000000000000",
                )
            )
    stored = {
        f"layers.{i}.w": StoredTensor(
            fqn=f"layers.{i}.w", dtype="bfloat16", shape=s, chunks=tuple(chunks[f"layers.{i}.w"])
        )
        for i, s in enumerate(shapes)
    }
    t3 = time.perf_counter()
    load = plan_load(stored, specs[ranks // 2])  # one rank's load plan, same layout
    t4 = time.perf_counter()
    return {
        "specs_s": t1 - t0,
        "plan_save_s": t2 - t1,
        "plan_load_one_rank_s": t4 - t3,
        "items": float(sum(plan.chunks_by_rank)),
        "amplification": load.read_amplification,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--tensors", type=int, default=1000)
    args = parser.parse_args()
    print(
        "| ranks | tensors | build specs s | plan_save s | plan_load (one rank) s | write items |"
    )
    print("|---|---|---|---|---|---|")
    for ranks in args.ranks:
        r = run(ranks, args.tensors)
        print(
            f"| {ranks} | {args.tensors} | {r['specs_s']:.2f} | {r['plan_save_s']:.2f} | "
            f"{r['plan_load_one_rank_s']:.3f} | {int(r['items'])} |"
        )


if __name__ == "__main__":
    main()

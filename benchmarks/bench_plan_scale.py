"""Planning at scale, in one process, no collectives.

N simulated ranks each hold a Shard(0) slice (FSDP-style, uneven) of T
tensors, as ANCHORS.md measures DCP. Timed: one rank describing its shards
(``local_table``, done on every rank in parallel), the coordinator's
``plan_save_table`` over all ranks, one rank materialising its write items,
and one rank's ``plan_load`` against the stored chunks of its own shards.

    .venv/bin/python benchmarks/bench_plan_scale.py --ranks 1024 4096 --tensors 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from treeckpt import Box, ShardSpec, plan_load
from treeckpt.core.manifest import ChunkRef
from treeckpt.core.plan import StoredTensor
from treeckpt.core.plan_table import plan_save_table
from treeckpt.core.shard_table import LocalTable, TensorTable, local_table

ROWS = 1024


def _shapes(tensors: int) -> list[tuple[int, int]]:
    return [(ROWS + (i % 7) * 64, 768) for i in range(tensors)]


def _rows(shape: tuple[int, int], rank: int, ranks: int) -> tuple[int, int]:
    per = -(-shape[0] // ranks)
    lo = min(shape[0], rank * per)
    return lo, min(shape[0], lo + per) - lo


def _specs(shapes: list[tuple[int, int]], rank: int, ranks: int) -> list[ShardSpec]:
    out = []
    for i, s in enumerate(shapes):
        lo, n = _rows(s, rank, ranks)
        box = Box(offsets=(lo, 0), sizes=(n, s[1]))
        out.append(ShardSpec(fqn=f"layers.{i}.w", dtype="bfloat16", shape=s, boxes=(box,)))
    return out


def _table(
    tensors: TensorTable, shapes: list[tuple[int, int]], rank: int, ranks: int
) -> LocalTable:
    """What ``local_table`` gives for this rank, built directly (the setup is not timed)."""
    rows = np.asarray([_rows(s, rank, ranks) for s in shapes], dtype=np.int64)
    offsets = np.zeros((len(shapes), 2), dtype=np.int64)
    offsets[:, 0] = rows[:, 0]
    sizes = np.asarray([[n, s[1]] for (_, n), s in zip(rows, shapes, strict=True)], dtype=np.int64)
    return LocalTable(
        tensors=tensors, tensor=np.arange(len(shapes), dtype=np.int64), offsets=offsets, sizes=sizes
    )


def run(ranks: int, tensors: int) -> dict[str, float]:
    shapes = _shapes(tensors)
    specs0 = _specs(shapes, ranks // 2, ranks)
    t0 = time.perf_counter()
    mine = local_table(specs0, ranks // 2)
    t1 = time.perf_counter()
    tables = [_table(mine.tensors, shapes, r, ranks) for r in range(ranks)]
    t2 = time.perf_counter()
    plan = plan_save_table(tables, chunk_bytes=16 << 20)
    t3 = time.perf_counter()
    items = plan.for_rank(ranks // 2).items_for(ranks // 2)
    t4 = time.perf_counter()
    # One rank loads its own shards back: the chunks of every tensor it overlaps.
    stored = {}
    for i, s in enumerate(shapes):
        chunks = []
        for r in (ranks // 2 - 1, ranks // 2, ranks // 2 + 1):
            rlo, rn = _rows(s, r, ranks)
            if rn:
                chunks.append(
                    ChunkRef(
                        fqn=f"layers.{i}.w",
                        box=Box(offsets=(rlo, 0), sizes=(rn, s[1])),
                        file=f"r{r}.bin",
                        offset=i,
                        length=rn * s[1] * 2,
                        codec="raw",
                        raw_length=rn * s[1] * 2,
                        checksum="xxh3-64:0000000000000000",
                    )
                )
        stored[f"layers.{i}.w"] = StoredTensor(
            fqn=f"layers.{i}.w", dtype="bfloat16", shape=s, chunks=tuple(chunks)
        )
    t5 = time.perf_counter()
    load = plan_load(stored, specs0)
    t6 = time.perf_counter()
    return {
        "local_table_s": t1 - t0,
        "setup_s": t2 - t1,
        "plan_save_s": t3 - t2,
        "items_one_rank_s": t4 - t3,
        "plan_load_one_rank_s": t6 - t5,
        "items": float(len(plan.rank)),
        "one_rank_items": float(len(items)),
        "amplification": load.read_amplification,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1024, help="rows of the smallest tensor")
    args = parser.parse_args()
    global ROWS
    ROWS = args.rows
    print(
        "| ranks | tensors | one rank: local_table s | coordinator: plan_save s | "
        "one rank: write items s | one rank: plan_load s | write items |"
    )
    print("|---|---|---|---|---|---|---|")
    # (--rows below the rank count leaves some ranks with empty shards.)
    for ranks in args.ranks:
        r = run(ranks, args.tensors)
        print(
            f"| {ranks} | {args.tensors} | {r['local_table_s']:.3f} | {r['plan_save_s']:.2f} | "
            f"{r['items_one_rank_s']:.3f} | {r['plan_load_one_rank_s']:.3f} | {int(r['items'])} |"
        )


if __name__ == "__main__":
    main()

"""Planning at scale, in one process, no collectives.

N simulated ranks each hold a Shard(0) slice (FSDP-style, uneven) of T
tensors, as ANCHORS.md measures DCP. Timed: one rank describing its shards
(``local_table``, done on every rank in parallel), the coordinator's
``plan_save_table`` over all ranks, one rank materialising its write items,
and one rank's ``plan_load`` against the stored chunks of its own shards.

The load side (``--load-ranks``): the save of the largest ``--ranks`` is
loaded on that many ranks, each a Shard(0) slice again. Measured for one
loading rank: the metadata it receives or reads (the root manifest as rank 0
broadcasts it, pickled, plus the binary chunk indexes its boxes need, picked
by the manifest's writers map) and its planning time (choosing the indexes,
decoding and validating them, ``plan_load``).

    .venv/bin/python benchmarks/bench_plan_scale.py --ranks 1024 4096 --tensors 1000
    .venv/bin/python benchmarks/bench_plan_scale.py --ranks 4096 --load-ranks 2048
"""

from __future__ import annotations

import argparse
import pickle
import time

import numpy as np

from treeckpt import Box, ShardSpec, plan_load
from treeckpt.core.extents import extents_of_plan, select_writers
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import ChunkIndex, ChunkRef, DataFile, IndexRef, Manifest
from treeckpt.core.plan import StoredTensor
from treeckpt.core.plan_table import SavePlan, plan_save_table
from treeckpt.core.shard_table import LocalTable, TensorTable, local_table
from treeckpt.store import layout
from treeckpt.store.binindex import decode_binary_index, encode_binary_index
from treeckpt.store.manifest import decode_manifest, encode_manifest

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


SAVE_ID = "0123456789abcdef"


def _index(plan: SavePlan, rank: int) -> ChunkIndex:
    """What writer ``rank`` would store: one data file, its chunks back to back.

    Checksums are distinct pseudo-random values, as real ones are, so that
    they do not compress better than real ones would.
    """
    name = layout.data_file(SAVE_ID, rank, 0)
    chunks, at = [], 0
    items = plan.items_for(rank)
    sums = np.random.default_rng(rank).integers(0, 1 << 63, size=len(items), dtype=np.int64)
    for item, value in zip(items, sums.tolist(), strict=True):
        n = item.nbytes
        chunks.append(
            ChunkRef(
                fqn=item.fqn,
                box=item.chunk,
                file=name,
                offset=at,
                length=n,
                codec="raw",
                raw_length=n,
                checksum=f"xxh3-64:{value:016x}",
            )
        )
        at += n
    return ChunkIndex(
        save_id=SAVE_ID, rank=rank, files=(DataFile(name=name, size=at),), chunks=tuple(chunks)
    )


def run_load(save_ranks: int, load_ranks: int, tensors: int) -> dict[str, float]:
    """One loading rank of ``load_ranks`` reading a ``save_ranks`` save: its metadata and planning."""
    shapes = _shapes(tensors)
    mine = local_table(_specs(shapes, 0, save_ranks), 0)
    plan = plan_save_table(
        [_table(mine.tensors, shapes, r, save_ranks) for r in range(save_ranks)],
        chunk_bytes=16 << 20,
    )
    t0 = time.perf_counter()
    extents = extents_of_plan(plan)
    t1 = time.perf_counter()
    rank = load_ranks // 2
    requests = _specs(shapes, rank, load_ranks)
    writers = select_writers(extents, requests)  # to size the indexes; timed below
    blobs = {w: encode_binary_index(_index(plan, w)) for w in writers}
    size = max(len(b) for b in blobs.values())
    refs = tuple(
        IndexRef(
            rank=r,
            file=layout.binary_index_file(SAVE_ID, r),
            size=len(blobs[r]) if r in blobs else size,
            checksum="xxh3-64:0000000000000000",
        )
        for r in range(save_ranks)
        if plan.starts[r] < plan.starts[r + 1]
    )
    fqns = [f"layers.{i}.w" for i in range(tensors)]
    manifest = Manifest(
        format_version=1,
        save_id=SAVE_ID,
        world_size=save_ranks,
        structure={
            "type": "dict",
            "keys": fqns,
            "children": [{"leaf": f} for f in fqns],
        },
        records={
            f: TensorLeaf(lib="torch", dtype="bfloat16", shape=s)
            for f, s in zip(fqns, shapes, strict=True)
        },
        indexes=refs,
        user_metadata={},
        extents=extents,
    )
    doc = encode_manifest(manifest)
    t2 = time.perf_counter()
    decoded = decode_manifest(doc)  # rank 0, then broadcast
    t3 = time.perf_counter()
    sent = len(pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL))
    assert decoded.extents is not None
    t4 = time.perf_counter()
    chosen = select_writers(decoded.extents, requests)
    t5 = time.perf_counter()
    indexes = [
        decode_binary_index(blobs[w], w, decoded, layout.binary_index_file(SAVE_ID, w))
        for w in sorted(chosen)
    ]
    t6 = time.perf_counter()
    by_fqn: dict[str, list[ChunkRef]] = {}
    for ix in indexes:
        for c in ix.chunks:
            by_fqn.setdefault(c.fqn, []).append(c)
    stored = {
        f: StoredTensor(fqn=f, dtype="bfloat16", shape=s, chunks=tuple(by_fqn.get(f, ())))
        for f, s in zip(fqns, shapes, strict=True)
    }
    load = plan_load(stored, requests)
    t7 = time.perf_counter()
    index_bytes = sum(len(blobs[w]) for w in chosen)
    return {
        "extents_s": t1 - t0,
        "manifest_bytes": float(len(doc)),
        "manifest_decode_s": t3 - t2,
        "broadcast_bytes": float(sent),
        "indexes_read": float(len(chosen)),
        "index_bytes": float(index_bytes),
        "per_rank_bytes": float(sent + index_bytes),
        "select_s": t5 - t4,
        "index_decode_s": t6 - t5,
        "plan_load_s": t7 - t6,
        "planning_s": t7 - t4,
        "amplification": load.read_amplification,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1024, help="rows of the smallest tensor")
    parser.add_argument(
        "--load-ranks",
        type=int,
        nargs="*",
        default=[],
        help="also load the save of the largest --ranks on these many ranks",
    )
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

    if args.load_ranks:
        save_ranks = max(args.ranks)
        print()
        print(
            "| save ranks | load ranks | tensors | manifest bytes | one rank: metadata bytes "
            "(manifest broadcast + indexes) | indexes read | one rank: planning s (select / "
            "decode indexes / plan_load) | rank 0: manifest decode s | coordinator: map s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
    for load_ranks in args.load_ranks:
        r = run_load(save_ranks, load_ranks, args.tensors)
        print(
            f"| {save_ranks} | {load_ranks} | {args.tensors} | {int(r['manifest_bytes']):,} | "
            f"{int(r['per_rank_bytes']):,} ({int(r['broadcast_bytes']):,} + "
            f"{int(r['index_bytes']):,}) | {int(r['indexes_read'])} | {r['planning_s']:.3f} "
            f"({r['select_s']:.3f} / {r['index_decode_s']:.3f} / {r['plan_load_s']:.3f}) | "
            f"{r['manifest_decode_s']:.3f} | {r['extents_s']:.3f} |"
        )


if __name__ == "__main__":
    main()

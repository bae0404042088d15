"""Tiered checkpoints: memory-tier save and restore against a cold restore from disk.

The GPT-2-small training state (fp32 weights + AdamW state, ``benchlib.state``)
row-sharded over 2 and 4 gloo ranks (DTensor ``Shard(0)``), the ranks split
into 2 "nodes" with a memory directory each under ``/dev/shm``. Measured on
the slowest rank, medians over rounds:

- memory save, blocking: how long ``TieredCheckpointer.save`` holds training
  (plan and host copy); memory save, total: until written and replicated
  (of which the point-to-point replication to the partner ranks);
- restore from memory: every rank restores from its node's copy (a restart
  with every node alive), and after one node's memory directory is wiped
  (a replaced node: its ranks receive everything from the other node);
- cold restore from disk: ``treeckpt.load`` and DCP's ``load`` of the same
  state saved to disk (treeckpt's default options, as the durable tier
  writes it), the page cache dropped first (as ``benchlib`` does); and the
  same treeckpt load from the page cache (warm: the floor of any load);
- every figure after one untimed load of each kind and a first restore
  (shown apart): one-time process and process-group set-up left out of all
  alike;
- cold restore from shared storage (``--shared-gbps G``, default 0.2): the
  same ``treeckpt.load`` through ``ThrottledBackend``, a link of G GB/s per
  rank, the rate of the object stores and network file systems a durable
  tier usually is;
- memory: bytes of the memory tier held by all ranks (own step + partners'
  copies) and the staging buffers.

    .venv/bin/python benchmarks/bench_tiered.py [--quick] [--ranks 2 4] [--rounds 2] [--shared-gbps 0.2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from benchlib.measure import disk_usage, drop_page_cache
from benchlib.ranks import run_on_ranks
from benchlib.state import GPT2_QUICK, GPT2_SMALL, build_state
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import treeckpt
from treeckpt.store.backends import ThrottledBackend, open_backend
from treeckpt.tiered import TieredCheckpointer


def _shard(tree: Any, mesh: Any, rank: int, world: int) -> Any:
    """Every tensor with rows as a row-sharded DTensor (``torch.chunk`` layout), 0-d ones as they are."""
    if isinstance(tree, dict):
        return {k: _shard(v, mesh, rank, world) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_shard(v, mesh, rank, world) for v in tree]
    if not isinstance(tree, torch.Tensor) or tree.dim() == 0:
        return tree
    n = tree.shape[0]
    per = -(-n // world)
    lo = min(n, rank * per)
    hi = min(n, lo + per)
    local = tree[lo:hi].clone()
    return DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=tree.shape, stride=tree.stride()
    )


def _sharded_state(rank: int, world: int, quick: bool) -> Any:
    mesh = init_device_mesh("cpu", (world,))
    out = None
    for r in range(world):  # one rank at a time holds the whole state while slicing it
        if r == rank:
            full = build_state(GPT2_QUICK if quick else GPT2_SMALL, torch.float32, seed=0)
            out = _shard(full, mesh, rank, world)
            del full
        dist.barrier()
    return out


def _zeros_like(tree: Any) -> Any:
    """The same tree with every tensor (local shard) zeroed: a restore's template."""
    if isinstance(tree, dict):
        return {k: _zeros_like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_zeros_like(v) for v in tree]
    if isinstance(tree, DTensor):
        return DTensor.from_local(
            torch.zeros_like(tree.to_local()),
            tree.device_mesh,
            tree.placements,
            run_check=False,
            shape=tree.shape,
            stride=tree.stride(),
        )
    return torch.zeros_like(tree) if isinstance(tree, torch.Tensor) else tree


def _locals(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _locals(v)]
    if isinstance(tree, list):
        return [t for v in tree for t in _locals(v)]
    if isinstance(tree, DTensor):
        return [tree.to_local()]
    return [tree] if isinstance(tree, torch.Tensor) else []


def _timed(fn: Any) -> float:
    dist.barrier()
    t = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t


def _job(rank: int, world: int, arg: str) -> dict[str, float]:
    workdir, memdir, quick, rounds, shared = arg.split("|")
    per_node = world // 2
    node = rank // per_node
    state = _sharded_state(rank, world, quick == "1")
    template = _zeros_like(state)
    mem = os.path.join(memdir, "node{node}")
    out: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    ckpt = TieredCheckpointer(mem, node=node, memory_every=1, timeout_s=600)
    for i in range(int(rounds)):
        dist.barrier()
        start = time.perf_counter()
        fut = ckpt.save(i + 1, state)
        assert fut is not None
        add("save_blocking", fut.blocked_s)
        res = fut.result()
        add("save_total", time.perf_counter() - start)
        add("save_replicate", res.seconds["replicate"])
        dist.barrier()
    add("memory_bytes", float(ckpt.memory_bytes))
    add("staging_bytes", float(ckpt.staging_bytes))
    ckpt.close()
    # The first restore of the process is shown apart: one-time costs of the
    # process (first use of the load path's code and caches) are left out of
    # every other figure, as they are of the disk loads below.
    first = TieredCheckpointer(mem, node=node, timeout_s=600)
    add("restore_first", _timed(lambda: first.restore(template)))
    for _ in range(int(rounds)):
        restorer = TieredCheckpointer(mem, node=node, timeout_s=600)
        reports: list[Any] = []
        add(
            "restore_memory",
            _timed(lambda r=restorer, o=reports: o.append(r.restore(template)[1])),
        )
        for phase, secs in reports[0].phases.items():
            add(f"phase:{phase}", secs)
    assert all(torch.equal(a, b) for a, b in zip(_locals(state), _locals(template), strict=True))
    for _ in range(int(rounds)):
        if rank == per_node:  # node 1's memory is lost
            shutil.rmtree(os.path.join(memdir, "node1"), ignore_errors=True)
        dist.barrier()
        restorer = TieredCheckpointer(mem, node=node, timeout_s=600)
        add("restore_peer", _timed(lambda r=restorer: r.restore(template)))
    tc, dc = os.path.join(workdir, "tc"), os.path.join(workdir, "dcp")
    treeckpt.save(state, tc)
    dcp.save(state, checkpoint_id=dc)
    dist.barrier()
    add("disk_bytes", float(disk_usage(tc)[0]))
    # Untimed first loads: treeckpt's and DCP's process-group set-up is done
    # once per job, as the tiered checkpointer's is at its construction.
    treeckpt.load(template, tc)
    dcp.load(template, checkpoint_id=dc)
    for _ in range(int(rounds)):
        # the floor of a memory restore: the same load from files in the page cache
        add("warm_treeckpt", _timed(lambda: treeckpt.load(template, tc)))
        if rank == 0:
            drop_page_cache(tc)
        add("disk_treeckpt", _timed(lambda: treeckpt.load(template, tc)))
        if rank == 0:
            drop_page_cache(dc)
        add("disk_dcp", _timed(lambda: dcp.load(template, checkpoint_id=dc)))
        if float(shared) > 0:
            if rank == 0:
                drop_page_cache(tc)
            link = ThrottledBackend(open_backend(tc), float(shared) * 1e9)
            add("shared_treeckpt", _timed(lambda b=link: treeckpt.load(template, b)))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 6x smaller state (smoke test)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--shared-gbps",
        type=float,
        default=0.2,
        help="GB/s per rank of the shared storage modelled for the durable tier (0: skip)",
    )
    args = parser.parse_args()
    workdir = os.path.abspath(
        tempfile.mkdtemp(prefix="treeckpt-bench-tiered-", dir=os.environ.get("BENCH_DIR", "."))
    )
    memdir = tempfile.mkdtemp(prefix="treeckpt-bench-tiered-", dir="/dev/shm")
    try:
        rows = []
        for world in args.ranks:
            arg = f"{workdir}|{memdir}|{int(args.quick)}|{args.rounds}|{args.shared_gbps}"
            res = run_on_ranks(world, _job, arg, workdir, timeout_s=1800)
            shutil.rmtree(memdir, ignore_errors=True)
            for sub in ("tc", "dcp"):
                shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
            rows.append((world, res))
        state = "GPT-2 quick (6x smaller)" if args.quick else "GPT-2 small"
        print(f"state: {state}, fp32 + AdamW, row-sharded; 2 nodes; median of {args.rounds} rounds")
        print(
            "| ranks | memory save, blocking s | memory save, total s | of which replication s "
            "| first restore of the process s | restore from memory s "
            "| restore, one node lost s | warm load (page cache), treeckpt s "
            "| cold load from disk, treeckpt s | cold load, DCP s "
            "| disk / memory | cold load, shared storage s | shared / memory "
            "| memory tier GB (all ranks) | staging GB | treeckpt on disk GB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for world, res in rows:

            def slowest(key: str, res: list[dict[str, float]] = res) -> float:
                return max(r[key] for r in res)

            def total(key: str, res: list[dict[str, float]] = res) -> float:
                return sum(r[key] for r in res) / 1e9

            ratio = slowest("disk_treeckpt") / slowest("restore_memory")
            has_shared = "shared_treeckpt" in res[0]
            shared_s = slowest("shared_treeckpt") if has_shared else float("nan")
            shared_ratio = shared_s / slowest("restore_memory")
            print(
                f"| {world} | {slowest('save_blocking'):.2f} | {slowest('save_total'):.2f} "
                f"| {slowest('save_replicate'):.2f} "
                f"| {slowest('restore_first'):.2f} "
                f"| {slowest('restore_memory'):.2f} | {slowest('restore_peer'):.2f} "
                f"| {slowest('warm_treeckpt'):.2f} | {slowest('disk_treeckpt'):.2f} | {slowest('disk_dcp'):.2f} | {ratio:.1f}x "
                f"| {shared_s:.2f} | {shared_ratio:.1f}x "
                f"| {total('memory_bytes'):.2f} | {total('staging_bytes'):.2f} "
                f"| {slowest('disk_bytes') / 1e9:.2f} |"
            )
        print()
        print("restore from memory, seconds by phase (slowest rank per phase, median of rounds):")
        for world, res in rows:
            phases = [k for k in res[0] if k.startswith("phase:")]
            parts = ", ".join(f"{k[6:]} {max(r[k] for r in res):.3f}" for k in phases)
            print(f"- {world} ranks: {parts}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(memdir, ignore_errors=True)


if __name__ == "__main__":
    main()

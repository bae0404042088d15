"""Multi-rank save and resharding load: treeckpt against DCP on the same state.

A stack of Linear layers with AdamW state, FSDP2-sharded over 2 ranks (gloo,
CPU), saved by each contender into an empty directory (the previous round's
removed untimed), and by treeckpt also over its previous checkpoint
("treeckpt-overwrite": the replaced files are removed after the commit, inside
the time) and by DCP over its previous files ("dcp-overwrite": the same file
names truncated and rewritten in place); then loaded on 3 ranks (resharding). Times are
the slowest rank's, medians over rounds; read amplification is treeckpt's
load plan (bytes of chunks touched / bytes needed).

    .venv/bin/python benchmarks/bench_multirank.py [--mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from benchlib.ranks import run_on_ranks

import treeckpt


def _model(mb: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, (mb << 20) // (3 * 4 * width * width))  # params + 2 Adam moments, fp32
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _sharded(mb: int, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(mb)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _timed(fn: Any) -> float:
    dist.barrier()
    t = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t


def _save_job(rank: int, world: int, arg: str) -> dict[str, float]:
    workdir, mb, rounds = arg.split("|")
    model, opt = _sharded(int(mb), world)
    out: dict[str, list[float]] = {
        "treeckpt": [],
        "treeckpt-overwrite": [],
        "dcp": [],
        "dcp-overwrite": [],
    }
    tc, dc = os.path.join(workdir, "tc"), os.path.join(workdir, "dcp")
    fresh = os.path.join(workdir, "tc-fresh")
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    tree = {"model": model, "optim": opt}
    for _ in range(int(rounds)):
        # Like DCP's below: into an empty directory, the last one removed untimed.
        if rank == 0:
            shutil.rmtree(fresh, ignore_errors=True)
        dist.barrier()
        out["treeckpt"].append(_timed(lambda: treeckpt.save(tree, fresh)))
        # Over the previous checkpoint: its files are removed after the commit, timed.
        out["treeckpt-overwrite"].append(_timed(lambda: treeckpt.save(tree, tc)))
        if rank == 0:
            shutil.rmtree(dc, ignore_errors=True)
        dist.barrier()
        out["dcp"].append(_timed(lambda: dcp.save(state, checkpoint_id=dc)))
        # In place over its previous files (same names, truncated: not atomic).
        with warnings.catch_warnings():  # "Detected an existing checkpoint ..., overwriting"
            warnings.simplefilter("ignore", UserWarning)
            out["dcp-overwrite"].append(
                _timed(lambda: dcp.save(state, checkpoint_id=os.path.join(workdir, "dcp-over")))
            )
    return {k: statistics.median(v) for k, v in out.items()}


def _load_job(rank: int, world: int, arg: str) -> dict[str, float]:
    workdir, mb, rounds = arg.split("|")
    model, opt = _sharded(int(mb), world)
    out: dict[str, list[float]] = {"treeckpt": [], "dcp": []}
    tc, dc = os.path.join(workdir, "tc"), os.path.join(workdir, "dcp")
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    for _ in range(int(rounds)):
        out["treeckpt"].append(_timed(lambda: treeckpt.load({"model": model, "optim": opt}, tc)))
        out["dcp"].append(_timed(lambda: dcp.load(state, checkpoint_id=dc)))
    return {k: statistics.median(v) for k, v in out.items()}


def _amplification(path: str, mb: int, world: int) -> float:
    info = treeckpt.metadata(path)
    specs = []
    for r in range(world):
        rank_specs = []
        for fqn, t in info.tensors.items():
            if not t.shape:
                rank_specs.append(
                    treeckpt.ShardSpec(
                        fqn=fqn,
                        dtype=t.dtype,
                        shape=t.shape,
                        boxes=(treeckpt.Box(offsets=(), sizes=()),),
                    )
                )
                continue
            per = -(-t.shape[0] // world)
            lo = min(t.shape[0], r * per)
            hi = min(t.shape[0], lo + per)
            box = treeckpt.Box(
                offsets=(lo, *(0,) * (len(t.shape) - 1)), sizes=(hi - lo, *t.shape[1:])
            )
            rank_specs.append(
                treeckpt.ShardSpec(fqn=fqn, dtype=t.dtype, shape=t.shape, boxes=(box,))
            )
        specs.append(rank_specs)
    plans = treeckpt.plan_reshard(path, specs)
    return sum(p.read_raw_bytes for p in plans) / sum(p.needed_bytes for p in plans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200, help="approximate state size in MB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = os.path.abspath(
        tempfile.mkdtemp(prefix="treeckpt-bench-mr-", dir=os.environ.get("BENCH_DIR", "."))
    )
    try:
        arg = f"{workdir}|{args.mb}|{args.rounds}"
        saves = run_on_ranks(2, _save_job, arg, workdir)
        loads = run_on_ranks(3, _load_job, arg, workdir)
        nbytes = sum(
            t.raw_bytes for t in treeckpt.metadata(os.path.join(workdir, "tc")).tensors.values()
        )
        amp = _amplification(os.path.join(workdir, "tc"), args.mb, 3)
        print(
            f"state: {nbytes / 1e6:.0f} MB (FSDP2, fp32 params + AdamW), median of {args.rounds} rounds"
        )
        print("| contender | save on 2 ranks s | GB/s | load 2->3 ranks s | GB/s |")
        print("|---|---|---|---|---|")
        for name in ("treeckpt", "treeckpt-overwrite", "dcp", "dcp-overwrite"):
            s = max(x[name] for x in saves)
            if name in loads[0]:
                lo = max(x[name] for x in loads)
                load_cols = f"{lo:.2f} | {nbytes / lo / 1e9:.2f}"
            else:
                load_cols = "| "
            print(f"| {name} | {s:.2f} | {nbytes / s / 1e9:.2f} | {load_cols} |")
        print(f"treeckpt 2->3 read amplification: {amp:.3f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training step time while a save runs in the background: THREAD against PROCESS.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_async_process.py [--mb 48] [--rounds 2]

On 2 gloo ranks (fork, one torch thread each), each rank trains a small MLP
in the foreground and ``treeckpt.dcp.async_save``\\ s a state of ``--mb`` MB
per rank (float32 noise, which compression cannot shrink, so the save
spends its time in checksums, compression attempts and I/O). For each
``async_checkpointer_type`` the step times measured while the save runs are
compared with steps without a save. The first PROCESS save also starts the
checkpoint processes; it is run once before the rounds measured.

Prints one JSON document: medians per mode (step time without a save, step
time during the save, slowdown, save time until the future is done).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib.ranks import run_on_ranks

REPO_ROOT = Path(__file__).resolve().parent.parent


def _job(rank: int, world: int, arg: dict[str, Any]) -> dict[str, Any]:
    import treeckpt.dcp as dcp
    from treeckpt.dcp.state_dict_saver import AsyncCheckpointerType

    torch.manual_seed(rank)
    w = arg["width"]
    model = torch.nn.Sequential(
        torch.nn.Linear(w, 4 * w), torch.nn.ReLU(), torch.nn.Linear(4 * w, w)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, w)

    def step() -> float:
        start = time.perf_counter()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    n = arg["mb"] * 2**20 // 4 // 8
    state = {f"r{rank}.t{i}": torch.randn(n) for i in range(8)}
    root = Path(arg["workdir"])
    for _ in range(20):
        step()
    quiet = [step() for _ in range(60)]

    def during(kind: AsyncCheckpointerType, name: str) -> tuple[list[float], float]:
        torch.distributed.barrier()
        start = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=root / name, async_checkpointer_type=kind)
        times = []
        while not fut.done():
            times.append(step())
        fut.result()
        return times, time.perf_counter() - start

    out: dict[str, Any] = {
        "quiet_step_s": statistics.median(quiet),
        "quiet_p95_step_s": statistics.quantiles(quiet, n=20)[-1],
    }
    during(AsyncCheckpointerType.PROCESS, "warm")  # starts the checkpoint processes
    for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
        steps: list[float] = []
        saves: list[float] = []
        for r in range(arg["rounds"]):
            times, took = during(kind, f"{kind.value}-{r}")
            steps += times
            saves.append(took)
        out[kind.value] = {
            "steps_during_save": len(steps),
            "step_s": statistics.median(steps) if steps else None,
            "mean_step_s": statistics.fmean(steps) if steps else None,
            "p95_step_s": statistics.quantiles(steps, n=20)[-1] if len(steps) > 1 else None,
            "save_s": statistics.median(saves),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=48, help="MB saved per rank (default 48)")
    p.add_argument("--rounds", type=int, default=2, help="saves per mode (default 2)")
    p.add_argument(
        "--width",
        type=int,
        default=64,
        help="MLP width (default 64: small steps, where the interpreter's time dominates)",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-async-process-") as workdir:
        arg = {"mb": args.mb, "rounds": args.rounds, "width": args.width, "workdir": workdir}
        results = run_on_ranks(2, _job, arg, workdir, timeout_s=300)
    report: dict[str, Any] = {
        "mb_per_rank": args.mb,
        "rounds": args.rounds,
        "width": args.width,
        "cpus": os.cpu_count(),
    }
    quiet = statistics.median(r["quiet_step_s"] for r in results)
    report["quiet_step_ms"] = round(quiet * 1e3, 3)
    report["quiet_p95_step_ms"] = round(
        statistics.median(r["quiet_p95_step_s"] for r in results) * 1e3, 3
    )
    for kind in ("thread", "process"):
        step = statistics.median(r[kind]["step_s"] for r in results if r[kind]["step_s"])

        def ms(key: str, kind: str = kind) -> float:
            return round(statistics.median(r[kind][key] for r in results) * 1e3, 3)

        report[kind] = {
            "step_ms_during_save": round(step * 1e3, 3),
            "mean_step_ms_during_save": ms("mean_step_s"),
            "p95_step_ms_during_save": ms("p95_step_s"),
            "slowdown": round(step / quiet, 2),
            "save_s": round(statistics.median(r[kind]["save_s"] for r in results), 2),
            "steps_during_save": sum(r[kind]["steps_during_save"] for r in results),
        }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT / "src"))
    raise SystemExit(main())

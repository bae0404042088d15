#!/usr/bin/env python
"""How long does an asynchronous save block training? treeckpt.async_save vs DCP's async_save.

    .venv/bin/python benchmarks/bench_async.py [--state fp32] [--rounds 3] [--quick] [--device cpu|cuda]

On one process (a gloo group of one, as a training job would have), for a
GPT-2-small + AdamW state:

- copy floor: copying every tensor into host buffers allocated and touched
  beforehand (on CUDA: device to pinned host memory, non-blocking, one synchronisation);
  no asynchronous save can block for less;
- treeckpt ``async_save``: time until it returns (first save: buffers
  allocated, plan computed; later saves: buffers and plan reused), then until
  the checkpoint is committed; and the part of the blocking time that is
  not its copy (``SaveFuture.blocked_s - SaveFuture.copy_s``);
- DCP ``async_save`` with its defaults, the same two times.

Medians over the rounds go to ``benchmarks/results/async-<device>-<state>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from benchlib.contenders import import_treeckpt
from benchlib.measure import fsync_tree, release_memory
from benchlib.report import environment
from benchlib.state import GPT2_QUICK, GPT2_SMALL, STATE_DTYPES, build_state
from benchlib.tree import iter_tensors, map_tensors, tensor_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent


def copy_floor(state: Any, device: str) -> float:
    """Seconds to copy every tensor into host buffers allocated beforehand."""
    pin = device == "cuda"
    bufs = [torch.empty_like(t, device="cpu", pin_memory=pin) for t in iter_tensors(state)]
    for buf in bufs:
        buf.zero_()  # touch every page first: the floor is the copy, not page faults
    start = time.perf_counter()
    for buf, t in zip(bufs, iter_tensors(state), strict=True):
        buf.copy_(t, non_blocking=pin)
    if pin:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def settle(path: str) -> None:
    """Delete a checkpoint and let the machine settle: the file system's deferred work
    (freeing 1.5 GB of blocks) would otherwise run during the next contender's copy."""
    shutil.rmtree(path)
    os.sync()
    release_memory()
    time.sleep(1.0)


def timed(fn: Any) -> tuple[float, float, Any]:
    """(seconds until ``fn`` returns its future, seconds until the future is done, the future)."""
    start = time.perf_counter()
    fut = fn()
    blocked = time.perf_counter() - start
    fut.result()
    return blocked, time.perf_counter() - start, fut


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--state", choices=sorted(STATE_DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "bench-tmp"))
    args = parser.parse_args(argv)

    treeckpt, note = import_treeckpt(REPO_ROOT)
    assert treeckpt is not None, note
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="async-", dir=args.workdir)
    dist.init_process_group("gloo", init_method=f"file://{run_dir}/rdv", rank=0, world_size=1)
    state = build_state(GPT2_QUICK if args.quick else GPT2_SMALL, STATE_DTYPES[args.state], 0)
    if args.device == "cuda":
        state = map_tensors(state, lambda t: t.cuda())
    nbytes = tensor_bytes(state)
    print(f"{nbytes / 1e9:.2f} GB on {args.device}", file=sys.stderr, flush=True)

    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "copy_floor_s",
            "treeckpt_first_blocked_s",
            "treeckpt_blocked_s",
            "treeckpt_copy_s",
            "treeckpt_beyond_copy_s",
            "treeckpt_total_s",
            "dcp_blocked_s",
            "dcp_total_s",
        )
    }
    try:
        saver = treeckpt.AsyncSaver()
        for r in range(args.rounds):
            rows["copy_floor_s"].append(copy_floor(state, args.device))
            release_memory()
            path = os.path.join(run_dir, f"t{r}")
            if r == 0:  # the first save allocates its buffers; later ones reuse them
                first, _, _ = timed(lambda p=path: saver.save(state, p + "-first"))
                rows["treeckpt_first_blocked_s"].append(first)
                settle(path + "-first")
            blocked, total, fut = timed(lambda p=path: saver.save(state, p))
            fsync_tree(path)
            rows["treeckpt_blocked_s"].append(blocked)
            # The copy as the saver timed it, and the rest of the blocking time:
            # flattening, describing, planning (robust to a machine shared with other work).
            rows["treeckpt_copy_s"].append(fut.copy_s)
            rows["treeckpt_beyond_copy_s"].append(blocked - fut.copy_s)
            rows["treeckpt_total_s"].append(total)
            settle(path)
            path = os.path.join(run_dir, f"d{r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                blocked, total, _ = timed(lambda p=path: dcp.async_save(state, checkpoint_id=p))
            fsync_tree(path)
            rows["dcp_blocked_s"].append(blocked)
            rows["dcp_total_s"].append(total)
            settle(path)
            print(
                f"round {r + 1}: copy {rows['copy_floor_s'][-1]:.3f} s, treeckpt blocked "
                f"{rows['treeckpt_blocked_s'][-1]:.3f} s, DCP blocked {rows['dcp_blocked_s'][-1]:.3f} s",
                file=sys.stderr,
                flush=True,
            )
        saver.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        dist.destroy_process_group()

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    report = {
        "benchmark": "bench_async",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "state": args.state,
        "state_bytes": nbytes,
        "rounds": args.rounds,
        "treeckpt": note,
        "environment": environment(REPO_ROOT, args.workdir),
        "runs": rows,
        "medians": med,
    }
    suffix = "-quick" if args.quick else ""
    out = REPO_ROOT / "benchmarks" / "results" / f"async-{args.device}-{args.state}{suffix}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    floor = med["copy_floor_s"]
    print("| | blocks training (s) | x copy floor | until committed (s) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| copy floor | {floor:.3f} | 1.00x | |")
    print(
        f"| treeckpt async_save, first | {med['treeckpt_first_blocked_s']:.3f} | "
        f"{med['treeckpt_first_blocked_s'] / floor:.2f}x | |"
    )
    print(
        f"| treeckpt async_save | {med['treeckpt_blocked_s']:.3f} | "
        f"{med['treeckpt_blocked_s'] / floor:.2f}x | {med['treeckpt_total_s']:.2f} |"
    )
    print(
        f"| DCP async_save (defaults) | {med['dcp_blocked_s']:.3f} | "
        f"{med['dcp_blocked_s'] / floor:.2f}x | {med['dcp_total_s']:.2f} |"
    )
    print(
        f"\ntreeckpt async_save: {med['treeckpt_copy_s']:.3f} s copying, "
        f"{med['treeckpt_beyond_copy_s'] * 1e3:.0f} ms beyond the copy (flatten, describe, plan)"
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

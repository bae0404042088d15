"""Incremental saves in a fine-tuning run: bytes written and save time, full vs incremental.

A stack of Linear layers (the frozen backbone, most of the parameters) and a
trainable head with AdamW state. Each step trains the head on random data,
then the same state is saved by two CheckpointManagers, one writing every
step in full and one incremental (unchanged chunks referenced), alternating
which goes first. Bytes written are the sizes of the files each step adds;
times are per save (durable: fsync on), median over the steps after the
first (the first step is a full save for both).

    .venv/bin/python benchmarks/bench_incremental.py [--mb 200] [--steps 6] [--trainable 0.05]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import treeckpt
from treeckpt.manager import CheckpointManager


def _run(mb: int, trainable: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 1024
    layer_bytes = 4 * width * (width + 1)
    layers = max(1, (mb << 20) // layer_bytes)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for p in backbone.parameters():
        p.requires_grad_(False)
    # head: about ``trainable`` of the backbone's size, with two Adam moments each
    head_width = max(1, int(layers * width * trainable))
    head = torch.nn.Linear(width, head_width)
    model = torch.nn.Sequential(backbone, head)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    return model, opt


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 1024)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _step_bytes(root: Path, step: int) -> int:
    d = root / f"step-{step:010d}"
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="backbone size in MiB (fp32)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--trainable", type=float, default=0.05, help="head size / backbone size")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model, opt = _run(args.mb, args.trainable)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    head = sum(p.numel() * p.element_size() for p in model[1].parameters())
    base = Path(tempfile.mkdtemp(prefix="bench-incr-", dir=args.dir))
    roots = {"full": base / "full", "incremental": base / "incremental"}
    managers = {
        "full": CheckpointManager(roots["full"], incremental=False),
        "incremental": CheckpointManager(roots["incremental"], incremental=True),
    }
    times: dict[str, list[float]] = {k: [] for k in managers}
    sizes: dict[str, list[int]] = {k: [] for k in managers}
    try:
        for step in range(1, args.steps + 1):
            _train_step(model, opt)
            state: dict[str, Any] = {"model": model, "optim": opt, "step": step}
            order = list(managers) if step % 2 else list(reversed(managers))
            for name in order:
                t0 = time.perf_counter()
                managers[name].save(step, state)
                times[name].append(time.perf_counter() - t0)
                sizes[name].append(_step_bytes(roots[name], step))
        # the incremental run restores bit-exactly
        got = treeckpt.restore(managers["incremental"].step_path(args.steps))
        want = model.state_dict()
        assert all(torch.equal(got["model"][k], v) for k, v in want.items())
    finally:
        for m in managers.values():
            m.close()
        shutil.rmtree(base, ignore_errors=True)
    mib = 1 << 20
    print(
        f"state: {total / mib:.0f} MiB of parameters ({head / mib:.1f} MiB trainable head, "
        f"+{2 * head / mib:.1f} MiB AdamW moments), {args.steps} steps, fsync on"
    )
    print(f"{'':12} {'step 1 MiB':>11} {'later MiB':>10} {'step 1 s':>9} {'later s':>8}")
    for name in managers:
        later_b = statistics.median(sizes[name][1:]) if args.steps > 1 else float("nan")
        later_t = statistics.median(times[name][1:]) if args.steps > 1 else float("nan")
        print(
            f"{name:12} {sizes[name][0] / mib:11.1f} {later_b / mib:10.1f} "
            f"{times[name][0]:9.2f} {later_t:8.2f}"
        )
    f_b, i_b = statistics.median(sizes["full"][1:]), statistics.median(sizes["incremental"][1:])
    f_t, i_t = statistics.median(times["full"][1:]), statistics.median(times["incremental"][1:])
    print(f"incremental writes {f_b / max(i_b, 1):.1f}x fewer bytes, saves {f_t / i_t:.1f}x faster")


if __name__ == "__main__":
    main()

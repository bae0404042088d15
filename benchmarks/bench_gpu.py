#!/usr/bin/env python
"""CUDA state through treeckpt against DCP: one markdown table per section.

    python benchmarks/bench_gpu.py {save,async,load} [--gib 4] [--rounds 2] [--out FILE.md]
                                   [--device cuda|cpu] [--workdir DIR]

The state: bf16 tensors on the device (4096 x 4096 matrices and a 4096-vector
each), ``--gib`` GiB in all, random values (they barely compress). One
process, a gloo group of one (as a training job would have).

- ``save``: the copy floors (device to pinned host buffers allocated and
  touched beforehand, non-blocking, one synchronisation; device to pageable
  memory with ``.cpu()``), then ``treeckpt.save`` (each writer lane copies
  its chunks through two reused pinned buffers, the next one while the
  current one is compressed and written; defaults, and ``io_threads=8``) and
  DCP ``save`` (defaults, and ``thread_count=8``); every save is fsynced
  inside its time. The last treeckpt checkpoint is loaded back and compared
  bit for bit.
- ``async``: how long ``treeckpt.AsyncSaver.save`` blocks (the first save
  allocates its pinned buffers, later ones reuse them) and how long DCP's
  ``async_save`` blocks, against the pinned copy floor of the same bytes; and
  the time until committed.
- ``load``: cold loads (page cache dropped) into a template on the device,
  ``treeckpt.load`` against DCP ``load``, each checked bit for bit.

Each section appends its table to ``--out`` (the device name, torch version
and command above it) and prints it. ``--device cpu`` runs the same code on
CPU tensors (a smoke test of the script; no pinned memory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from benchlib.contenders import import_treeckpt
from benchlib.measure import drop_page_cache, fsync_tree, release_memory
from torch.distributed.checkpoint import FileSystemWriter

REPO_ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
SIDE = 4096


def build_state(gib: float, device: str) -> dict[str, torch.Tensor]:
    """``gib`` GiB of bf16 matrices (and one vector each) on ``device``, seeded."""
    per = SIDE * SIDE * 2
    n = max(1, round(gib * GiB / per))
    side = SIDE if gib * GiB >= per else max(8, int((gib * GiB / 2) ** 0.5))
    g = torch.Generator(device=device).manual_seed(0)
    state = {}
    for i in range(n):
        w = torch.randn(side, side, device=device, generator=g)
        state[f"layers.{i}.weight"] = w.to(torch.bfloat16)
        del w
        b = torch.randn(side, device=device, generator=g)
        state[f"layers.{i}.bias"] = b.to(torch.bfloat16)
    sync(device)
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


_PINNED: list[torch.Tensor] = []


def pinned_floor(state: dict[str, torch.Tensor], device: str) -> float:
    """Seconds to copy every tensor into host buffers allocated and touched beforehand."""
    pin = device == "cuda"
    if not _PINNED:
        _PINNED.extend(torch.empty_like(t, device="cpu", pin_memory=pin) for t in state.values())
        for buf in _PINNED:
            buf.zero_()  # the floor is the copy, not page faults
    sync(device)
    start = time.perf_counter()
    for buf, t in zip(_PINNED, state.values(), strict=True):
        buf.copy_(t, non_blocking=pin)
    sync(device)
    return time.perf_counter() - start


def pageable_copy(state: dict[str, torch.Tensor], device: str) -> float:
    """Seconds for ``.cpu()`` of every tensor (fresh pageable memory)."""
    sync(device)
    start = time.perf_counter()
    out = [t.cpu() for t in state.values()]
    sync(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def settle(path: str) -> None:
    """Remove a checkpoint and let the file system's deferred work finish before the next one."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    release_memory()
    time.sleep(0.5)


def timed_save(fn: Callable[[str], Any], path: str, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn(path)
    fsync_tree(path)
    return time.perf_counter() - start


class Table:
    def __init__(self, title: str, header: list[str]) -> None:
        self.title = title
        self.header = header
        self.rows: list[list[str]] = []
        self.notes: list[str] = []

    def row(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self, context: str) -> str:
        lines = [f"### {self.title}", "", context, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.header) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n\n"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}" if len(xs) > 1 else ""


def section_save(tk: Any, state: dict[str, torch.Tensor], a: argparse.Namespace) -> Table:
    size = nbytes(state)
    runs: dict[str, list[float]] = {}
    contenders: dict[str, Callable[[str], Any]] = {
        "treeckpt.save (defaults)": lambda p: tk.save(state, p),
        "treeckpt.save (io_threads=8)": lambda p: tk.save(
            state, p, options=tk.SaveOptions(io_threads=8)
        ),
        "DCP save (defaults)": lambda p: dcp.save(state, checkpoint_id=p),
        "DCP save (thread_count=8)": lambda p: dcp.save(
            state, storage_writer=FileSystemWriter(p, thread_count=8)
        ),
    }
    names = list(contenders)
    for r in range(a.rounds):
        runs.setdefault("device -> pinned copy (floor)", []).append(pinned_floor(state, a.device))
        runs.setdefault("device -> pageable copy (.cpu())", []).append(
            pageable_copy(state, a.device)
        )
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated each round
            path = os.path.join(a.run_dir, f"save-{r}-{names.index(name)}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.setdefault(name, []).append(timed_save(contenders[name], path, a.device))
            if not (r == a.rounds - 1 and name == names[0]):
                settle(path)
        print(f"save round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    last = os.path.join(a.run_dir, f"save-{a.rounds - 1}-0")
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    tk.load(back, last)
    ok = same_bits(state, back)
    settle(last)
    floor = med(runs["device -> pinned copy (floor)"])
    table = Table(
        "Sync save of device state", ["what", "median s", "GB/s", "x pinned floor", "range s"]
    )
    for name, xs in runs.items():
        m = med(xs)
        table.row(name, f"{m:.3f}", f"{size / m / 1e9:.2f}", f"{m / floor:.1f}x", spread(xs))
    table.notes.append(f"treeckpt checkpoint loaded back bit-exact: {'yes' if ok else 'NO'}")
    if not ok:
        raise SystemExit(table.markdown("") + "bit mismatch after treeckpt.save/load")
    return table


def section_async(tk: Any, state: dict[str, torch.Tensor], a: argparse.Namespace) -> Table:
    size = nbytes(state)
    runs: dict[str, list[float]] = {}
    saver = tk.AsyncSaver()

    def run(name: str, fn: Callable[[str], Any], path: str) -> Any:
        sync(a.device)
        start = time.perf_counter()
        fut = fn(path)
        blocked = time.perf_counter() - start
        # DCP returns a response with two futures when it stages asynchronously.
        done = getattr(fut, "upload_completion", fut)
        done.result()
        fsync_tree(path)
        total = time.perf_counter() - start
        runs.setdefault(f"{name}: blocks training", []).append(blocked)
        runs.setdefault(f"{name}: until committed", []).append(total)
        return fut

    first = os.path.join(a.run_dir, "async-first")
    save = lambda p: saver.save(state, p)  # noqa: E731
    fut = run("treeckpt async_save, first (allocates pinned buffers)", save, first)
    settle(first)
    for r in range(a.rounds):
        runs.setdefault("device -> pinned copy (floor)", []).append(pinned_floor(state, a.device))
        path = os.path.join(a.run_dir, f"async-t{r}")
        fut = run("treeckpt async_save", save, path)
        runs.setdefault("treeckpt async_save: of which copying", []).append(fut.copy_s)
        if r < a.rounds - 1:
            settle(path)
        path = os.path.join(a.run_dir, f"async-d{r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run("DCP async_save (defaults)", lambda p: dcp.async_save(state, checkpoint_id=p), path)
        settle(path)
        print(f"async round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    host = saver.host_bytes
    saver.close()
    last = os.path.join(a.run_dir, f"async-t{a.rounds - 1}")
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    tk.load(back, last)
    ok = same_bits(state, back)
    settle(last)
    floor = med(runs["device -> pinned copy (floor)"])
    table = Table(
        "Asynchronous save: time training is blocked",
        ["what", "median s", "x pinned floor", "GB/s", "range s"],
    )
    order = sorted(runs, key=lambda k: (not k.startswith("device"), "until" in k))
    for name in order:
        m = med(runs[name])
        table.row(
            name, f"{m:.3f}", f"{m / floor:.2f}x", f"{size / m / 1e9:.2f}", spread(runs[name])
        )
    blocked = med(runs["treeckpt async_save: blocks training"])
    table.notes.append(
        f"target: treeckpt blocks <= 1.2x the pinned floor: {blocked / floor:.2f}x "
        f"({'met' if blocked <= 1.2 * floor else 'NOT met'}); staging buffers held: "
        f"{host / GiB:.2f} GiB; checkpoint loaded back bit-exact: {'yes' if ok else 'NO'}"
    )
    if not ok:
        raise SystemExit(table.markdown("") + "bit mismatch after async_save")
    return table


def section_load(tk: Any, state: dict[str, torch.Tensor], a: argparse.Namespace) -> Table:
    size = nbytes(state)
    t_path = os.path.join(a.run_dir, "load-t")
    d_path = os.path.join(a.run_dir, "load-d")
    tk.save(state, t_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=d_path)
    fsync_tree(t_path)
    fsync_tree(d_path)
    template = {k: torch.zeros_like(v) for k, v in state.items()}
    contenders: dict[str, tuple[str, Callable[[], Any]]] = {
        "treeckpt.load (defaults)": (t_path, lambda: tk.load(template, t_path)),
        "treeckpt.load (io_threads=8)": (
            t_path,
            lambda: tk.load(template, t_path, options=tk.LoadOptions(io_threads=8)),
        ),
        "DCP load (defaults)": (d_path, lambda: dcp.load(template, checkpoint_id=d_path)),
    }
    runs: dict[str, list[float]] = {}
    checked: dict[str, bool] = {}
    for r in range(a.rounds):
        for name, (path, fn) in contenders.items():
            for t in template.values():
                t.zero_()
            drop_page_cache(path)
            release_memory()
            sync(a.device)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
            sync(a.device)
            runs.setdefault(name, []).append(time.perf_counter() - start)
            checked[name] = same_bits(state, template)
        print(f"load round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    settle(t_path)
    settle(d_path)
    table = Table(
        f"Cold load into {a.device} tensors", ["what", "median s", "GB/s", "range s", "bit-exact"]
    )
    for name, xs in runs.items():
        m = med(xs)
        table.row(
            name, f"{m:.3f}", f"{size / m / 1e9:.2f}", spread(xs), "yes" if checked[name] else "NO"
        )
    if not all(checked.values()):
        raise SystemExit(table.markdown("") + "bit mismatch after a load")
    return table


SECTIONS = {"save": section_save, "async": section_async, "load": section_load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=None, help="markdown file the table is appended to")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "bench-tmp"))
    a = parser.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA", file=sys.stderr)
        return 2
    tk, note = import_treeckpt(REPO_ROOT)
    assert tk is not None, note
    note = note.replace(str(REPO_ROOT) + os.sep, "")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    a.run_dir = tempfile.mkdtemp(prefix=f"gpu-{a.section}-", dir=a.workdir)
    dist.init_process_group("gloo", init_method=f"file://{a.run_dir}/rdv", rank=0, world_size=1)
    try:
        state = build_state(a.gib, a.device)
        size = nbytes(state)
        name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
        print(f"{size / GiB:.2f} GiB bf16 on {name}", file=sys.stderr, flush=True)
        table = SECTIONS[a.section](tk, state, a)
    finally:
        shutil.rmtree(a.run_dir, ignore_errors=True)
        dist.destroy_process_group()
    cmd = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    context = (
        f"Device: {name}; torch {torch.__version__}"
        + (f" (CUDA {torch.version.cuda})" if a.device == "cuda" else "")
        + f"; {os.cpu_count()} CPU cores; state {size / GiB:.2f} GiB bf16 in {len(state)} tensors; "
        f"{note}; medians of {a.rounds} rounds.\n\nCommand: `{cmd}`"
    )
    text = table.markdown(context)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

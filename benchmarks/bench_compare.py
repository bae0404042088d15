#!/usr/bin/env python
"""The whole comparison in one command: treeckpt against honest floors and the best of its peers.

    .venv/bin/python benchmarks/bench_compare.py [--quick] [--rounds 3] [--throttle 0.2]

For each state (fp32, bf16) and each storage (the local disk, then the same
disk throttled to ``--throttle`` GB/s per rank, one link shared by every
thread, applied to every contender alike), ``bench_single.py`` runs
interleaved rounds of: treeckpt (defaults: adaptive compression), treeckpt
writing raw, treeckpt with the fixed-ratio ``mode="auto"``, DCP with 1, 2, 4
and 8 writer threads (the best is reported), DCP's zstd extension,
safetensors, and the two floors (one file, one thread; as many threads and
files as treeckpt uses). Each configuration prints its tables; a summary
follows, every figure named against its floor.

``--quick``: the ~6x smaller state, one round, and a smaller set of
contenders (under two minutes on 2 cores). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import bench_single
from benchlib.report import GB, best_dcp

REPO_ROOT = Path(__file__).resolve().parent.parent

FULL = (
    "treeckpt,treeckpt-raw,treeckpt-auto,dcp,dcp-threads2,dcp-threads4,dcp-threads8,dcp-zstd,"
    "safetensors,disk-floor,disk-floor-parallel"
)
QUICK = "treeckpt,treeckpt-raw,dcp,dcp-threads8,dcp-zstd,safetensors,disk-floor-parallel"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small state, 1 round, fewer contenders"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--throttle", type=float, default=0.2, help="GB/s of the throttled storage (default 0.2)"
    )
    parser.add_argument("--states", default="fp32,bf16", help="comma-separated (default fp32,bf16)")
    parser.add_argument("--contenders", default=None, help="override the contender list")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "bench-tmp"))
    parser.add_argument(
        "--out-dir",
        default=str(REPO_ROOT / "benchmarks" / "results"),
        help="where the per-configuration JSON files go (compare-{state}-{storage}[-quick].json)",
    )
    return parser.parse_args(argv)


def summary_rows(report: dict[str, Any], storage: str) -> list[str]:
    """treeckpt's rows of the summary: against the parallel floor and DCP's best."""
    entries = report["contenders"]
    floor = entries.get("disk-floor-parallel") or entries.get("disk-floor")
    best = best_dcp(report, "save_s")
    rows = []
    for key in ("treeckpt", "treeckpt-raw", "treeckpt-auto", "dcp-zstd", "safetensors"):
        if key not in entries:
            continue
        s = entries[key]["summary"]
        save = s["save_s"]["median"]
        raw = entries.get("treeckpt-raw")
        rows.append(
            f"| {report['state']} | {storage} | {entries[key]['label']} | {save:.3f} "
            f"| {save / floor['summary']['save_s']['median']:.2f}x "
            + (f"| {save / raw['summary']['save_s']['median']:.2f}x " if raw else "| — ")
            + (f"| {best[1] / save:.2f}x ({entries[best[0]]['label']}) " if best else "| — ")
            + f"| {s['size_bytes']['median'] / report['state_bytes']:.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    contenders = args.contenders or (QUICK if args.quick else FULL)
    out_dir = Path(args.out_dir)
    rows: list[str] = []
    for storage, throttle in (("disk", None), (f"throttled {args.throttle:g} GB/s", args.throttle)):
        for state in args.states.split(","):
            tag = "disk" if throttle is None else f"throttle{throttle:g}"
            out = out_dir / f"compare-{state}-{tag}{'-quick' if args.quick else ''}.json"
            argv_single = [
                "--state",
                state,
                "--rounds",
                str(rounds),
                "--contenders",
                contenders,
                "--workdir",
                args.workdir,
                "--out",
                str(out),
            ]
            if args.quick:
                argv_single.append("--quick")
            if throttle is not None:
                argv_single += ["--throttle", str(throttle)]
            print(f"\n## {state}, {storage}\n", flush=True)
            code = bench_single.main(argv_single)
            if code:
                return code
            rows += summary_rows(json.loads(out.read_text()), storage)
    print("\n## Summary: durable save\n")
    print(
        "Save time / the parallel disk floor's (same storage, same run), / treeckpt writing raw, "
        "and DCP's best thread count time / this time; size / state bytes.\n"
    )
    print(
        "| state | storage | contender | save s | x floor | x treeckpt raw | DCP best / this | size |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n(state bytes: GB = {GB:.0e} B; JSON per configuration in {out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Single-process checkpoint benchmark: treeckpt vs DCP vs torch.save on a GPT-2-small + AdamW state.

    .venv/bin/python benchmarks/bench_single.py [--state fp32|bf16|both] [--rounds 5] [--quick]

Every contender saves, cold-loads and warm-loads the same in-memory state in
the same process, interleaved round by round. See benchmarks/README.md for
what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from benchlib import throttle
from benchlib.contenders import (
    ALL_CONTENDER_KEYS,
    DEFAULT_CONTENDER_KEYS,
    Contender,
    import_treeckpt,
    make_contenders,
)
from benchlib.measure import RSS_SAMPLE_INTERVAL_S, release_memory
from benchlib.report import build_report, environment, markdown
from benchlib.runner import run_rounds, warm_up
from benchlib.state import GPT2_QUICK, GPT2_SMALL, GPT2_TINY, STATE_DTYPES, ModelShape, build_state
from benchlib.tree import Tree, tensor_bytes, tensor_count

REPO_ROOT = Path(__file__).resolve().parent.parent

METHOD = {
    "durable_save": "contender save call + fsync of every file and directory under the checkpoint "
    "and of its parent directory, timed together",
    "cold_load": "before timing: fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every checkpoint file; "
    "load into a template allocated (zero-filled) before timing",
    "warm_load": "same load again right after the cold one, into a fresh template",
    "peak_extra_rss": f"psutil RSS sampled every {RSS_SAMPLE_INTERVAL_S * 1e3:.0f} ms in a background thread; "
    "peak minus RSS at start, after gc.collect() + malloc_trim(0)",
    "interleaving": "round r runs contenders starting from index r mod n; checkpoint deleted and os.sync() "
    "before the next measurement",
    "warm_up": "before the rounds, every contender saves, loads and verifies a tiny state of the same "
    "layout once, untimed (disable with --no-warmup)",
    "verification": "after every load, outside the timed region: dtype, shape and raw bytes of every tensor "
    "and equality of every other leaf",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--state",
        choices=["fp32", "bf16", "both"],
        default="fp32",
        help="state dtype (default fp32)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="~6x smaller model, for smoke tests")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic state (default 0)"
    )
    parser.add_argument(
        "--workdir",
        default=str(REPO_ROOT / "bench-tmp"),
        help="where checkpoints are written, in a temporary subdirectory removed afterwards (default ./bench-tmp)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output path; '{state}' is replaced by fp32/bf16 (default "
        "benchmarks/results/single-{state}.json, single-{state}-quick.json with --quick)",
    )
    parser.add_argument(
        "--throttle",
        type=float,
        default=None,
        metavar="GBPS",
        help="model slow storage: every contender's reads and writes share one link of GBPS GB/s "
        "(treeckpt through ThrottledBackend, DCP through FsspecWriter/Reader on a throttled "
        "fsspec file system, the others' bytes charged to the same link)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed save/load of a tiny state per contender",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDER_KEYS),
        help=(
            f"comma-separated subset of {','.join(ALL_CONTENDER_KEYS)} "
            f"(default {','.join(DEFAULT_CONTENDER_KEYS)})"
        ),
    )
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.throttle is not None and not args.throttle > 0:
        parser.error("--throttle must be a positive rate in GB/s")
    unknown = set(_selected_keys(args)) - set(ALL_CONTENDER_KEYS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if args.state == "both" and args.out is not None and "{state}" not in args.out:
        parser.error("--state both needs '{state}' in --out")


def _selected_keys(args: argparse.Namespace) -> list[str]:
    return [key.strip() for key in args.contenders.split(",") if key.strip()]


def output_path(args: argparse.Namespace, state_name: str) -> Path:
    pattern = args.out
    if pattern is None:
        suffix = ("-quick" if args.quick else "") + (
            f"-throttle{args.throttle:g}" if args.throttle else ""
        )
        pattern = str(REPO_ROOT / "benchmarks" / "results" / f"single-{{state}}{suffix}.json")
    return Path(pattern.replace("{state}", state_name))


def model_shape(args: argparse.Namespace) -> ModelShape:
    return GPT2_QUICK if args.quick else GPT2_SMALL


@dataclasses.dataclass(frozen=True)
class LibraryInfo:
    """What the report says about the treeckpt under test."""

    note: str
    source_sha256: str | None


def source_digest(module: ModuleType | None) -> str | None:
    """sha256 over the library's .py files (paths and contents): identifies uncommitted code."""
    if module is None or not getattr(module, "__file__", None):
        return None
    root = Path(str(module.__file__)).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def report_header(
    args: argparse.Namespace, state_name: str, state: Tree, library: LibraryInfo
) -> dict[str, Any]:
    shape = model_shape(args)
    return {
        "benchmark": "bench_single",
        "state": state_name,
        "quick": args.quick,
        "rounds": args.rounds,
        "seed": args.seed,
        "warm_up": not args.no_warmup,
        "throttle_gbps": args.throttle,
        "model_shape": dataclasses.asdict(shape),
        "state_bytes": tensor_bytes(state),
        "tensor_count": tensor_count(state),
        "treeckpt": library.note,
        "treeckpt_source_sha256": library.source_sha256,
        "method": METHOD,
        "environment": environment(REPO_ROOT, args.workdir),
    }


def bench_state(
    args: argparse.Namespace,
    state_name: str,
    contenders: list[Contender],
    run_dir: str,
    library: LibraryInfo,
) -> None:
    """Build one state, run all rounds on it, print the tables and write the JSON."""
    print(f"building {state_name} state (seed {args.seed}) ...", file=sys.stderr, flush=True)
    state = build_state(model_shape(args), STATE_DTYPES[state_name], args.seed)
    header = report_header(args, state_name, state, library)
    print(
        f"{state_name}: {header['state_bytes'] / 1e9:.3f} GB in {header['tensor_count']} tensors; "
        f"{args.rounds} rounds of {', '.join(c.key for c in contenders)}",
        file=sys.stderr,
        flush=True,
    )
    results, orders = run_rounds(contenders, state, run_dir, args.rounds)
    report = build_report(
        contenders=contenders,
        results=results,
        orders=orders,
        header=header,
        state_bytes=header["state_bytes"],
    )
    del state
    release_memory()
    out = output_path(args, state_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwritten: {out}\n", flush=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    throttle.configure(args.throttle)
    # SIGTERM unwinds like Ctrl-C, so the checkpoints under --workdir are removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    treeckpt_module, note = import_treeckpt(REPO_ROOT)
    print(note, file=sys.stderr, flush=True)
    library = LibraryInfo(note, source_digest(treeckpt_module))
    contenders = make_contenders(treeckpt_module, _selected_keys(args))
    if not contenders:
        print("no contender to run", file=sys.stderr)
        return 2
    created_workdir = not os.path.isdir(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="bench-single-", dir=args.workdir)
    try:
        if not args.no_warmup:
            print(
                "warm-up: tiny state through every contender (untimed) ...",
                file=sys.stderr,
                flush=True,
            )
            warm_up(contenders, build_state(GPT2_TINY, STATE_DTYPES["fp32"], args.seed), run_dir)
        for state_name in ["fp32", "bf16"] if args.state == "both" else [args.state]:
            bench_state(args, state_name, contenders, run_dir, library)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if created_workdir:
            _remove_if_empty(args.workdir)
    return 0


def _remove_if_empty(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


if __name__ == "__main__":
    sys.exit(main())

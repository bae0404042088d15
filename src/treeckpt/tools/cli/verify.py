"""``treeckpt verify``: read every stored chunk and check it as a load would."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from treeckpt.core.sizes import fmt_size
from treeckpt.tools.cli._args import positive_int
from treeckpt.tools.cli._output import print_json, progress_bar
from treeckpt.tools.verify import Problem, VerifyReport, verify

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "arguments", "run"]

NAME = "verify"
HELP = "read every chunk and check checksums and decoding; exit 1 on damage"
DESCRIPTION = """\
Read every stored chunk of every writer and check it as a load would: the
data file holds all its bytes, the checksum of the stored bytes matches, and a
compressed chunk decodes to exactly its declared size. Also checks the manifest, every
chunk index, data file sizes and that each tensor is fully covered. Reports every
problem with its file, byte offset and tensor FQN.

exit codes: 0 intact, 1 damage found, 2 no checkpoint at PATH or usage error
"""
EPILOG = """\
examples:
  treeckpt verify ckpt/
  treeckpt verify ckpt/ --threads 16 --json
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="chunks checked in parallel (default: CPU cores, at most 8)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    with progress_bar("verifying") as bar:
        report = verify(args.path, threads=args.threads, on_start=bar.start, on_chunk=bar.advance)
    if args.json:
        doc = {k: v for k, v in asdict(report).items() if k != "problems"}
        doc["ok"] = report.ok
        doc["problems"] = [asdict(p) for p in report.problems]
        print_json(doc)
    else:
        _verify_plain(report)
    return 0 if report.ok else 1


def _problem_text(p: Problem) -> str:
    where = p.file
    if p.offset is not None:
        where += f" at offset {p.offset}"
        if p.length is not None:
            where += f" ({p.length} bytes)"
    if p.fqn is not None:
        where += f", tensor {p.fqn}"
    return f"{where}: {p.reason}"


def _verify_plain(r: VerifyReport) -> None:
    scope = (
        f"{r.chunks} chunks ({fmt_size(r.stored_bytes)} stored, {fmt_size(r.raw_bytes)} raw) in "
        f"{r.files} data files, {r.indexes} chunk index(es)"
    )
    if r.ok:
        print(f"OK: {r.path} is intact: manifest, {scope} (save {r.save_id})")
        return
    print(f"DAMAGED: {r.path}: {len(r.problems)} problem(s)")
    for p in r.problems:
        print(f"  {_problem_text(p)}")
    if r.save_id is not None:
        print(f"checked {scope}: {r.chunks_ok} of {r.chunks} chunks intact")

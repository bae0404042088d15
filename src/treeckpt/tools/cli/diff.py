"""``treeckpt diff``: compare two checkpoints leaf by leaf."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from treeckpt.tools.cli._args import tolerance
from treeckpt.tools.cli._output import aligned, print_json, progress_bar
from treeckpt.tools.diff import DiffEntry, DiffReport, diff, entries_by_status

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "arguments", "run"]

NAME = "diff"
HELP = "compare two checkpoints leaf by leaf; exit 1 when they differ"
DESCRIPTION = """\
Compare two checkpoints FQN by FQN: same, different, only in A, only in B.
Tensors with different dtype or shape differ at once; tensors stored in the same chunks
with equal checksums are the same without reading data; all others are read and
compared bit for bit, with the count of differing elements and the largest absolute
and relative difference (|a-b| / |b|). Values compare by type and value (floats by
bits: nan equals nan).

exit codes: 0 identical (or close, within --atol/--rtol), 1 different,
2 a checkpoint is missing or damaged, or usage error
"""
EPILOG = """\
examples:
  treeckpt diff ckpt-a/ ckpt-b/
  treeckpt diff run1/step-100 run2/step-100 --rtol 1e-5 --atol 1e-8
  treeckpt diff a/ b/ --json | jq '.entries[] | select(.status != "same")'
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="first checkpoint")
    p.add_argument("b", metavar="B", help="second checkpoint (the reference for relative error)")
    p.add_argument(
        "--atol",
        type=tolerance,
        metavar="X",
        help="absolute tolerance: tensors with |a-b| <= atol + rtol*|b| everywhere are 'close'",
    )
    p.add_argument("--rtol", type=tolerance, metavar="Y", help="relative tolerance (see --atol)")
    p.add_argument("--all", action="store_true", help="also list the leaves that are the same")
    p.add_argument("--json", action="store_true", help="print one JSON document (every leaf)")


_LABELS = {
    "same": "same",
    "close": "close",
    "different": "different",
    "only_a": "only in A",
    "only_b": "only in B",
}


def run(args: argparse.Namespace) -> int:
    with progress_bar("comparing") as bar:
        started = False

        def on_read(n: int) -> None:
            nonlocal started
            if not started:
                bar.start(None)
                started = True
            bar.advance(n)

        report = diff(args.a, args.b, atol=args.atol, rtol=args.rtol, on_read=on_read)
    if args.json:
        print_json(
            {
                "a": report.a,
                "b": report.b,
                "identical": report.identical,
                "atol": args.atol,
                "rtol": args.rtol,
                "counts": report.counts,
                "entries": [asdict(e) for e in report.entries],
            }
        )
    else:
        _diff_plain(report, show_same=args.all)
    return 0 if report.identical else 1


def _entry_text(e: DiffEntry) -> str:
    parts = [e.reason] if e.reason else []
    if e.max_abs is not None:
        parts.append(f"max abs diff {e.max_abs:.6g}, max rel diff {e.max_rel:.6g}")
    if e.nan_mismatched:
        parts.append(f"nan in one only: {e.nan_mismatched:,}")
    if e.status in ("same", "close"):
        parts.append(f"by {e.how}")
    if e.status in ("only_a", "only_b"):
        parts.append(f"a {e.kind}")
    return "; ".join(parts)


def _diff_plain(report: DiffReport, *, show_same: bool) -> None:
    print(f"A: {report.a}\nB: {report.b}")
    rows = [
        [_LABELS[e.status], e.fqn, _entry_text(e)]
        for e in report.entries
        if show_same or e.status != "same"
    ]
    if rows:
        for line in aligned(rows, set()):
            print(line)
    groups = entries_by_status(report)
    by_how: dict[str, int] = {}
    for e in groups["same"]:
        by_how[e.how] = by_how.get(e.how, 0) + 1
    how = ", ".join(f"{n} by {h}" for h, n in sorted(by_how.items()))
    summary = ", ".join(
        f"{len(groups[s])} {_LABELS[s]}" + (f" ({how})" if s == "same" and how else "")
        for s in _LABELS
        if groups[s] or s == "same"
    )
    verdict = "identical" if report.identical else "DIFFERENT"
    print(f"{verdict}: {summary}")

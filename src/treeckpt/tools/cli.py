"""The ``treeckpt`` command: look inside, verify and compare checkpoints.

Run ``treeckpt --help`` (or ``python -m treeckpt --help``). Every subcommand
works on a checkpoint directory or fsspec URL and prints for people by
default, one JSON document with ``--json``.

Exit codes: 0 success (intact, identical); 1 the answer is "no" (damage
found, checkpoints differ); 2 the question could not be answered (usage
error, no checkpoint there, unreadable manifest for inspect and diff).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import IO, Any

import treeckpt
from treeckpt.api import CheckpointInfo, TensorInfo
from treeckpt.core.sizes import fmt_size as _size
from treeckpt.core.tree import iter_leaf_fqns
from treeckpt.errors import CheckpointError, CorruptChunkError, ManifestError
from treeckpt.tools.diff import DiffEntry, DiffReport, diff, entries_by_status
from treeckpt.tools.verify import Problem, VerifyReport, verify

__all__ = ["build_parser", "main"]

_FMT = argparse.RawDescriptionHelpFormatter

_EPILOG = """\
examples:
  treeckpt inspect ckpt/ --filter 'model.layers.0.*'    what is stored, no tensor data read
  treeckpt verify ckpt/ --threads 8                      is every stored byte intact?
  treeckpt diff ckpt-1000/ ckpt-2000/ --atol 1e-6        what changed between two checkpoints?
  treeckpt convert ckpt/ model.safetensors --to safetensors   publish the weights
  treeckpt consolidate ckpt/ --max-memory 2G             one torch.load-able file, on CPU

exit codes: 0 yes (intact / identical), 1 no (damaged / different),
            2 could not answer (usage error, no checkpoint, unreadable)

Every command takes --json for one JSON document on stdout.
Run 'treeckpt COMMAND --help' for the details and more examples of one command.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``treeckpt`` command."""
    parser = argparse.ArgumentParser(
        prog="treeckpt",
        description=_text(
            "Inspect, verify and compare treeckpt checkpoints "
            "(a directory path or an fsspec URL such as s3://bucket/ckpt)."
        ),
        epilog=_EPILOG,
        formatter_class=_FMT,
    )
    parser.add_argument("--version", action="version", version=f"treeckpt {treeckpt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="show the tensors and values of a checkpoint (reads no tensor data)",
        description=_text(
            "Show every leaf of a checkpoint in tree order: tensors with shape, dtype, "
            "raw and stored size, compression ratio, chunks and codecs; values with their value; "
            "then the totals. Reads only the manifest and chunk indexes, never tensor data."
        ),
        epilog="examples:\n"
        "  treeckpt inspect ckpt/\n"
        "  treeckpt inspect ckpt/ --filter 'optim.state.*.exp_avg' --filter step\n"
        "  treeckpt inspect s3://bucket/run-7/step-1000 --json | jq '.totals'",
        formatter_class=_FMT,
    )
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument(
        "--filter",
        metavar="GLOB",
        action="append",
        help="show only FQNs matching this shell-style glob (*, ?, [ab]); repeat to match any",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser(
        "verify",
        help="read every chunk and check checksums and decoding; exit 1 on damage",
        description=_text(
            "Read every stored chunk of every writer and check it as a load would: the "
            "data file holds all its bytes, the checksum of the stored bytes matches, and a "
            "compressed chunk decodes to exactly its declared size. Also checks the manifest, every "
            "chunk index, data file sizes and that each tensor is fully covered. Reports every "
            "problem with its file, byte offset and tensor FQN.",
            "exit codes: 0 intact, 1 damage found, 2 no checkpoint at PATH or usage error",
        ),
        epilog="examples:\n  treeckpt verify ckpt/\n  treeckpt verify ckpt/ --threads 16 --json",
        formatter_class=_FMT,
    )
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="chunks checked in parallel (default: CPU cores, at most 8)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser(
        "diff",
        help="compare two checkpoints leaf by leaf; exit 1 when they differ",
        description=_text(
            "Compare two checkpoints FQN by FQN: same, different, only in A, only in B. "
            "Tensors with different dtype or shape differ at once; tensors stored in the same chunks "
            "with equal checksums are the same without reading data; all others are read and "
            "compared bit for bit, with the count of differing elements and the largest absolute "
            "and relative difference (|a-b| / |b|). Values compare by type and value (floats by "
            "bits: nan equals nan).",
            "exit codes: 0 identical (or close, within --atol/--rtol), 1 different, "
            "2 a checkpoint is missing or damaged, or usage error",
        ),
        epilog="examples:\n"
        "  treeckpt diff ckpt-a/ ckpt-b/\n"
        "  treeckpt diff run1/step-100 run2/step-100 --rtol 1e-5 --atol 1e-8\n"
        "  treeckpt diff a/ b/ --json | jq '.entries[] | select(.status != \"same\")'",
        formatter_class=_FMT,
    )
    p.add_argument("a", metavar="A", help="first checkpoint")
    p.add_argument("b", metavar="B", help="second checkpoint (the reference for relative error)")
    p.add_argument(
        "--atol",
        type=_tolerance,
        metavar="X",
        help="absolute tolerance: tensors with |a-b| <= atol + rtol*|b| everywhere are 'close'",
    )
    p.add_argument("--rtol", type=_tolerance, metavar="Y", help="relative tolerance (see --atol)")
    p.add_argument("--all", action="store_true", help="also list the leaves that are the same")
    p.add_argument("--json", action="store_true", help="print one JSON document (every leaf)")
    p.set_defaults(run=_cmd_diff)
    _add_convert(sub)
    _add_consolidate(sub)
    return parser


def _text(*paragraphs: str) -> str:
    """Paragraphs wrapped for the help screen (the raw formatter keeps the examples as written)."""
    return "\n\n".join(textwrap.fill(p, 79) for p in paragraphs)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _tolerance(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``treeckpt`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.run(args))
    except BrokenPipeError:  # `treeckpt inspect ckpt/ | head`: the reader left early
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CheckpointError, OSError, ValueError, ImportError) as exc:
        hint = ""
        if isinstance(exc, (CorruptChunkError, ManifestError)) and args.command != "verify":
            hint = " (run 'treeckpt verify' on it to list every problem)"
        print(f"treeckpt {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"treeckpt {args.command}: interrupted", file=sys.stderr)
        return 130


def _is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is an interactive terminal (rich output) rather than a pipe or file."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------ inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = treeckpt.metadata(args.path)
    fqns = [f for f in _leaf_order(info) if _matches(f, args.filter)]
    tensors = [info.tensors[f] for f in fqns if f in info.tensors]
    values = [(f, info.values[f]) for f in fqns if f in info.values]
    if args.json:
        _print_json(_inspect_doc(info, tensors, values, args.filter))
    elif _is_terminal(sys.stdout):
        _inspect_rich(info, tensors, values, args.filter)
    else:
        _inspect_plain(info, tensors, values, args.filter)
    return 0


def _leaf_order(info: CheckpointInfo) -> list[str]:
    """Every leaf FQN in tree order (as saved), tensors and values interleaved."""
    known = set(info.tensors) | set(info.values)
    try:
        order = [f for f in iter_leaf_fqns(info.structure) if f in known]
    except (AttributeError, KeyError, TypeError):
        order = []
    seen = set(order)
    order += [f for f in [*info.tensors, *info.values] if f not in seen]
    return order


def _matches(fqn: str, globs: list[str] | None) -> bool:
    return not globs or any(fnmatch.fnmatchcase(fqn, g) for g in globs)


def _codecs(t: TensorInfo) -> str:
    if len(t.codecs) == 1:
        return next(iter(t.codecs))
    return " ".join(f"{c}({n})" for c, n in sorted(t.codecs.items(), key=lambda kv: -kv[1]))


def _ratio(raw: int, stored: int) -> str:
    return f"{raw / stored:.2f}x" if stored else "-"


def _value_text(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _tensor_row(t: TensorInfo) -> list[str]:
    return [
        t.fqn,
        str(list(t.shape)),
        t.dtype,
        _size(t.raw_bytes),
        _size(t.stored_bytes),
        _ratio(t.raw_bytes, t.stored_bytes),
        str(t.chunks),
        _codecs(t) or "-",
    ]


_TENSOR_HEADERS = ["FQN", "shape", "dtype", "raw", "stored", "ratio", "chunks", "codecs"]
_RIGHT = {3, 4, 5, 6}


def _totals_line(info: CheckpointInfo) -> str:
    return (
        f"total: {len(info.tensors)} tensors, {_size(info.raw_bytes)} raw, "
        f"{_size(info.stored_bytes)} stored ({_ratio(info.raw_bytes, info.stored_bytes)}) in "
        f"{len(info.files)} data files; {len(info.values)} values; "
        f"{info.world_size} writer rank(s); save {info.save_id}"
    )


def _shown_line(tensors: list[TensorInfo], values: list[tuple[str, Any]], globs: list[str]) -> str:
    raw = sum(t.raw_bytes for t in tensors)
    stored = sum(t.stored_bytes for t in tensors)
    return (
        f"shown: {len(tensors)} tensors ({_size(raw)} raw, {_size(stored)} stored), "
        f"{len(values)} values matching {' or '.join(repr(g) for g in globs)}"
    )


def _inspect_plain(
    info: CheckpointInfo,
    tensors: list[TensorInfo],
    values: list[tuple[str, Any]],
    globs: list[str] | None,
) -> None:
    print(f"checkpoint {info.path}")
    if tensors:
        print()
        for line in _aligned([_TENSOR_HEADERS, *(_tensor_row(t) for t in tensors)], _RIGHT):
            print(line)
    if values:
        print()
        rows = [["FQN", "value", "type"]]
        rows += [[f, _value_text(v), type(v).__name__] for f, v in values]
        for line in _aligned(rows, set()):
            print(line)
    if info.user_metadata:
        print(f"\nuser metadata: {_value_text(info.user_metadata, 200)}")
    print()
    if globs:
        print(_shown_line(tensors, values, globs))
    print(_totals_line(info))


def _aligned(rows: list[list[str]], right: set[int]) -> Iterator[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        yield "  ".join(cells).rstrip()


def _inspect_rich(
    info: CheckpointInfo,
    tensors: list[TensorInfo],
    values: list[tuple[str, Any]],
    globs: list[str] | None,
) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=sys.stdout)
    console.print(f"[bold]checkpoint[/bold] {escape(info.path)}")
    if tensors:
        table = Table(
            title="tensors",
            title_justify="left",
            header_style="bold",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for i, h in enumerate(_TENSOR_HEADERS):
            table.add_column(
                h,
                justify="right" if i in _RIGHT else "left",
                overflow="fold",
            )
        for t in tensors:
            table.add_row(*(escape(c) for c in _tensor_row(t)))
        console.print(table)
    if values:
        table = Table(
            title="values",
            title_justify="left",
            header_style="bold",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        table.add_column("FQN", overflow="fold")
        table.add_column("value", overflow="fold")
        table.add_column("type")
        for f, v in values:
            table.add_row(escape(f), escape(_value_text(v)), type(v).__name__)
        console.print(table)
    if info.user_metadata:
        console.print(f"user metadata: {escape(_value_text(info.user_metadata, 200))}")
    if globs:
        console.print(escape(_shown_line(tensors, values, globs)))
    console.print(escape(_totals_line(info)), style="bold")


def _inspect_doc(
    info: CheckpointInfo,
    tensors: list[TensorInfo],
    values: list[tuple[str, Any]],
    globs: list[str] | None,
) -> dict[str, Any]:
    return {
        "path": info.path,
        "save_id": info.save_id,
        "world_size": info.world_size,
        "filter": globs or [],
        "totals": {
            "tensors": len(info.tensors),
            "values": len(info.values),
            "raw_bytes": info.raw_bytes,
            "stored_bytes": info.stored_bytes,
            "ratio": info.raw_bytes / info.stored_bytes if info.stored_bytes else None,
            "files": len(info.files),
            "writer_ranks": info.world_size,
        },
        "tensors": [
            {
                "fqn": t.fqn,
                "lib": t.lib,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "raw_bytes": t.raw_bytes,
                "stored_bytes": t.stored_bytes,
                "ratio": t.ratio,
                "chunks": t.chunks,
                "codecs": t.codecs,
            }
            for t in tensors
        ],
        "values": [
            {"fqn": f, "type": type(v).__name__, "value": _json_value(v), "repr": repr(v)}
            for f, v in values
        ],
        "files": info.files,
        "user_metadata": info.user_metadata,
    }


def _json_value(v: Any) -> Any:
    """``v`` itself when JSON holds it exactly, else its repr (bytes, nan, inf)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return v
    return repr(v)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)  # 'inf', 'nan': strict JSON has no such numbers
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(_json_safe(doc), indent=2, allow_nan=False))


# ------------------------------------------------------------------ progress


class _Bar:
    """A rich progress bar of bytes on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, enabled: bool) -> None:
        self._label = label
        self._enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int | None) -> None:
        """Show the bar; ``total`` bytes (``None`` when unknown: a pulsing bar)."""
        if not self._enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self._label, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextlib.contextmanager
def _bar(label: str) -> Iterator[_Bar]:
    bar = _Bar(label, _is_terminal(sys.stderr))
    try:
        yield bar
    finally:
        bar.close()


# ------------------------------------------------------------------ verify


def _cmd_verify(args: argparse.Namespace) -> int:
    with _bar("verifying") as bar:
        report = verify(args.path, threads=args.threads, on_start=bar.start, on_chunk=bar.advance)
    if args.json:
        doc = {k: v for k, v in asdict(report).items() if k != "problems"}
        doc["ok"] = report.ok
        doc["problems"] = [asdict(p) for p in report.problems]
        _print_json(doc)
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
        f"{r.chunks} chunks ({_size(r.stored_bytes)} stored, {_size(r.raw_bytes)} raw) in "
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


# ------------------------------------------------------------------ diff


_LABELS = {
    "same": "same",
    "close": "close",
    "different": "different",
    "only_a": "only in A",
    "only_b": "only in B",
}


def _cmd_diff(args: argparse.Namespace) -> int:
    with _bar("comparing") as bar:
        started = False

        def on_read(n: int) -> None:
            nonlocal started
            if not started:
                bar.start(None)
                started = True
            bar.advance(n)

        report = diff(args.a, args.b, atol=args.atol, rtol=args.rtol, on_read=on_read)
    if args.json:
        _print_json(
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
        for line in _aligned(rows, set()):
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


# ------------------------------------------------------------------ convert


def _add_convert(sub: Any) -> None:
    from treeckpt.tools.convert import FORMATS

    p = sub.add_parser(
        "convert",
        help="convert between treeckpt, DCP, torch.save and safetensors",
        description=_text(
            "Convert the checkpoint at SRC into another format at DST. SRC may be a treeckpt "
            "checkpoint (directory or URL), a DCP directory written by "
            "torch.distributed.checkpoint, a torch.save file or a safetensors file; its format "
            "is recognised from its contents. --to safetensors writes the tensor leaves only, "
            "keyed by FQN (non-tensor leaves are listed as dropped). --to torch from a treeckpt "
            "checkpoint consolidates it into one torch.save file in bounded memory.",
            "torch.save files are read with weights_only=True; DCP checkpoints are read without "
            "running their pickles (no flag needed). An existing DST is never replaced "
            "without --overwrite.",
            "exit codes: 0 converted, 2 usage error, no checkpoint at SRC, DST exists, or the "
            "target format cannot hold a leaf",
        ),
        epilog="examples:\n"
        "  treeckpt convert ckpt/ model.safetensors --to safetensors\n"
        "  treeckpt convert dcp-ckpt/ ckpt/ --to treeckpt\n"
        "  treeckpt convert ckpt/ dcp-ckpt/ --to dcp\n"
        "  treeckpt convert model.pt s3://bucket/ckpt --to treeckpt\n"
        "  treeckpt convert ckpt/ full.pt --to torch --max-memory 8GiB --overwrite",
        formatter_class=_FMT,
    )
    p.add_argument("src", metavar="SRC", help="checkpoint to read (directory, file or URL)")
    p.add_argument("dst", metavar="DST", help="where to write (URLs for --to treeckpt only)")
    p.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow unpickling pickled treeckpt leaves (trusted sources only; not needed for DCP)",
    )
    p.add_argument(
        "--max-memory",
        type=_byte_size,
        metavar="SIZE",
        help="--to torch from treeckpt: most memory to use (bytes, or 512MiB, 8GiB...)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(run=_cmd_convert)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def _byte_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 512MiB, 8GiB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return n


def _cmd_convert(args: argparse.Namespace) -> int:
    from treeckpt.tools.convert import convert

    with _bar("converting") as bar:
        result = convert(
            args.src,
            args.dst,
            to=args.to,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            max_memory=args.max_memory,
            on_start=bar.start,
            on_bytes=bar.advance,
        )
    if args.json:
        _print_json(asdict(result))
        return 0
    print(
        f"converted {result.src} ({result.src_format}) -> {result.dst} ({result.dst_format}): "
        f"{result.tensors} tensors, {_size(result.raw_bytes)}"
    )
    if result.dropped:
        shown = ", ".join(result.dropped[:5]) + (" ..." if len(result.dropped) > 5 else "")
        print(f"dropped {len(result.dropped)} non-tensor leaves ({result.dst_format}): {shown}")
    return 0


# ------------------------------------------------------------------ consolidate


def _add_consolidate(sub: Any) -> None:
    p = sub.add_parser(
        "consolidate",
        help="write a sharded checkpoint as one torch.load-able file (PATH.consolidated)",
        description=_text(
            "Write the checkpoint at PATH as one file that torch.load(weights_only=True) reads, "
            "on CPU: a treeckpt checkpoint saved by any number of processes, or a folder in "
            "torch's DCP format (what plain Lightning writes for sharded checkpoints). A "
            "Lightning checkpoint keeps Lightning's layout: state_dict with the module's FQNs, "
            "optimizer_states and the other keys. Tensor data is streamed: at most --max-memory "
            "bytes of it are held at once, so checkpoints larger than memory consolidate. "
            "An existing output file is never replaced without --overwrite.",
            "exit codes: 0 written, 2 not written (no checkpoint, output exists, usage error)",
        ),
        epilog="examples:\n"
        "  treeckpt consolidate ckpt/                       writes ckpt.consolidated\n"
        "  treeckpt consolidate ckpt/ -o model.pt --max-memory 512M\n"
        "  python -m treeckpt consolidate lightning_logs/version_0/checkpoints/last.ckpt",
        formatter_class=_FMT,
    )
    p.add_argument("path", help="checkpoint directory or URL (treeckpt or DCP format)")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file (default: PATH.consolidated beside the checkpoint)",
    )
    p.add_argument(
        "--max-memory",
        type=_byte_size,
        metavar="SIZE",
        help="tensor bytes held at once, e.g. 512M, 4G, 1000000 (default: 1G)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(run=_cmd_consolidate)


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from treeckpt.tools.consolidate import consolidate

    with _bar("consolidating") as bar:
        shown = None

        def progress(done: int, total: int) -> None:
            nonlocal shown
            if shown is None:
                bar.start(total)
                shown = 0
            bar.advance(done - shown)
            shown = done

        report = consolidate(
            args.path,
            args.output,
            max_memory=args.max_memory,
            overwrite=args.overwrite,
            progress=progress,
        )
    if args.json:
        _print_json(asdict(report))
    else:
        print(
            f"wrote {report.dst}: {report.tensors} tensors, {_size(report.tensor_bytes)} of tensor "
            f"data, {_size(report.bytes_written)} file, from a {report.source_format} checkpoint in "
            f"{report.seconds:.1f} s (at most {_size(report.largest_read)} of tensor data held; "
            f"budget {_size(report.max_memory)})"
        )
        print(f"load it with: torch.load({report.dst!r}, weights_only=True)")
    return 0

"""``treeckpt inspect``: every leaf of a checkpoint, read from the manifest and indexes only."""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from dataclasses import dataclass
from typing import Any

import treeckpt
from treeckpt.api import CheckpointInfo, TensorInfo
from treeckpt.core.sizes import fmt_size
from treeckpt.core.tree import iter_leaf_fqns
from treeckpt.tools.cli import _output
from treeckpt.tools.cli._output import aligned, print_json

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "arguments", "run"]

NAME = "inspect"
HELP = "show the tensors and values of a checkpoint (reads no tensor data)"
DESCRIPTION = """\
Show every leaf of a checkpoint in tree order: tensors with shape, dtype,
raw and stored size, compression ratio, chunks and codecs; values with their value;
then the totals. Reads only the manifest and chunk indexes, never tensor data.
"""
EPILOG = """\
examples:
  treeckpt inspect ckpt/
  treeckpt inspect ckpt/ --filter 'optim.state.*.exp_avg' --filter step
  treeckpt inspect s3://bucket/run-7/step-1000 --json | jq '.totals'
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument(
        "--filter",
        metavar="GLOB",
        action="append",
        help="show only FQNs matching this shell-style glob (*, ?, [ab]); repeat to match any",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    info = treeckpt.metadata(args.path)
    fqns = [f for f in _leaf_order(info) if _matches(f, args.filter)]
    shown = _Shown(
        info=info,
        tensors=[info.tensors[f] for f in fqns if f in info.tensors],
        values=[(f, info.values[f]) for f in fqns if f in info.values],
        globs=args.filter,
    )
    if args.json:
        print_json(_inspect_doc(shown))
    elif _output.is_terminal(sys.stdout):
        _inspect_rich(shown)
    else:
        _inspect_plain(shown)
    return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Shown:
    """What one ``inspect`` shows: the checkpoint, and its leaves that match ``globs``."""

    info: CheckpointInfo
    tensors: list[TensorInfo]
    values: list[tuple[str, Any]]
    globs: list[str] | None


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
        fmt_size(t.raw_bytes),
        fmt_size(t.stored_bytes),
        _ratio(t.raw_bytes, t.stored_bytes),
        str(t.chunks),
        _codecs(t) or "-",
    ]


_TENSOR_HEADERS = ["FQN", "shape", "dtype", "raw", "stored", "ratio", "chunks", "codecs"]
_RIGHT = {3, 4, 5, 6}


def _totals_line(info: CheckpointInfo) -> str:
    return (
        f"total: {len(info.tensors)} tensors, {fmt_size(info.raw_bytes)} raw, "
        f"{fmt_size(info.stored_bytes)} stored ({_ratio(info.raw_bytes, info.stored_bytes)}) in "
        f"{len(info.files)} data files; {len(info.values)} values; "
        f"{info.world_size} writer rank(s); save {info.save_id}"
    )


def _shown_line(shown: _Shown) -> str:
    raw = sum(t.raw_bytes for t in shown.tensors)
    stored = sum(t.stored_bytes for t in shown.tensors)
    return (
        f"shown: {len(shown.tensors)} tensors ({fmt_size(raw)} raw, {fmt_size(stored)} stored), "
        f"{len(shown.values)} values matching {' or '.join(repr(g) for g in shown.globs or ())}"
    )


def _inspect_plain(shown: _Shown) -> None:
    print(f"checkpoint {shown.info.path}")
    if shown.tensors:
        print()
        for line in aligned([_TENSOR_HEADERS, *(_tensor_row(t) for t in shown.tensors)], _RIGHT):
            print(line)
    if shown.values:
        print()
        rows = [["FQN", "value", "type"]]
        rows += [[f, _value_text(v), type(v).__name__] for f, v in shown.values]
        for line in aligned(rows, set()):
            print(line)
    if shown.info.user_metadata:
        print(f"\nuser metadata: {_value_text(shown.info.user_metadata, 200)}")
    print()
    if shown.globs:
        print(_shown_line(shown))
    print(_totals_line(shown.info))


def _rich_table(title: str) -> Any:
    from rich import box
    from rich.table import Table

    return Table(
        title=title,
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )


def _inspect_rich(shown: _Shown) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(file=sys.stdout)
    console.print(f"[bold]checkpoint[/bold] {escape(shown.info.path)}")
    if shown.tensors:
        table = _rich_table("tensors")
        for i, h in enumerate(_TENSOR_HEADERS):
            table.add_column(
                h,
                justify="right" if i in _RIGHT else "left",
                overflow="fold",
            )
        for t in shown.tensors:
            table.add_row(*(escape(c) for c in _tensor_row(t)))
        console.print(table)
    if shown.values:
        table = _rich_table("values")
        table.add_column("FQN", overflow="fold")
        table.add_column("value", overflow="fold")
        table.add_column("type")
        for f, v in shown.values:
            table.add_row(escape(f), escape(_value_text(v)), type(v).__name__)
        console.print(table)
    if shown.info.user_metadata:
        console.print(f"user metadata: {escape(_value_text(shown.info.user_metadata, 200))}")
    if shown.globs:
        console.print(escape(_shown_line(shown)))
    console.print(escape(_totals_line(shown.info)), style="bold")


def _inspect_doc(shown: _Shown) -> dict[str, Any]:
    info = shown.info
    return {
        "path": info.path,
        "save_id": info.save_id,
        "world_size": info.world_size,
        "filter": shown.globs or [],
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
            for t in shown.tensors
        ],
        "values": [
            {"fqn": f, "type": type(v).__name__, "value": _json_value(v), "repr": repr(v)}
            for f, v in shown.values
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

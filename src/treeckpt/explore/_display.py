"""How an open checkpoint looks: a plain-text tree for terminals, HTML for Jupyter.

The HTML is plain ``<details>`` elements and tables with inline styles: it
needs no JavaScript or CSS file, and it reads the same on GitHub's notebook
viewer, in VS Code and in Jupyter. Sizes come from the manifest and the chunk
indexes; no tensor data is read to display anything.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from treeckpt.core.leaves import PickleLeaf, TensorLeaf
from treeckpt.core.sizes import fmt_size

if TYPE_CHECKING:
    from treeckpt.explore._checkpoint import Group, TensorHandle

__all__ = ["handle_html", "handle_text", "render_html", "render_text"]

#: Leaves shown at most in one HTML rendering (the rest are counted).
MAX_HTML_LEAVES = 2000


def _ratio(raw: int, stored: int) -> str:
    return f"{raw / stored:.2f}x" if stored else "-"


def _codecs(h: TensorHandle) -> str:
    cs = h.codecs
    if len(cs) <= 1:
        return next(iter(cs), "-")
    return " ".join(f"{c}({n})" for c, n in sorted(cs.items(), key=lambda kv: -kv[1]))


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _value_of(g: Group, fqn: str) -> str:
    rec = g._record(fqn)
    if isinstance(rec, PickleLeaf):
        return f"<pickled object, {len(rec.data)} bytes>"
    return _short(getattr(rec, "value", None))


def _group_line(g: Group) -> str:
    t = g.tensors()
    n_values = len(g.fqns()) - len(t)
    raw = sum(h.nbytes for h in t.values())
    stored = sum(h.stored_bytes for h in t.values())
    parts = []
    if t:
        parts.append(
            f"{len(t)} tensors, {fmt_size(raw)} raw, {fmt_size(stored)} stored "
            f"({_ratio(raw, stored)})"
        )
    if n_values or not t:
        parts.append(f"{n_values} values")
    return "; ".join(parts)


def _header(g: Group) -> str:
    from treeckpt.explore._checkpoint import Checkpoint

    if isinstance(g, Checkpoint):
        return (
            f"treeckpt checkpoint {g.path} (save {g.save_id}, {g.world_size} writer rank(s)): "
            f"{_group_line(g)}"
        )
    return f"treeckpt subtree {g.fqn!r}: {_group_line(g)}"


def handle_text(h: TensorHandle) -> str:
    return (
        f"<tensor {h.fqn} {h.dtype}{list(h.shape)}: {fmt_size(h.nbytes)} raw, "
        f"{fmt_size(h.stored_bytes)} stored ({_ratio(h.nbytes, h.stored_bytes)}), "
        f"{len(h.chunks)} chunk(s) {_codecs(h)} from {len(h.layout)} writer rank(s)>"
    )


def render_text(g: Group, *, max_lines: int | None) -> str:
    lines = [_header(g)]
    skipped = 0

    def walk(grp: Group, depth: int) -> None:
        nonlocal skipped
        pad = "  " * depth
        for name, child in grp._children():
            full = max_lines is not None and len(lines) > max_lines
            if isinstance(child, str):
                if full:
                    skipped += 1
                    continue
                rec = grp._record(child)
                if isinstance(rec, TensorLeaf):
                    h = grp._handle(child)
                    lines.append(
                        f"{pad}{name}: {h.dtype}{list(h.shape)} {fmt_size(h.nbytes)} -> "
                        f"{fmt_size(h.stored_bytes)} ({_ratio(h.nbytes, h.stored_bytes)}, "
                        f"{_codecs(h)})"
                    )
                else:
                    lines.append(f"{pad}{name} = {_value_of(grp, child)}")
            elif full:
                skipped += len(child.fqns())
            else:
                lines.append(f"{pad}{name}/  ({_group_line(child)})")
                walk(child, depth + 1)

    walk(g, 1)
    if skipped:
        lines.append(f"  ... {skipped} more leaves (.summary() shows them all)")
    return "\n".join(lines)


# ------------------------------------------------------------------ HTML

_STYLE_TABLE = "border-collapse:collapse;font-size:12px;margin:2px 0 4px 1.2em"
_STYLE_CELL = "padding:1px 8px;text-align:left;border:none"
_STYLE_NUM = "padding:1px 8px;text-align:right;border:none"
_HEADERS = ("name", "dtype", "shape", "raw", "stored", "ratio", "chunks", "codecs")


def _th() -> str:
    cells = "".join(
        f'<th style="{_STYLE_NUM if h in ("raw", "stored", "ratio", "chunks") else _STYLE_CELL}">'
        f"{h}</th>"
        for h in _HEADERS
    )
    return f"<tr>{cells}</tr>"


def _tensor_row(name: str, h: TensorHandle) -> str:
    e = escape
    return (
        f'<tr title="{e(h.fqn)}"><td style="{_STYLE_CELL}"><code>{e(name)}</code></td>'
        f'<td style="{_STYLE_CELL}">{e(h.dtype)}</td>'
        f'<td style="{_STYLE_CELL}">{e(str(list(h.shape)))}</td>'
        f'<td style="{_STYLE_NUM}">{fmt_size(h.nbytes)}</td>'
        f'<td style="{_STYLE_NUM}">{fmt_size(h.stored_bytes)}</td>'
        f'<td style="{_STYLE_NUM}">{_ratio(h.nbytes, h.stored_bytes)}</td>'
        f'<td style="{_STYLE_NUM}">{len(h.chunks)}</td>'
        f'<td style="{_STYLE_CELL}">{e(_codecs(h))}</td></tr>'
    )


def _value_row(g: Group, name: str, fqn: str) -> str:
    e = escape
    return (
        f'<tr title="{e(fqn)}"><td style="{_STYLE_CELL}"><code>{e(name)}</code></td>'
        f'<td style="{_STYLE_CELL}" colspan="7">= <code>{e(_value_of(g, fqn))}</code></td></tr>'
    )


def render_html(g: Group) -> str:
    shown = 0
    hidden = 0
    out: list[str] = [
        '<div class="treeckpt" style="font-family:monospace">',
        f"<div><b>{escape(_header(g))}</b></div>",
    ]

    def walk(grp: Group, depth: int) -> None:
        nonlocal shown, hidden
        rows: list[str] = []

        def flush() -> None:
            if rows:
                out.append(f'<table style="{_STYLE_TABLE}">{_th()}{"".join(rows)}</table>')
                rows.clear()

        for name, child in grp._children():
            if isinstance(child, str):
                if shown >= MAX_HTML_LEAVES:
                    hidden += 1
                    continue
                shown += 1
                if isinstance(grp._record(child), TensorLeaf):
                    rows.append(_tensor_row(name, grp._handle(child)))
                else:
                    rows.append(_value_row(grp, name, child))
                continue
            flush()
            if shown >= MAX_HTML_LEAVES:
                hidden += len(child.fqns())
                continue
            opened = " open" if depth == 0 else ""
            out.append(
                f'<details{opened} style="margin-left:1.2em"><summary><b>'
                f'{escape(name)}</b> <span style="color:gray">'
                f"{escape(_group_line(child))}</span></summary>"
            )
            walk(child, depth + 1)
            out.append("</details>")
        flush()

    walk(g, 0)
    if hidden:
        out.append(
            f"<div>... {hidden} more leaves not shown (<code>.fqns()</code> lists them all)</div>"
        )
    out.append("</div>")
    return "".join(out)


def handle_html(h: TensorHandle) -> str:
    e = escape
    layout = "; ".join(f"rank {r}: {len(boxes)} chunk(s)" for r, boxes in h.layout.items())
    return (
        f'<div class="treeckpt" style="font-family:monospace"><b>{e(h.fqn)}</b> '
        f"{e(h.dtype)}{e(str(list(h.shape)))}<br>{fmt_size(h.nbytes)} raw, "
        f"{fmt_size(h.stored_bytes)} stored ({_ratio(h.nbytes, h.stored_bytes)}); "
        f"{len(h.chunks)} chunk(s): {e(_codecs(h))}; {e(layout)}</div>"
    )

"""``treeckpt consolidate``: a sharded checkpoint as one ``torch.load``-able file.

``treeckpt.tools.consolidate`` is imported when the command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from treeckpt.core.sizes import fmt_size
from treeckpt.tools.cli._args import byte_size
from treeckpt.tools.cli._output import print_json, progress_bar

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "arguments", "run"]

NAME = "consolidate"
HELP = "write a sharded checkpoint as one torch.load-able file (PATH.consolidated)"
DESCRIPTION = """\
Write the checkpoint at PATH as one file that torch.load(weights_only=True) reads,
on CPU: a treeckpt checkpoint saved by any number of processes, or a folder in
torch's DCP format (what plain Lightning writes for sharded checkpoints). A
Lightning checkpoint keeps Lightning's layout: state_dict with the module's FQNs,
optimizer_states and the other keys. Tensor data is streamed: at most --max-memory
bytes of it are held at once, so checkpoints larger than memory consolidate.
An existing output file is never replaced without --overwrite.

exit codes: 0 written, 2 not written (no checkpoint, output exists, usage error)
"""
EPILOG = """\
examples:
  treeckpt consolidate ckpt/                       writes ckpt.consolidated
  treeckpt consolidate ckpt/ -o model.pt --max-memory 512M
  python -m treeckpt consolidate lightning_logs/version_0/checkpoints/last.ckpt
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory or URL (treeckpt or DCP format)")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file (default: PATH.consolidated beside the checkpoint)",
    )
    p.add_argument(
        "--max-memory",
        type=byte_size,
        metavar="SIZE",
        help="tensor bytes held at once, e.g. 512M, 4G, 1000000 (default: 1G)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from treeckpt.tools.consolidate import consolidate

    with progress_bar("consolidating") as bar:
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
        print_json(asdict(report))
    else:
        print(
            f"wrote {report.dst}: {report.tensors} tensors, {fmt_size(report.tensor_bytes)} of tensor "
            f"data, {fmt_size(report.bytes_written)} file, from a {report.source_format} checkpoint in "
            f"{report.seconds:.1f} s (at most {fmt_size(report.largest_read)} of tensor data held; "
            f"budget {fmt_size(report.max_memory)})"
        )
        print(f"load it with: torch.load({report.dst!r}, weights_only=True)")
    return 0

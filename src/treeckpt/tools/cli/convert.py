"""``treeckpt convert``: between treeckpt, torch's DCP, ``torch.save`` and safetensors.

``treeckpt.tools.convert`` is imported when the parser is built or the command
runs, not when the package is imported.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from treeckpt.core.sizes import fmt_size
from treeckpt.tools.cli._args import byte_size
from treeckpt.tools.cli._output import print_json, progress_bar

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "arguments", "run"]

NAME = "convert"
HELP = "convert between treeckpt, DCP, torch.save, safetensors and Hugging Face folders"
DESCRIPTION = """\
Convert the checkpoint at SRC into another format at DST. SRC may be a treeckpt
checkpoint (directory or URL), a DCP directory written by
torch.distributed.checkpoint, a torch.save file, a safetensors file or a Hugging
Face folder of safetensors files; its format is recognised from its contents.
--to safetensors writes the tensor leaves only, keyed by FQN (non-tensor leaves are
listed as dropped); --to hf writes them as a Hugging Face folder
(model-0000i-of-0000N.safetensors files of at most --max-shard-size bytes and
model.safetensors.index.json), which transformers' from_pretrained reads. --to torch from a treeckpt
checkpoint consolidates it into one torch.save file in bounded memory.

torch.save files are read with weights_only=True; DCP checkpoints are read without
running their pickles (no flag needed). An existing DST is never replaced
without --overwrite.

exit codes: 0 converted, 2 usage error, no checkpoint at SRC, DST exists, or the
target format cannot hold a leaf
"""
EPILOG = """\
examples:
  treeckpt convert ckpt/ model.safetensors --to safetensors
  treeckpt convert dcp-ckpt/ ckpt/ --to treeckpt
  treeckpt convert ckpt/ dcp-ckpt/ --to dcp
  treeckpt convert model.pt s3://bucket/ckpt --to treeckpt
  treeckpt convert ckpt/ full.pt --to torch --max-memory 8GiB --overwrite
  treeckpt convert ckpt/ hf-model/ --to hf --max-shard-size 2GiB
  treeckpt convert hf-model/ ckpt/ --to treeckpt
"""


def arguments(p: argparse.ArgumentParser) -> None:
    from treeckpt.tools.convert import FORMATS

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
        type=byte_size,
        metavar="SIZE",
        help="--to torch from treeckpt: most memory to use (bytes, or 512MiB, 8GiB...)",
    )
    p.add_argument(
        "--max-shard-size",
        type=byte_size,
        metavar="SIZE",
        help="--to hf: most bytes per safetensors file (default 5GB, as transformers)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from treeckpt.tools.convert import convert

    with progress_bar("converting") as bar:
        result = convert(
            args.src,
            args.dst,
            to=args.to,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            max_memory=args.max_memory,
            max_shard_size=args.max_shard_size,
            on_start=bar.start,
            on_bytes=bar.advance,
        )
    if args.json:
        print_json(asdict(result))
        return 0
    print(
        f"converted {result.src} ({result.src_format}) -> {result.dst} ({result.dst_format}): "
        f"{result.tensors} tensors, {fmt_size(result.raw_bytes)}"
    )
    if result.dropped:
        shown = ", ".join(result.dropped[:5]) + (" ..." if len(result.dropped) > 5 else "")
        print(f"dropped {len(result.dropped)} non-tensor leaves ({result.dst_format}): {shown}")
    return 0

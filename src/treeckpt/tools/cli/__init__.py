"""The ``treeckpt`` command: look inside, verify, compare, convert and consolidate checkpoints.

Run ``treeckpt --help`` (or ``python -m treeckpt --help``). Every subcommand
works on a checkpoint directory or fsspec URL and prints for people by
default, one JSON document with ``--json``.

Exit codes: 0 success (intact, identical); 1 the answer is "no" (damage
found, checkpoints differ); 2 the question could not be answered (usage
error, no checkpoint there, unreadable manifest for inspect and diff).

One module per command (``inspect``, ``verify``, ``diff``, ``convert``,
``consolidate``), each a :class:`Command`: its ``NAME``, the one-line
``HELP`` of ``treeckpt --help``, the ``DESCRIPTION`` paragraphs and the
``EPILOG`` (examples) as data, ``arguments(p)``, which adds its arguments to
its parser, and ``run(args) -> exit code``. :func:`build_parser` makes every
command's parser the same way from that table, so the commands' help screens
cannot drift apart. Adding a command is one new module here and one entry in
:data:`COMMANDS`; ``--help`` lists the commands in that order.
What commands share lives in ``_args`` (help text layout, argument types) and
``_output`` (JSON, aligned columns, terminal detection, progress bars).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Protocol

import treeckpt
from treeckpt.errors import CheckpointError, CorruptChunkError, ManifestError
from treeckpt.tools.cli import consolidate, convert, diff, inspect, verify
from treeckpt.tools.cli._args import FORMATTER, Subparsers, help_text

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class Command(Protocol):
    """A command module: what its help screen says, its arguments, and how it runs."""

    #: The subcommand, as typed after ``treeckpt``.
    NAME: str
    #: Its line in ``treeckpt --help``.
    HELP: str
    #: The text of ``treeckpt NAME --help``: paragraphs apart by a blank line,
    #: each re-wrapped by :func:`help_text` (so its own line breaks do not matter).
    DESCRIPTION: str
    #: The examples under them, kept as written.
    EPILOG: str

    def arguments(self, p: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


#: Every ``treeckpt`` command, in the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = (inspect, verify, diff, convert, consolidate)

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
        description=help_text(
            "Inspect, verify and compare treeckpt checkpoints "
            "(a directory path or an fsspec URL such as s3://bucket/ckpt)."
        ),
        epilog=_EPILOG,
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"treeckpt {treeckpt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        _add_command(sub, command)
    return parser


def _add_command(sub: Subparsers, command: Command) -> None:
    p = sub.add_parser(
        command.NAME,
        help=command.HELP,
        description=help_text(*command.DESCRIPTION.strip().split("\n\n")),
        epilog=command.EPILOG,
        formatter_class=FORMATTER,
    )
    command.arguments(p)
    p.set_defaults(run=command.run)


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

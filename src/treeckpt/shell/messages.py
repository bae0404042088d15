"""What crosses ranks during a save.

A phase is one gather to the coordinator, which decides, and one scatter or
broadcast of its decision: each rank's error travels in the gather and the
verdict naming every failed rank in the answer, so every rank raises the
same error without a separate agreement round. These are the messages, all
plain frozen data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from treeckpt.core.manifest import IndexRef
from treeckpt.core.plan_table import SavePlan
from treeckpt.core.shard_table import LocalTable
from treeckpt.errors import RankConflictError, RankFailureError
from treeckpt.shell.coord import Coordinator

__all__ = [
    "Assignment",
    "Committed",
    "Described",
    "Failure",
    "Resend",
    "Same",
    "SendTree",
    "Verdict",
    "Written",
    "raise_verdict",
]


@dataclass(frozen=True, slots=True)
class Failure:
    """This rank failed the phase: the description of its error."""

    text: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The phase failed on these ranks: every rank raises it.

    ``conflict``: the ranks' states contradict each other (no rank failed):
    every rank raises a ``RankConflictError`` with this text.
    """

    phase: str
    failures: dict[int, str]
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class Same:
    """This rank's description is unchanged since the plan named ``token``."""

    token: str


@dataclass(frozen=True, slots=True)
class Described:
    """A rank's description: the digest of its tree (empty with one rank) and its shards."""

    digest: str
    shards: LocalTable | Same  # Same: the plan cache holds them


@dataclass(frozen=True, slots=True)
class SendTree:
    """Some rank's tree differs from the coordinator's (whose digest this is): send it.

    ``parts``: the digest of each of the coordinator's top-level entries; a
    rank leaves out those it has alike (``shell/union.py``).
    """

    digest: str
    parts: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class Resend:
    """The coordinator lacks a rank's description: every rank sends its own."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """A rank's share of the plan: ``rows`` (``None``: reuse the cached plan ``token``)."""

    rows: SavePlan | None
    save_id: str
    token: str


@dataclass(frozen=True, slots=True)
class Written:
    """A rank's chunk index (``None``: it wrote nothing) and the digests of its plain tensors."""

    ref: IndexRef | None
    digests: dict[str, str]


@dataclass(frozen=True, slots=True)
class Committed:
    """The commit took effect; ``previous`` is the save id of the checkpoint it replaced."""

    previous: str | None


def raise_verdict(coord: Coordinator, verdict: Verdict, own: BaseException | None) -> NoReturn:
    """Raise what every rank raises for ``verdict`` (``own``: this rank's error, if any)."""
    if verdict.conflict is not None:
        if isinstance(own, RankConflictError):
            raise own
        raise RankConflictError(verdict.conflict)
    if own is not None and coord.world_size == 1:
        coord.agree(verdict.phase, own)  # one process: the error itself, as it was raised
    raise RankFailureError(verdict.phase, dict(verdict.failures)) from own

"""One family of errors.

Every error treeckpt raises derives from :class:`CheckpointError`; each
subclass also derives from the builtin a caller would naturally catch
(``FileNotFoundError``, ``ValueError``, ``TypeError``), so code written for
builtins keeps working. Messages name the FQN, file or rank involved, and both
sides of any mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "CollectiveError",
    "CorruptChunkError",
    "FQNCollisionError",
    "IncompleteCheckpointError",
    "LeafNotFoundError",
    "LoadMismatchError",
    "ManifestError",
    "OptionsError",
    "PlanError",
    "RankConflictError",
    "RankFailureError",
    "UnsupportedLeafError",
]


class CheckpointError(Exception):
    """Base class of every error raised by treeckpt."""


class OptionsError(CheckpointError, ValueError):
    """An option of SaveOptions or LoadOptions is out of range."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint exists at the given path."""


class IncompleteCheckpointError(CheckpointNotFoundError):
    """The path holds data files but no committed manifest (a save that never finished)."""


class ManifestError(CheckpointError, ValueError):
    """The manifest or a chunk index is malformed, inconsistent or fails its checksum."""


class CheckpointReplacedError(CheckpointError):
    """The checkpoint was replaced by a new save (or removed) while it was being read.

    A load, restore or ``read_tensor`` that finds its checkpoint replaced
    reads the new one once; this error says that did not work either (the
    checkpoint was replaced again, or the new one does not load). An open
    checkpoint (``treeckpt.open``) raises it at once: open the path again.
    """


class LeafNotFoundError(CheckpointError, KeyError):
    """The checkpoint has no tensor (or leaf) of the requested FQN."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptChunkError(CheckpointError, ValueError):
    """A stored chunk fails its checksum, length or decompression check."""


class UnsupportedLeafError(CheckpointError, TypeError):
    """A leaf of the tree has a type treeckpt does not store without pickle."""


class FQNCollisionError(CheckpointError, ValueError):
    """Two different paths of the tree render to the same FQN."""


class PlanError(CheckpointError, ValueError):
    """Shards do not tile their tensor, specs disagree across ranks, or a request is not covered."""


class LoadMismatchError(CheckpointError, ValueError):
    """The template and the checkpoint disagree (keys, shapes, dtypes, kinds).

    Attributes hold every problem found, so one error reports them all.
    """

    def __init__(
        self,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
        notes: Sequence[str] = (),
    ) -> None:
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing from checkpoint ({len(self.missing)}): {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"not in template ({len(self.unexpected)}): {_preview(self.unexpected)}")
        if self.mismatched:
            parts.append(f"mismatched ({len(self.mismatched)}): {_preview(self.mismatched)}")
        hint = (
            " (pass strict=False to load the keys both sides have)"
            if self.missing or self.unexpected
            else ""
        )
        extra = "".join(f"; {n}" for n in notes)
        super().__init__("template does not match checkpoint; " + "; ".join(parts) + hint + extra)


class RankConflictError(CheckpointError, ValueError):
    """The ranks of a save hold contradicting state under one name; nothing was saved.

    The same FQN holds different values (or tensor bytes) on different ranks,
    a tensor on one and a value on another, or one path is a different kind
    of container on different ranks. Every rank raises it.
    """


class CollectiveError(CheckpointError):
    """A collective across ranks failed or timed out."""


class RankFailureError(CheckpointError):
    """One or more ranks failed a phase of a save or a load; every rank raises this."""

    def __init__(self, phase: str, failures: dict[int, str]) -> None:
        self.phase = phase
        self.failures = dict(failures)
        ranks = ", ".join(str(r) for r in sorted(failures))
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"{phase} failed on rank(s) {ranks}: {detail}")


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")

"""``CheckpointException``, as in ``torch.distributed.checkpoint.api``."""

from __future__ import annotations

import traceback
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException as _TorchCheckpointException

from treeckpt.errors import CheckpointError, LoadMismatchError

__all__ = ["CheckpointException"]


class CheckpointException(CheckpointError, _TorchCheckpointException):
    """A save or load failed on one or more ranks; every rank raises it.

    Unlike torch's class (a ``BaseException``), this is an ``Exception`` and a
    :class:`treeckpt.CheckpointError`; it is also a subclass of torch's
    ``CheckpointException``, so ``except`` clauses written for DCP still catch it.
    ``failures`` maps each failing rank to ``(exception, stack summary)``; the
    original treeckpt error is also the ``__cause__``.
    """

    def __init__(self, msg: str, failures: dict[int, Any]) -> None:
        _TorchCheckpointException.__init__(self, msg, failures)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


def wrap_failure(exc: BaseException, rank: int) -> CheckpointException:
    """The ``CheckpointException`` every rank raises for a treeckpt error ``exc``."""
    failures: dict[int, Any] = {}
    per_rank = getattr(exc, "failures", None)
    if isinstance(per_rank, dict) and per_rank:
        for r, detail in per_rank.items():
            failures[int(r)] = (
                detail if isinstance(detail, tuple) else (exc, traceback.StackSummary())
            )
    else:
        failures[rank] = (exc, traceback.extract_tb(exc.__traceback__))
    text = str(exc)
    if isinstance(exc, LoadMismatchError):
        # treeckpt.load's hint names its own argument; DCP's is on the planner.
        text = text.replace(_STRICT_HINT, "")
        if exc.missing:
            text += " (DefaultLoadPlanner(allow_partial_load=True) skips missing keys)"
    return CheckpointException(f"{type(exc).__name__}: {text}", failures)


_STRICT_HINT = " (pass strict=False to load the keys both sides have)"

"""Coordination of the ranks taking part in one save or load.

Every phase ends with an agreement: each rank reports success or its error,
and if any rank failed, every rank raises. ``LocalCoordinator`` is the
one-process case (no process group); the ``torch.distributed`` coordinator
implements the same contract over a process group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from treeckpt.errors import CheckpointError, RankFailureError

__all__ = ["Coordinator", "LocalCoordinator", "agreed", "describe_error"]

T = TypeVar("T")


class Coordinator(ABC):
    """Collectives over the ranks of one save or load (rank 0 coordinates)."""

    rank: int
    world_size: int

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def gather(self, obj: Any, phase: str) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (``None`` elsewhere)."""

    @abstractmethod
    def broadcast(self, obj: Any, phase: str) -> Any:
        """Rank 0's ``obj`` on every rank."""

    @abstractmethod
    def scatter(self, objs: list[Any] | None, phase: str) -> Any:
        """Rank r receives ``objs[r]`` from rank 0 (``objs`` is ignored elsewhere)."""

    @abstractmethod
    def agree(self, phase: str, error: BaseException | None) -> None:
        """Raise on every rank if ``error`` is set on any rank; return on all otherwise.

        A :class:`~treeckpt.errors.CollectiveError` is raised at once, without a
        collective: a rank whose collective failed cannot count on the others.
        """


class LocalCoordinator(Coordinator):
    """One process, no process group: collectives are identities."""

    rank = 0
    world_size = 1

    def gather(self, obj: Any, phase: str) -> list[Any] | None:
        return [obj]

    def broadcast(self, obj: Any, phase: str) -> Any:
        return obj

    def scatter(self, objs: list[Any] | None, phase: str) -> Any:
        assert objs is not None and len(objs) == 1
        return objs[0]

    def agree(self, phase: str, error: BaseException | None) -> None:
        if error is None:
            return
        if isinstance(error, CheckpointError):
            raise error
        raise RankFailureError(phase, {0: describe_error(error)}) from error


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def agreed(coord: Coordinator, phase: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it fails anywhere, raise everywhere."""
    result: T | None = None
    err: Exception | None = None
    try:
        result = fn()
    except Exception as exc:
        err = exc
    coord.agree(phase, err)
    return result  # type: ignore[return-value]

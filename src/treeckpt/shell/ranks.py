"""What every entry point does around one save or load, written once.

``treeckpt.save``, ``load`` and ``restore``, ``async_save``, the DCP facade,
the ``CheckpointManager`` and the reader of committed checkpoints all need
the same plumbing; copies of it drifted before (one skipped waiting for a
running asynchronous save, so its collectives could interleave with that
save's). Each piece lives here:

- :func:`coordinator`: the ranks taking part, after every save still
  running in the background has finished;
- :func:`on_coordinator`: run a function on rank 0 and give every rank the
  same outcome, its result or its error;
- :func:`open_save_dir` (:func:`make_save_dir` then :func:`sync_new_dir`):
  create a save's directory and make a new directory's entry durable before
  anything is committed in it;
- :func:`check_user_metadata`: refuse user metadata the manifest cannot hold,
  before any byte is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from treeckpt.core.options import SaveOptions
from treeckpt.errors import CheckpointError, RankFailureError, UnsupportedLeafError
from treeckpt.shell import inflight
from treeckpt.shell.coord import Coordinator, LocalCoordinator, describe_error
from treeckpt.shell.dist import DistCoordinator, distributed_active
from treeckpt.store.backends import Backend

__all__ = [
    "check_user_metadata",
    "coordinator",
    "make_save_dir",
    "on_coordinator",
    "open_save_dir",
    "sync_new_dir",
]

T = TypeVar("T")


def coordinator(
    process_group: Any = None, timeout_s: float | None = None, *, private: bool = False
) -> Coordinator:
    """The ranks taking part: ``process_group`` when one is initialised, else this process.

    Over a process group, saves still running in the background finish first
    (:func:`treeckpt.shell.inflight.wait_all`), so that two operations'
    collectives never interleave. ``timeout_s=None`` bounds every collective
    by the process group's own timeout
    (:func:`treeckpt.shell.dist.group_timeout_s`). ``private`` gives a group
    of treeckpt's own, for collectives run from a background thread while
    training uses the caller's group.

    Raises:
        CollectiveError: a peer never arrived to create the coordination group.
    """
    if distributed_active(process_group):
        inflight.wait_all()
        return DistCoordinator(process_group, timeout_s=timeout_s, private=private)
    return LocalCoordinator()


def on_coordinator(coord: Coordinator, phase: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the coordinator (rank 0); every rank returns its result or raises.

    The outcome is the same on every rank: a :class:`~treeckpt.CheckpointError`
    is raised as itself everywhere; any other error becomes a
    :class:`~treeckpt.RankFailureError` naming ``phase`` and rank 0 (its
    description crosses ranks, not the object, which may not survive
    pickling), chained to the original on rank 0. One process behaves the
    same as many.
    """
    got: Any = None
    cause: Exception | None = None
    if coord.is_coordinator:
        try:
            got = ("ok", fn())
        except CheckpointError as exc:  # every rank must raise it
            got = ("error", exc)
        except Exception as exc:  # any other error: a description crosses ranks
            got, cause = ("failed", describe_error(exc)), exc
    kind, value = coord.broadcast(got, phase)
    if kind == "error":
        raise value
    if kind == "failed":
        raise RankFailureError(phase, {0: value}) from cause
    result: T = value
    return result


def make_save_dir(backend: Backend, options: SaveOptions) -> bool:
    """Create the directory of a save at ``backend.root``.

    Returns whether the directory is new and its own entry must still be made
    durable (:func:`sync_new_dir`) before anything is committed in it: a
    manifest renamed into a directory whose entry a crash loses is lost too.
    An asynchronous save calls :func:`sync_new_dir` in the background.

    Raises:
        CheckpointError: the directory cannot be created (the path names it).
    """
    try:
        new_dir = backend.size("") is None and not backend.listdir()
        backend.makedirs("")
    except OSError as exc:
        raise CheckpointError(
            f"{backend.root}: cannot create the checkpoint directory ({exc})"
        ) from exc
    return new_dir and options.sync and backend.supports_fsync


def sync_new_dir(backend: Backend) -> None:
    """Make a new checkpoint directory's own entry durable (fsync of its parent).

    Raises:
        CheckpointError: the fsync failed.
    """
    try:
        backend.sync_dir("..")
    except OSError as exc:
        raise CheckpointError(
            f"{backend.root}: cannot create the checkpoint directory ({exc})"
        ) from exc


def open_save_dir(backend: Backend, options: SaveOptions) -> None:
    """:func:`make_save_dir`, then :func:`sync_new_dir` when the directory is new."""
    if make_save_dir(backend, options):
        sync_new_dir(backend)


def check_user_metadata(user_metadata: dict[str, Any] | None) -> None:
    """Refuse metadata the manifest cannot hold, before any byte is written.

    Raises:
        UnsupportedLeafError: not a dict, or not JSON (str keys; str, int,
            float, bool, None, lists, dicts; no nan or inf).
    """
    if user_metadata is None:
        return
    if not isinstance(user_metadata, dict):
        raise UnsupportedLeafError(
            f"user_metadata must be a dict, got {type(user_metadata).__name__}"
        )
    try:
        json.dumps(user_metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedLeafError(
            f"user_metadata must be JSON (str keys; str, int, float, bool, None, lists, dicts; "
            f"no nan or inf): {exc}"
        ) from None

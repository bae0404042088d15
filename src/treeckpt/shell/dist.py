"""Coordination over ``torch.distributed``.

Small object collectives (specs, plans, chunk refs, verdicts) run on a gloo
group, whatever the training backend is: NCCL jobs keep their GPU group for
training and get a CPU group here, created once per (group, timeout). Every
collective is bounded by the timeout, and before each phase every rank
records its arrival in the rendezvous store, so when a collective fails
(a peer died or stalled), the survivors name the ranks that never arrived.

The timeout is the process group's own unless the options give one: a job
that chose a short timeout for its group fails as fast in a checkpoint.
Creating the gloo group is bounded by it too, and names the missing ranks:
gloo connects the ranks inside ``new_group``, which says nothing about who
is missing, so every rank first records its arrival and waits, within the
timeout, for the others' before creating the group.
"""

from __future__ import annotations

import contextlib
import itertools
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from treeckpt.errors import CheckpointError, CollectiveError, RankFailureError
from treeckpt.shell.coord import Coordinator, describe_error

__all__ = ["DistCoordinator", "distributed_active", "group_timeout_s"]

_GROUPS: dict[tuple[int, float, bool], Any] = {}
_SEQ = itertools.count()
_GROUP_SEQ = itertools.count()


def distributed_active(process_group: Any = None) -> bool:
    """True when a process group is initialised (and has more than one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return int(dist.get_world_size(process_group)) > 1


def group_timeout_s(process_group: Any = None) -> float:
    """The timeout, in seconds, of ``process_group`` (the default group's when ``None``).

    Read from the group's backend (gloo or NCCL options); when a backend does
    not say, the rendezvous store's timeout (the one ``init_process_group``
    was given), else torch's default.
    """
    pg: Any = process_group if process_group is not None else dist.group.WORLD
    for device in getattr(pg, "_device_types", ()):
        with contextlib.suppress(Exception):
            timeout = pg._get_backend(device).options._timeout
            if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
                return float(timeout.total_seconds())
    store = _default_store()
    with contextlib.suppress(Exception):
        timeout = store.timeout
        if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
            return float(timeout.total_seconds())
    return float(dist.default_pg_timeout.total_seconds())


def _cpu_group(process_group: Any, timeout_s: float, private: bool = False) -> Any:
    pg = process_group if process_group is not None else dist.group.WORLD
    if not private and pg is not dist.group.WORLD and dist.get_backend(pg) == "gloo":
        return pg  # a user's gloo subgroup: its own timeout applies
    key = (id(pg), timeout_s, private)
    group = _GROUPS.get(key)
    if group is None:
        # new_group is collective over the default group: every rank saves or
        # loads together, so every rank reaches this call in the same order.
        _await_peers(pg, timeout_s)
        ranks = dist.get_process_group_ranks(pg) if pg is not dist.group.WORLD else None
        try:
            group = dist.new_group(
                ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s)
            )
        except Exception as exc:  # a peer left between arriving and connecting
            raise CollectiveError(
                f"creating treeckpt's gloo group failed on rank {dist.get_rank()} within the "
                f"{timeout_s:g} s timeout ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        _GROUPS[key] = group
    return group


def _await_peers(pg: Any, timeout_s: float) -> None:
    """Wait, at most ``timeout_s``, until every rank of ``pg`` is about to create the group.

    A rank that never calls ``save`` or ``load`` is named here, and no rank
    enters ``new_group`` (whose failure would leave the ranks' group
    counters apart) unless every rank has arrived.
    """
    store = _default_store()
    if store is None:
        return
    ranks = dist.get_process_group_ranks(pg) if pg is not dist.group.WORLD else None
    if ranks is None:
        ranks = list(range(dist.get_world_size()))
    seq = next(_GROUP_SEQ)
    me = dist.get_rank()
    keys = [f"treeckpt/group/{seq}/{r}" for r in ranks]
    try:
        store.set(f"treeckpt/group/{seq}/{me}", "1")
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as exc:
        absent = []
        for r, k in zip(ranks, keys, strict=True):
            with contextlib.suppress(Exception):
                if not store.check([k]):
                    absent.append(r)
        who = (
            f"rank(s) {', '.join(map(str, absent))} did not reach it (dead, stalled, or not "
            "saving or loading)"
            if absent
            else "a peer failed or timed out"
        )
        raise CollectiveError(
            f"phase 'connect' failed on rank {me} within the {timeout_s:g} s timeout: {who} "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


class DistCoordinator(Coordinator):
    """The ranks of a ``torch.distributed`` process group; group rank 0 coordinates."""

    def __init__(
        self, process_group: Any = None, *, timeout_s: float | None = None, private: bool = False
    ) -> None:
        # ``private``: a group of treeckpt's own even when the user's is gloo,
        # for collectives run from a background thread while training uses
        # the user's group. ``timeout_s=None``: the process group's timeout.
        if timeout_s is None:
            timeout_s = group_timeout_s(process_group)
        self.group = _cpu_group(process_group, timeout_s, private)
        self.rank = int(dist.get_rank(self.group))
        self.world_size = int(dist.get_world_size(self.group))
        self.timeout_s = timeout_s
        self.op = next(_SEQ)
        self._store = _default_store()

    # Arrival records: "treeckpt/<op>/<phase>/<rank>" in the rendezvous store.
    def _arrive(self, phase: str) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.set(f"treeckpt/{self.op}/{phase}/{self.rank}", "1")

    def _absent(self, phase: str) -> list[int]:
        if self._store is None:
            return []
        absent = []
        for r in range(self.world_size):
            try:
                if not self._store.check([f"treeckpt/{self.op}/{phase}/{r}"]):
                    absent.append(r)
            except Exception:
                return []
        return absent

    def _run(self, phase: str, fn: Any) -> Any:
        self._arrive(phase)
        try:
            return fn()
        except CheckpointError:
            raise
        except Exception as exc:
            absent = self._absent(phase)
            who = (
                f"rank(s) {', '.join(map(str, absent))} did not reach it (dead or stalled)"
                if absent
                else "a peer failed or timed out"
            )
            raise CollectiveError(
                f"phase {phase!r} failed on rank {self.rank} within the {self.timeout_s:g} s "
                f"timeout: {who} ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc

    def gather(self, obj: Any, phase: str) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None

        def go() -> None:
            dist.gather_object(obj, out, group=self.group, group_dst=0)

        self._run(phase, go)
        return out

    def broadcast(self, obj: Any, phase: str) -> Any:
        box = [obj]

        def go() -> None:
            dist.broadcast_object_list(box, group=self.group, group_src=0)

        self._run(phase, go)
        return box[0]

    def scatter(self, objs: list[Any] | None, phase: str) -> Any:
        out: list[Any] = [None]

        def go() -> None:
            dist.scatter_object_list(
                out, objs if self.rank == 0 else None, group=self.group, group_src=0
            )

        self._run(phase, go)
        return out[0]

    def agree(self, phase: str, error: BaseException | None) -> None:
        if isinstance(error, CollectiveError):
            # A collective already failed here: another one would only wait out
            # its timeout. Every other rank meets its own CollectiveError.
            raise error
        mine = None if error is None else describe_error(error)
        verdicts: list[Any] = [None] * self.world_size

        def go() -> None:
            dist.all_gather_object(verdicts, mine, group=self.group)

        self._run(f"{phase}:agree", go)
        failures = {r: v for r, v in enumerate(verdicts) if v is not None}
        if not failures:
            return
        raise RankFailureError(phase, failures) from error


def _default_store() -> Any:
    """The rendezvous store, to record arrivals (``None`` if unavailable)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None

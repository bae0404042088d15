"""The plan phase of a save: every rank's description in, every rank's assignment out.

Two collectives: every rank's description (or error) is gathered, and the
coordinator scatters each rank's assignment (or the verdict). When a rank's
tree differs from the coordinator's (its digest does), the coordinator's
answer asks for the trees instead: they are gathered and merged
(``core/merge.py``), then the assignments are scattered (two collectives
more). A layout planned before is not planned again: a rank whose
description is unchanged sends the token of its cached plan
(``shell/plancache.py``); the coordinator reuses the plan when every rank
sends the same token and it holds that plan, fills in an unchanged rank's
description from its own copy when another rank changed, and asks every
rank to resend when it has no copy. On failure or conflict every rank
raises, and the data directory the coordinator created is removed.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from typing import Any

from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.merge import MergedTree, merge_trees
from treeckpt.core.options import SaveOptions
from treeckpt.core.plan_table import SavePlan, plan_save_table
from treeckpt.core.shard_table import LocalTable, local_table
from treeckpt.core.specs import ShardSpec
from treeckpt.core.tree import FlatTree
from treeckpt.errors import PlanError, RankConflictError
from treeckpt.shell import cleanup
from treeckpt.shell.coord import Coordinator, describe_error
from treeckpt.shell.messages import (
    Assignment,
    Described,
    Failure,
    Resend,
    Same,
    SendTree,
    Verdict,
    raise_verdict,
)
from treeckpt.shell.plancache import CachedPlan, PlanCache, PlanKey, new_token
from treeckpt.shell.union import describe_parts, describe_tree, part_digests
from treeckpt.store import layout
from treeckpt.store.backends import Backend

__all__ = ["Agreed", "LocalDescription", "negotiate_plan"]


@dataclass(slots=True, kw_only=True)
class LocalDescription:
    """This rank's side of the plan phase (``error``: describing failed; the rest may be unset)."""

    flat: FlatTree | None = None
    specs: list[ShardSpec]
    digest: str = ""
    key: PlanKey | None = None
    hit: CachedPlan | None = None
    error: BaseException | None = None


@dataclass(slots=True, kw_only=True)
class Agreed:
    """What every rank agreed on: this rank's plan (the whole plan on the coordinator).

    ``hold`` is the coordinator's claim on the new data directory; ``tree``
    the union of the ranks' trees (coordinator only); ``reused``: the plan
    came from the plan cache.
    """

    entry: CachedPlan
    save_id: str
    hold: Any = None
    reused: bool = False
    tree: MergedTree | None = None


@dataclass(slots=True)
class _Decision:
    """What the coordinator decided, for every rank and for itself."""

    proposals: list[Any]
    save_id: str | None = None
    hold: Any = None
    entry: CachedPlan | None = None
    error: BaseException | None = None
    tree: MergedTree | None = None


def negotiate_plan(
    desc: LocalDescription,
    backend: Backend,
    *,
    cache: PlanCache,
    options: SaveOptions,
    coord: Coordinator,
) -> Agreed:
    """Agree on the plan with every rank (see the module docstring); store it in ``cache``.

    Raises what every rank raises: a ``RankFailureError`` naming the failed
    ranks (the error itself with one process), or a ``RankConflictError``.
    """
    hit = desc.hit
    payload, err = _payload(desc, coord, hit)
    flat = desc.flat
    decision: _Decision | None = None
    merged: MergedTree | None = None  # the coordinator's, once the ranks' trees were merged
    while True:
        gathered = coord.gather(payload, "plan")
        if coord.is_coordinator:
            assert gathered is not None
            decision = _decide_plan(gathered, backend, flat, cache, options, coord, merged)
        # The assignment has its own phase name: a rank dying in between is named.
        mine = _receive(coord, backend, decision)
        if isinstance(mine, SendTree):
            assert flat is not None  # no rank failed to describe itself
            sent = None if mine.digest == desc.digest else describe_parts(flat, mine.parts)
            trees = coord.gather(sent, "tree")
            if coord.is_coordinator:
                assert trees is not None and gathered is not None
                try:
                    base = describe_tree(flat)
                    merged = merge_trees([base if t is None else t for t in trees])
                except Exception as exc:
                    verdict = (
                        Verdict("tree", {}, conflict=str(exc))
                        if isinstance(exc, RankConflictError)
                        else Verdict("tree", {0: describe_error(exc)})
                    )
                    decision = _Decision([verdict] * coord.world_size, error=exc)
                else:
                    decision = _decide_plan(gathered, backend, flat, cache, options, coord, merged)
            mine = _receive(coord, backend, decision)
        if not isinstance(mine, Resend):
            break
        hit = None
        # Cannot fail after a hit, which was planned before.
        payload, err = _payload(desc, coord, None)
    if isinstance(mine, Verdict):
        raise_verdict(coord, mine, err if decision is None else decision.error or err)
    assert isinstance(mine, Assignment) and desc.key is not None
    if mine.rows is None:
        assert hit is not None and hit.token == mine.token
        entry = hit
    else:
        if decision is not None and decision.entry is not None:
            entry = decision.entry
        else:
            entry = CachedPlan(token=mine.token, items=mine.rows.items_for(coord.rank))
        cache.store(desc.key, entry)
    return Agreed(
        entry=entry,
        save_id=mine.save_id,
        hold=decision.hold if decision is not None else None,
        reused=mine.rows is None,
        tree=decision.tree if decision is not None else None,
    )


def _payload(
    desc: LocalDescription, coord: Coordinator, hit: CachedPlan | None
) -> tuple[Described | Failure, BaseException | None]:
    """This rank's description as sent (the token of its cached plan, or its columns)."""
    if desc.error is not None:
        return Failure(describe_error(desc.error)), desc.error
    try:
        # Columns, not an object per box: the coordinator of thousands of ranks
        # plans millions of boxes in seconds, and each rank gets only its rows.
        own = Same(hit.token) if hit is not None else local_table(desc.specs, coord.rank)
    except Exception as exc:
        return Failure(describe_error(exc)), exc
    return Described(desc.digest, own), None


def _receive(coord: Coordinator, backend: Backend, decision: _Decision | None) -> Any:
    """This rank's share of the coordinator's decision (the data directory goes if that fails)."""
    try:
        return coord.scatter(decision.proposals if decision else None, "assign")
    except BaseException:
        if decision is not None and decision.save_id is not None:
            _abandon(backend, decision.save_id, decision.hold)
        raise


def _decide_plan(
    gathered: list[Any],
    backend: Backend,
    flat: FlatTree | None,
    cache: PlanCache,
    options: SaveOptions,
    coord: Coordinator,
    merged: MergedTree | None = None,
) -> _Decision:
    """The coordinator's answer to every rank's description: an assignment each, or the verdict.

    When a rank's tree digest differs from the coordinator's and the trees
    were not merged yet (``merged``), every rank is asked for its tree first.
    The plan of the last saves is reused when every rank sends the same
    token and the coordinator still holds that plan; a rank's unchanged
    description is taken from the coordinator's copy when another rank
    changed; when the coordinator has no copy, every rank is asked to resend.
    """
    world = coord.world_size
    failures = {r: p.text for r, p in enumerate(gathered) if isinstance(p, Failure)}
    if failures:
        return _Decision([Verdict("describe", failures)] * world)
    assert flat is not None
    shards = [p.shards for p in gathered]
    created: str | None = None
    hold = None
    try:
        if merged is None:
            own = gathered[0].digest
            if any(p.digest != own for p in gathered):
                return _Decision([SendTree(own, part_digests(flat))] * world)
            merged = MergedTree(structure=flat.structure, records=flat.records, holders={})
        tokens = {p.token for p in shards if isinstance(p, Same)}
        reuse: CachedPlan | None = None
        if len(tokens) == 1 and all(isinstance(p, Same) for p in shards):
            reuse = cache.by_token(next(iter(tokens)))
            if reuse is not None and (reuse.tables is None or reuse.plan is None):
                reuse = None
        entry: CachedPlan | None = None
        if reuse is None:
            tables: list[LocalTable] = []
            for r, p in enumerate(shards):
                if isinstance(p, Same):
                    known = cache.by_token(p.token)
                    if known is None or known.tables is None or len(known.tables) != world:
                        return _Decision([Resend()] * world)
                    tables.append(known.tables[r])
                else:
                    tables.append(p)
            plan = plan_save_table(tables, chunk_bytes=options.chunk_bytes)
            _check_same_tree(plan, merged)
            entry = CachedPlan(
                token=new_token(), items=plan.items_for(0), plan=plan, tables=tuple(tables)
            )
        save_id = secrets.token_hex(8)
        created = save_id
        # Its entry in the checkpoint directory becomes durable with the
        # directory fsync that follows the manifest's rename.
        backend.makedirs(layout.data_dir(save_id))
        hold = cleanup.claim(backend, save_id)
    except Exception as exc:
        if created is not None:
            _abandon(backend, created, hold)
        else:
            cleanup.release(hold)
        return _Decision([Verdict("plan", {0: describe_error(exc)})] * world, error=exc)
    if reuse is not None:
        return _Decision(
            [Assignment(None, save_id, reuse.token)] * world,
            save_id=save_id,
            hold=hold,
            tree=merged,
        )
    assert entry is not None and entry.plan is not None
    proposals: list[Any] = [
        Assignment(entry.plan.for_rank(r), save_id, entry.token) for r in range(world)
    ]
    return _Decision(proposals, save_id=save_id, hold=hold, entry=entry, tree=merged)


def _abandon(backend: Backend, save_id: str, hold: Any) -> None:
    """Remove a save's data directory before anything was written in it, then release it."""
    with contextlib.suppress(Exception):
        backend.remove_tree(layout.data_dir(save_id))
    cleanup.release(hold)


def _check_same_tree(plan: SavePlan, tree: MergedTree) -> None:
    """Every tensor some rank holds must be a tensor leaf of the union of the ranks' trees."""
    for fqn in plan.tensors.fqns:
        if not isinstance(tree.records.get(fqn), TensorLeaf):
            raise PlanError(f"{fqn}: a tensor on some rank but not a tensor of the saved tree")

"""One save: flatten, describe, plan, write, commit, agree.

The order of durable operations is what makes a commit atomic and last:

1. rank 0 creates ``data-<save_id>/`` (a name no committed manifest uses);
2. every rank writes and fsyncs its data files, then its chunk index;
3. rank 0 fsyncs the data directory, then commits ``manifest.json`` by an
   atomic replace (temp file, fsync, rename, fsync of the directory);
4. only then are the previous checkpoint's files removed (every rank its
   own share at the same time, rank 0 the rest), and those of abandoned
   saves (``shell/cleanup.py``).

Rank 0 holds a claim on the new data directory from its creation until its
commit, so no other save's clean-up removes it while this save runs.

A failure before step 3 leaves the previous manifest and its files untouched;
the failed save's directory is removed on a best-effort basis.

A save is four collectives: descriptions gathered, assignments scattered,
chunk index references gathered, the commit verdict broadcast. Each rank's
error rides in the gather and the verdict naming every failed rank in the
answer, so every rank raises the same error without rounds of their own.

The checkpoint holds the union of every rank's tree (``core/merge.py``).
Each description carries a digest of the rank's structure and leaf records;
when one differs from the coordinator's, the coordinator asks for the trees
(one more gather and scatter; each rank sends only its top-level entries
that differ from the coordinator's) and merges them, or every rank raises
the conflict. Each chunk index reference carries digests
of the rank's plain tensors, so that replicas whose bytes differ between
ranks are refused before the commit (``shell/union.py``).
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Any, NoReturn

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.incremental import ReuseTable
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import FORMAT_VERSION, ChunkIndex, IndexRef, Manifest
from treeckpt.core.merge import MergedTree, merge_trees, replica_conflicts
from treeckpt.core.options import SaveOptions
from treeckpt.core.plan_table import LocalTable, SavePlan, WriteItem, local_table, plan_save_table
from treeckpt.core.specs import ShardSpec
from treeckpt.core.tree import FlatTree, flatten_tree
from treeckpt.errors import CheckpointError, PlanError, RankConflictError, RankFailureError
from treeckpt.shell import cleanup
from treeckpt.shell.coord import Coordinator, describe_error
from treeckpt.shell.plancache import CachedPlan, PlanCache, PlanKey, new_token
from treeckpt.shell.sharded import ADAPTERS
from treeckpt.shell.tensors import chunk_source, local_shards
from treeckpt.shell.union import (
    describe_parts,
    describe_tree,
    is_plain,
    part_digests,
    replica_digests,
    tree_digest,
)
from treeckpt.store import layout
from treeckpt.store.backends import Backend
from treeckpt.store.checksum import checksum
from treeckpt.store.chunks import WriteJob, write_chunks
from treeckpt.store.manifest import encode_index, encode_manifest
from treeckpt.store.reader import read_manifest

__all__ = ["PreparedSave", "SaveResult", "commit_save", "prepare_save", "save_tree"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveResult:
    """What a committed save wrote (``plan`` is the whole plan on rank 0, ``None`` elsewhere)."""

    path: str
    save_id: str
    plan: SavePlan | None


def save_tree(
    tree: Any,
    backend: Backend,
    *,
    options: SaveOptions,
    coord: Coordinator,
    allow_pickle: bool = False,
    user_metadata: dict[str, Any] | None = None,
    reuse: ReuseTable | None = None,
    cache: PlanCache | None = None,
) -> SaveResult:
    """Save ``tree`` to ``backend`` from every rank of ``coord``.

    ``reuse`` (incremental saves, this rank's table) lets chunks whose raw
    bytes a committed sibling checkpoint stores be referenced, not rewritten.
    ``cache``: plans kept from earlier saves (the process-wide one by default).
    """
    prepared = prepare_save(
        tree, backend, options=options, coord=coord, allow_pickle=allow_pickle, cache=cache
    )
    return commit_save(
        prepared, backend, options=options, coord=coord, user_metadata=user_metadata, reuse=reuse
    )


@dataclass(slots=True, kw_only=True)
class PreparedSave:
    """A planned save: this rank's write items and the data they come from.

    ``local`` maps an FQN to (global box, local tensor) pairs; an asynchronous
    save replaces the tensors with staged host copies before writing.
    ``tree`` is the union of every rank's tree (on the coordinator only).
    ``plain`` names this rank's plain tensors whose copies are compared
    across ranks; ``digests`` holds those already computed (by staging, for
    the replicas it does not copy).
    """

    flat: FlatTree
    items: tuple[WriteItem, ...]
    local: dict[str, list[tuple[Box, Any]]]
    save_id: str
    plan: SavePlan | None
    hold: Any = None  # rank 0's claim on the data directory, released by the commit
    reused_plan: bool = False  # the plan came from the plan cache
    tree: MergedTree | None = None
    plain: tuple[str, ...] = ()
    digests: dict[str, str] = field(default_factory=dict)


#: Plans kept across saves when the caller gives no cache of its own.
SHARED_PLAN_CACHE = PlanCache()


# What crosses ranks. A phase is one gather to the coordinator, which decides,
# and one scatter or broadcast of its decision: each rank's error travels in
# the gather and the verdict naming every failed rank in the answer, so every
# rank raises the same error without a separate agreement round.
@dataclass(frozen=True, slots=True)
class _Failure:
    """This rank failed the phase: the description of its error."""

    text: str


@dataclass(frozen=True, slots=True)
class _Verdict:
    """The phase failed on these ranks: every rank raises it.

    ``conflict``: the ranks' states contradict each other (no rank failed):
    every rank raises a ``RankConflictError`` with this text.
    """

    phase: str
    failures: dict[int, str]
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class _Described:
    """A rank's description: the digest of its tree (empty with one rank) and its shards."""

    digest: str
    shards: Any  # LocalTable, or _Same when the plan cache holds them


@dataclass(frozen=True, slots=True)
class _SendTree:
    """Some rank's tree differs from the coordinator's (whose digest this is): send it.

    ``parts``: the digest of each of the coordinator's top-level entries; a
    rank leaves out those it has alike (``shell/union.py``).
    """

    digest: str
    parts: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class _Written:
    """A rank's chunk index (``None``: it wrote nothing) and the digests of its plain tensors."""

    ref: IndexRef | None
    digests: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Same:
    """This rank's description is unchanged since the plan named ``token``."""

    token: str


@dataclass(frozen=True, slots=True)
class _Assignment:
    """A rank's share of the plan: ``rows`` (``None``: reuse the cached plan ``token``)."""

    rows: SavePlan | None
    save_id: str
    token: str


@dataclass(frozen=True, slots=True)
class _Committed:
    """The commit took effect; ``previous`` is the save id of the checkpoint it replaced."""

    previous: str | None


@dataclass(frozen=True, slots=True)
class _Resend:
    """The coordinator lacks a rank's description: every rank sends its own."""


@dataclass(slots=True)
class _Decision:
    """What the coordinator decided, for every rank and for itself."""

    proposals: list[Any]
    save_id: str | None = None
    hold: Any = None
    entry: CachedPlan | None = None
    error: BaseException | None = None
    tree: MergedTree | None = None


def _raise_verdict(coord: Coordinator, verdict: _Verdict, own: BaseException | None) -> NoReturn:
    if verdict.conflict is not None:
        if isinstance(own, RankConflictError):
            raise own
        raise RankConflictError(verdict.conflict)
    if own is not None and coord.world_size == 1:
        coord.agree(verdict.phase, own)  # one process: the error itself, as it was raised
    raise RankFailureError(verdict.phase, dict(verdict.failures)) from own


def prepare_save(
    tree: Any,
    backend: Backend,
    *,
    options: SaveOptions,
    coord: Coordinator,
    allow_pickle: bool = False,
    cache: PlanCache | None = None,
) -> PreparedSave:
    """Flatten and describe on every rank, plan on the coordinator, scatter the plan.

    Two collectives: every rank's description (or error) is gathered, and
    the coordinator scatters each rank's assignment (or the verdict). A
    layout planned before is not planned again (``cache``, see
    ``shell/plancache.py``). When a rank's tree differs from the
    coordinator's (its digest does), the coordinator's answer asks for the
    trees instead: they are gathered and merged, then the assignments are
    scattered (two collectives more). On failure or conflict every rank
    raises and nothing is left behind.
    """
    cache = SHARED_PLAN_CACHE if cache is None else cache
    flat: FlatTree | None = None
    local: dict[str, list[tuple[Box, Any]]] = {}
    specs: list[ShardSpec] = []
    key: PlanKey | None = None
    hit: CachedPlan | None = None
    err: BaseException | None = None
    digest = ""
    plain: tuple[str, ...] = ()
    payload: Any
    try:
        flat = flatten_tree(tree, allow_pickle=allow_pickle, adapters=ADAPTERS)
        for fqn, rec in flat.records.items():
            if isinstance(rec, TensorLeaf):
                spec, shards = local_shards(fqn, flat.leaves[fqn], rec)
                specs.append(spec)
                local[fqn] = shards
        if coord.world_size > 1:
            digest = tree_digest(flat)
            if options.check_replicas:
                plain = tuple(f for f in local if is_plain(flat.leaves[f]))
        key = PlanKey(
            world_size=coord.world_size,
            rank=coord.rank,
            chunk_bytes=options.chunk_bytes,
            specs=tuple(specs),
        )
        hit = cache.lookup(key)
        # Columns, not an object per box: the coordinator of thousands of ranks
        # plans millions of boxes in seconds, and each rank gets only its rows.
        own = _Same(hit.token) if hit is not None else local_table(specs, coord.rank)
        payload = _Described(digest, own)
    except Exception as exc:
        err = exc
        payload = _Failure(describe_error(exc))

    decision: _Decision | None = None
    merged: MergedTree | None = None  # the coordinator's, once the ranks' trees were merged
    while True:
        gathered = coord.gather(payload, "plan")
        if coord.is_coordinator:
            assert gathered is not None
            decision = _decide_plan(gathered, backend, flat, cache, options, coord, merged)
        # The assignment has its own phase name: a rank dying in between is named.
        mine = _receive(coord, backend, decision)
        if isinstance(mine, _SendTree):
            assert flat is not None  # no rank failed to describe itself
            sent = None if mine.digest == digest else describe_parts(flat, mine.parts)
            trees = coord.gather(sent, "tree")
            if coord.is_coordinator:
                assert trees is not None and gathered is not None
                try:
                    base = describe_tree(flat)
                    merged = merge_trees([base if t is None else t for t in trees])
                except Exception as exc:
                    verdict = (
                        _Verdict("tree", {}, conflict=str(exc))
                        if isinstance(exc, RankConflictError)
                        else _Verdict("tree", {0: describe_error(exc)})
                    )
                    decision = _Decision([verdict] * coord.world_size, error=exc)
                else:
                    decision = _decide_plan(gathered, backend, flat, cache, options, coord, merged)
            mine = _receive(coord, backend, decision)
        if not isinstance(mine, _Resend):
            break
        hit = None
        try:
            payload = _Described(digest, local_table(specs, coord.rank))
        except Exception as exc:  # cannot happen after a hit, which was planned before
            err = exc
            payload = _Failure(describe_error(exc))
    if isinstance(mine, _Verdict):
        _raise_verdict(coord, mine, err if decision is None else decision.error or err)
    assert isinstance(mine, _Assignment) and flat is not None and key is not None
    if mine.rows is None:
        assert hit is not None and hit.token == mine.token
        entry = hit
    else:
        if decision is not None and decision.entry is not None:
            entry = decision.entry
        else:
            entry = CachedPlan(token=mine.token, items=mine.rows.items_for(coord.rank))
        cache.store(key, entry)
    return PreparedSave(
        flat=flat,
        items=entry.items,
        local=local,
        save_id=mine.save_id,
        plan=entry.plan,
        hold=decision.hold if decision is not None else None,
        reused_plan=mine.rows is None,
        tree=decision.tree if decision is not None else None,
        plain=plain,
    )


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
    failures = {r: p.text for r, p in enumerate(gathered) if isinstance(p, _Failure)}
    if failures:
        return _Decision([_Verdict("describe", failures)] * world)
    assert flat is not None
    shards = [p.shards for p in gathered]
    created: str | None = None
    hold = None
    try:
        if merged is None:
            own = gathered[0].digest
            if any(p.digest != own for p in gathered):
                return _Decision([_SendTree(own, part_digests(flat))] * world)
            merged = MergedTree(structure=flat.structure, records=flat.records, holders={})
        tokens = {p.token for p in shards if isinstance(p, _Same)}
        reuse: CachedPlan | None = None
        if len(tokens) == 1 and all(isinstance(p, _Same) for p in shards):
            reuse = cache.by_token(next(iter(tokens)))
            if reuse is not None and (reuse.tables is None or reuse.plan is None):
                reuse = None
        entry: CachedPlan | None = None
        if reuse is None:
            tables: list[LocalTable] = []
            for r, p in enumerate(shards):
                if isinstance(p, _Same):
                    known = cache.by_token(p.token)
                    if known is None or known.tables is None or len(known.tables) != world:
                        return _Decision([_Resend()] * world)
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
        return _Decision([_Verdict("plan", {0: describe_error(exc)})] * world, error=exc)
    if reuse is not None:
        return _Decision(
            [_Assignment(None, save_id, reuse.token)] * world,
            save_id=save_id,
            hold=hold,
            tree=merged,
        )
    assert entry is not None and entry.plan is not None
    proposals: list[Any] = [
        _Assignment(entry.plan.for_rank(r), save_id, entry.token) for r in range(world)
    ]
    return _Decision(proposals, save_id=save_id, hold=hold, entry=entry, tree=merged)


def _abandon(backend: Backend, save_id: str, hold: Any) -> None:
    """Remove a save's data directory before anything was written in it, then release it."""
    with contextlib.suppress(Exception):
        backend.remove_tree(layout.data_dir(save_id))
    cleanup.release(hold)


def commit_save(
    prepared: PreparedSave,
    backend: Backend,
    *,
    options: SaveOptions,
    coord: Coordinator,
    user_metadata: dict[str, Any] | None = None,
    failed: BaseException | None = None,
    reuse: ReuseTable | None = None,
) -> SaveResult:
    """Write every rank's items, then commit the manifest on the coordinator.

    Two collectives: every rank's chunk index reference (or error) is
    gathered, and the coordinator broadcasts the verdict after its commit.
    If anything fails on any rank, every rank raises, nothing is committed and
    the save's own directory is removed; the previous checkpoint is untouched.
    ``failed``: this rank already failed (e.g. while staging); it writes
    nothing and reports the error when the ranks agree on the writes.
    """
    flat, save_id = prepared.flat, prepared.save_id
    committed = False
    previous: str | None = None
    try:
        err: BaseException | None = failed
        payload: Any = None
        if err is None:
            try:
                digests = replica_digests(prepared.local, prepared.plain, prepared.digests)
                ref = _write_rank(
                    backend, prepared.items, save_id, coord.rank, prepared.local, options, reuse
                )
                payload = _Written(ref, digests)
            except Exception as exc:
                err = exc
        if err is not None:
            payload = _Failure(describe_error(err))
        refs = coord.gather(payload, "write")

        verdict: _Verdict | _Committed | None = None
        if coord.is_coordinator:
            assert refs is not None
            failures = {r: p.text for r, p in enumerate(refs) if isinstance(p, _Failure)}
            conflicts = [] if failures else replica_conflicts([p.digests for p in refs])
            if failures:
                verdict = _Verdict("write", failures)
            elif conflicts:
                text = "; ".join(conflicts)
                verdict = _Verdict("write", {}, conflict=f"replicas differ between ranks: {text}")
            else:
                try:
                    # The checkpoint this commit replaces: its files go after the commit.
                    previous = _previous_save_id(backend)
                    tree = prepared.tree or MergedTree(
                        structure=flat.structure, records=flat.records, holders={}
                    )
                    manifest = Manifest(
                        format_version=FORMAT_VERSION,
                        save_id=save_id,
                        world_size=coord.world_size,
                        structure=tree.structure,
                        records=tree.records,
                        indexes=tuple(p.ref for p in refs if p.ref is not None),
                        user_metadata=dict(user_metadata or {}),
                        holders=tree.holders,
                    )
                    if options.sync and backend.supports_fsync:
                        backend.sync_dir(layout.data_dir(save_id))
                    backend.commit_file(
                        layout.MANIFEST, encode_manifest(manifest), sync=options.sync
                    )
                    committed = True
                    verdict = _Committed(previous)
                except Exception as exc:
                    err = exc
                    verdict = _Verdict("commit", {0: describe_error(exc)})
                    # The rename may have taken effect before a later step (the
                    # directory fsync) failed: then the new manifest is live and its
                    # data must stay. Report the failure, delete nothing.
                    committed = _previous_save_id(backend) == save_id
        verdict = coord.broadcast(verdict, "commit")
        if isinstance(verdict, _Verdict):
            _raise_verdict(coord, verdict, err)
        assert isinstance(verdict, _Committed)
        previous = verdict.previous
        committed = True
    finally:
        if not committed and coord.is_coordinator:
            with contextlib.suppress(Exception):
                backend.remove_tree(layout.data_dir(save_id))
        cleanup.release(prepared.hold)  # after the commit (or the failure): nothing to protect
    if previous is not None and previous != save_id:
        # Every rank removes the files it wrote of the replaced checkpoint, at
        # the same time; rank 0 then removes what is left, the directory too.
        _remove_rank_files(backend, previous, coord.rank)
    if coord.is_coordinator:
        cleanup.remove_stale(backend, own=save_id, previous=previous)
        return SaveResult(path=backend.root, save_id=save_id, plan=prepared.plan)
    return SaveResult(path=backend.root, save_id=save_id, plan=None)


def _previous_save_id(backend: Backend) -> str | None:
    """The save id of the checkpoint being replaced, if a valid one is committed."""
    if backend.size(layout.MANIFEST) is None:
        return None
    try:
        return read_manifest(backend).save_id
    except CheckpointError:
        return None


def _remove_rank_files(backend: Backend, save_id: str, rank: int) -> None:
    """Best effort: rank ``rank``'s data files and chunk index of the replaced save ``save_id``."""
    folder = layout.data_dir(save_id)
    index = layout.index_file(save_id, rank)
    with contextlib.suppress(Exception):
        for base in backend.listdir(folder):
            name = f"{folder}/{base}"
            if name == index or layout.is_data_file(name, save_id, rank):
                with contextlib.suppress(Exception):
                    backend.remove_tree(name)


def _check_same_tree(plan: SavePlan, tree: MergedTree) -> None:
    """Every tensor some rank holds must be a tensor leaf of the union of the ranks' trees."""
    for fqn in plan.tensors.fqns:
        if not isinstance(tree.records.get(fqn), TensorLeaf):
            raise PlanError(f"{fqn}: a tensor on some rank but not a tensor of the saved tree")


def _write_rank(
    backend: Backend,
    items: tuple[WriteItem, ...],
    save_id: str,
    rank: int,
    local: dict[str, list[tuple[Box, Any]]],
    options: SaveOptions,
    reuse: ReuseTable | None = None,
) -> IndexRef | None:
    if not items:
        return None
    jobs = []
    for item in items:
        data = next(d for box, d in local[item.fqn] if box == item.shard)
        jobs.append(
            WriteJob(
                item=item,
                itemsize=dtype_info(item.dtype).itemsize,
                source=chunk_source(data, item.shard, item.chunk),
            )
        )
    files, chunks = write_chunks(backend, save_id, rank, jobs, options, reuse)
    blob = encode_index(ChunkIndex(save_id=save_id, rank=rank, files=files, chunks=chunks))
    name = layout.index_file(save_id, rank)
    # A new file in this save's own directory: no rename needed (nothing reads
    # it before the manifest names it); rank 0 fsyncs the directory once.
    writer = backend.open_writer(name)
    try:
        writer.write(blob)
        writer.close(sync=options.sync)
    except BaseException:
        writer.abort()
        raise
    return IndexRef(rank=rank, file=name, size=len(blob), checksum=checksum(blob))

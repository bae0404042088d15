"""One save: flatten, describe, plan, write, commit, agree.

The order of durable operations is what makes a commit atomic and last:

1. rank 0 creates ``data-<save_id>/`` (a name no committed manifest uses);
2. every rank writes and fsyncs its data files, then its chunk index;
3. rank 0 fsyncs the data directory, then commits ``manifest.json`` by an
   atomic replace (temp file, fsync, rename, fsync of the directory);
4. only then are the previous checkpoint's files removed, and those of
   abandoned saves (``shell/cleanup.py``).

Rank 0 holds a claim on the new data directory from its creation until its
commit, so no other save's clean-up removes it while this save runs.

A failure before step 3 leaves the previous manifest and its files untouched;
the failed save's directory is removed on a best-effort basis.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from typing import Any

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.incremental import ReuseTable
from treeckpt.core.items import WriteItem
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import FORMAT_VERSION, ChunkIndex, IndexRef, Manifest
from treeckpt.core.options import SaveOptions
from treeckpt.core.plan_table import LocalTable, SavePlanTable, local_table, plan_save_table
from treeckpt.core.specs import ShardSpec
from treeckpt.core.tree import FlatTree, flatten_tree
from treeckpt.errors import CheckpointError, PlanError
from treeckpt.shell import cleanup
from treeckpt.shell.coord import Coordinator
from treeckpt.shell.tensors import chunk_source, local_shards
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
    plan: SavePlanTable | None


def save_tree(
    tree: Any,
    backend: Backend,
    *,
    options: SaveOptions,
    coord: Coordinator,
    allow_pickle: bool = False,
    user_metadata: dict[str, Any] | None = None,
    reuse: ReuseTable | None = None,
) -> SaveResult:
    """Save ``tree`` to ``backend`` from every rank of ``coord``.

    ``reuse`` (incremental saves, this rank's table) lets chunks whose raw
    bytes a committed sibling checkpoint stores be referenced, not rewritten.
    """
    prepared = prepare_save(tree, backend, options=options, coord=coord, allow_pickle=allow_pickle)
    return commit_save(
        prepared, backend, options=options, coord=coord, user_metadata=user_metadata, reuse=reuse
    )


@dataclass(slots=True, kw_only=True)
class PreparedSave:
    """A planned save: this rank's write items and the data they come from.

    ``local`` maps an FQN to (global box, local tensor) pairs; an asynchronous
    save replaces the tensors with staged host copies before writing.
    """

    flat: FlatTree
    items: tuple[WriteItem, ...]
    local: dict[str, list[tuple[Box, Any]]]
    save_id: str
    plan: SavePlanTable | None
    previous: str | None
    hold: Any = None  # rank 0's claim on the data directory, released by the commit


def prepare_save(
    tree: Any,
    backend: Backend,
    *,
    options: SaveOptions,
    coord: Coordinator,
    allow_pickle: bool = False,
) -> PreparedSave:
    """Flatten and describe on every rank, plan on the coordinator, scatter the plan.

    On failure every rank raises and nothing is left behind.
    """
    flat: FlatTree | None = None
    local: dict[str, list[tuple[Box, Any]]] = {}
    specs: list[ShardSpec] = []
    table: LocalTable | None = None
    err: BaseException | None = None
    try:
        flat = flatten_tree(tree, allow_pickle=allow_pickle)
        for fqn, rec in flat.records.items():
            if isinstance(rec, TensorLeaf):
                spec, shards = local_shards(fqn, flat.leaves[fqn], rec)
                specs.append(spec)
                local[fqn] = shards
        table = local_table(specs, coord.rank)
    except Exception as exc:
        err = exc
    coord.agree("describe", err)
    assert flat is not None

    # Columns, not an object per box: the coordinator of thousands of ranks
    # plans millions of boxes in seconds, and each rank gets only its rows.
    gathered = coord.gather(table, "plan")
    plan: SavePlanTable | None = None
    previous: str | None = None
    proposals: list[Any] | None = None
    hold = None
    if coord.is_coordinator:
        created: str | None = None
        try:
            assert gathered is not None
            plan = plan_save_table(gathered, chunk_bytes=options.chunk_bytes)
            _check_same_tree(plan, flat)
            save_id = secrets.token_hex(8)
            previous = _previous_save_id(backend)
            created = save_id
            # Its entry in the checkpoint directory becomes durable with the
            # directory fsync that follows the manifest's rename.
            backend.makedirs(layout.data_dir(save_id))
            hold = cleanup.claim(backend, save_id)
            proposals = [(plan.for_rank(r), save_id) for r in range(coord.world_size)]
        except Exception as exc:
            if created is not None:
                with contextlib.suppress(Exception):
                    backend.remove_tree(layout.data_dir(created))
            cleanup.release(hold)
            proposals = [exc] * coord.world_size
    mine = coord.scatter(proposals, "assign")  # its own name: a rank dying in between is named
    failed = isinstance(mine, BaseException) and coord.is_coordinator
    coord.agree("plan", mine if failed else None)
    my_rows, save_id = mine
    return PreparedSave(
        flat=flat,
        items=my_rows.items_for(coord.rank),
        local=local,
        save_id=save_id,
        plan=plan,
        previous=previous,
        hold=hold,
    )


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

    If anything fails on any rank, every rank raises, nothing is committed and
    the save's own directory is removed; the previous checkpoint is untouched.
    ``failed``: this rank already failed (e.g. while staging); it writes
    nothing and reports the error when the ranks agree on the writes.
    """
    flat, save_id = prepared.flat, prepared.save_id
    committed = False
    try:
        ref: IndexRef | None = None
        err: BaseException | None = failed
        if err is None:
            try:
                ref = _write_rank(
                    backend, prepared.items, save_id, coord.rank, prepared.local, options, reuse
                )
            except Exception as exc:
                err = exc
        coord.agree("write", err)
        refs = coord.gather(ref, "write")

        err = None
        if coord.is_coordinator:
            try:
                assert refs is not None
                manifest = Manifest(
                    format_version=FORMAT_VERSION,
                    save_id=save_id,
                    world_size=coord.world_size,
                    structure=flat.structure,
                    records=flat.records,
                    indexes=tuple(r for r in refs if r is not None),
                    user_metadata=dict(user_metadata or {}),
                )
                if options.sync and backend.supports_fsync:
                    backend.sync_dir(layout.data_dir(save_id))
                backend.commit_file(layout.MANIFEST, encode_manifest(manifest), sync=options.sync)
                committed = True
            except Exception as exc:
                err = exc
                # The rename may have taken effect before a later step (the
                # directory fsync) failed: then the new manifest is live and its
                # data must stay. Report the failure, delete nothing.
                committed = _previous_save_id(backend) == save_id
        coord.agree("commit", err)
        committed = True
    finally:
        if not committed and coord.is_coordinator:
            with contextlib.suppress(Exception):
                backend.remove_tree(layout.data_dir(save_id))
        cleanup.release(prepared.hold)  # after the commit (or the failure): nothing to protect
    if coord.is_coordinator:
        cleanup.remove_stale(backend, own=save_id, previous=prepared.previous)
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


def _check_same_tree(plan: SavePlanTable, flat: FlatTree) -> None:
    """Every tensor some rank holds must be a tensor leaf of the coordinator's tree."""
    for fqn in plan.tensors.fqns:
        if not isinstance(flat.records.get(fqn), TensorLeaf):
            raise PlanError(
                f"{fqn}: a tensor on another rank but not on rank 0; every rank must "
                "save a tree with the same keys"
            )


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

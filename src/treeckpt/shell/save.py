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

The first two collectives (and the tree merge and plan cache they may
involve) are the plan phase, ``shell/negotiate.py``; the messages of every
phase are in ``shell/messages.py``.

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
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.extents import Extents, extents_of_plan
from treeckpt.core.incremental import ReuseTable
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import (
    FORMAT_VERSION,
    ChunkIndex,
    ChunkRef,
    DataFile,
    IndexRef,
    Manifest,
)
from treeckpt.core.merge import MergedTree, replica_conflicts
from treeckpt.core.options import SaveOptions
from treeckpt.core.plan_table import SavePlan, WriteItem
from treeckpt.core.tree import FlatTree, flatten_tree
from treeckpt.errors import CheckpointError
from treeckpt.shell import cleanup, codec_choice
from treeckpt.shell.coord import Coordinator, describe_error
from treeckpt.shell.messages import Committed, Failure, Verdict, Written, raise_verdict
from treeckpt.shell.negotiate import LocalDescription, negotiate_plan
from treeckpt.shell.plancache import SHARED_PLAN_CACHE, PlanCache, PlanKey
from treeckpt.shell.sharded import ADAPTERS
from treeckpt.shell.tensors import chunk_source, local_shards
from treeckpt.shell.transfer import lane_fetchers
from treeckpt.shell.union import is_plain, replica_digests, tree_digest
from treeckpt.store import layout
from treeckpt.store.backends import Backend
from treeckpt.store.checksum import checksum
from treeckpt.store.chunks import ChunkFetcher, WriteJob, write_chunks
from treeckpt.store.manifest import encode_binary_index, encode_manifest
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


def prepare_save(
    tree: Any,
    backend: Backend,
    *,
    options: SaveOptions,
    coord: Coordinator,
    allow_pickle: bool = False,
    cache: PlanCache | None = None,
) -> PreparedSave:
    """Flatten and describe on every rank, then agree on the plan (``shell/negotiate.py``).

    Two collectives: every rank's description (or error) is gathered, and
    the coordinator scatters each rank's assignment (or the verdict); two
    more when the ranks' trees differ and are merged. A layout planned
    before is not planned again (``cache``, see ``shell/plancache.py``). On
    failure or conflict every rank raises and nothing is left behind.
    """
    cache = SHARED_PLAN_CACHE if cache is None else cache
    desc = LocalDescription(specs=[])
    local: dict[str, list[tuple[Box, Any]]] = {}
    plain: tuple[str, ...] = ()
    try:
        desc.flat = flat = flatten_tree(tree, allow_pickle=allow_pickle, adapters=ADAPTERS)
        for fqn, rec in flat.records.items():
            if isinstance(rec, TensorLeaf):
                spec, shards = local_shards(fqn, flat.leaves[fqn], rec)
                desc.specs.append(spec)
                local[fqn] = shards
        if coord.world_size > 1:
            desc.digest = tree_digest(flat)
            if options.check_replicas:
                plain = tuple(f for f in local if is_plain(flat.leaves[f]))
        desc.key = PlanKey(
            world_size=coord.world_size,
            rank=coord.rank,
            chunk_bytes=options.chunk_bytes,
            specs=tuple(desc.specs),
        )
        desc.hit = cache.lookup(desc.key)
    except Exception as exc:
        desc.error = exc
    agreed = negotiate_plan(desc, backend, cache=cache, options=options, coord=coord)
    assert desc.flat is not None
    return PreparedSave(
        flat=desc.flat,
        items=agreed.entry.items,
        local=local,
        save_id=agreed.save_id,
        plan=agreed.entry.plan,
        hold=agreed.hold,
        reused_plan=agreed.reused,
        tree=agreed.tree,
        plain=plain,
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
                payload = Written(ref, digests)
            except Exception as exc:
                err = exc
        if err is not None:
            payload = Failure(describe_error(err))
        refs = coord.gather(payload, "write")

        verdict: Verdict | Committed | None = None
        if coord.is_coordinator:
            assert refs is not None
            failures = {r: p.text for r, p in enumerate(refs) if isinstance(p, Failure)}
            conflicts = [] if failures else replica_conflicts([p.digests for p in refs])
            if failures:
                verdict = Verdict("write", failures)
            elif conflicts:
                text = "; ".join(conflicts)
                verdict = Verdict("write", {}, conflict=f"replicas differ between ranks: {text}")
            else:
                try:
                    # The checkpoint this commit replaces: its files go after the commit.
                    previous = _previous_save_id(backend)
                    tree = prepared.tree or MergedTree(
                        structure=flat.structure, records=flat.records, holders={}
                    )
                    indexes = tuple(p.ref for p in refs if p.ref is not None)
                    manifest = Manifest(
                        format_version=FORMAT_VERSION,
                        save_id=save_id,
                        world_size=coord.world_size,
                        structure=tree.structure,
                        records=tree.records,
                        indexes=indexes,
                        user_metadata=dict(user_metadata or {}),
                        holders=tree.holders,
                        extents=_extents(prepared.plan, indexes),
                    )
                    if options.sync and backend.supports_fsync:
                        backend.sync_dir(layout.data_dir(save_id))
                    backend.commit_file(
                        layout.MANIFEST, encode_manifest(manifest), sync=options.sync
                    )
                    committed = True
                    # After the commit: a marker names only a committed checkpoint.
                    _mark_for_dcp_tools(backend, sync=options.sync)
                    verdict = Committed(previous)
                except Exception as exc:
                    err = exc
                    verdict = Verdict("commit", {0: describe_error(exc)})
                    # The rename may have taken effect before a later step (the
                    # directory fsync, the marker) failed: then the new manifest is live and its
                    # data must stay. Report the failure, delete nothing.
                    committed = _previous_save_id(backend) == save_id
        verdict = coord.broadcast(verdict, "commit")
        if isinstance(verdict, Verdict):
            raise_verdict(coord, verdict, err)
        assert isinstance(verdict, Committed)
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


def _mark_for_dcp_tools(backend: Backend, *, sync: bool) -> None:
    """Write ``.metadata`` (``layout.DCP_MARKER``) unless this checkpoint has it already."""
    want = layout.DCP_MARKER_BYTES
    same = backend.size(layout.DCP_MARKER) == len(want)
    if same and backend.read_range(layout.DCP_MARKER, 0, len(want)) == want:
        return
    backend.commit_file(layout.DCP_MARKER, want, sync=sync)


def _extents(plan: SavePlan | None, indexes: tuple[IndexRef, ...]) -> Extents | None:
    """The writers' map of the manifest: recorded when there is more than one index to choose from.

    ``None`` (every reader reads every index) when the plan is not the whole
    plan or names a writer that wrote no index.
    """
    if plan is None or len(indexes) < 2:
        return None
    extents = extents_of_plan(plan)
    return extents if extents.ranks <= {i.rank for i in indexes} else None


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
    with contextlib.suppress(Exception):
        for base in backend.listdir(folder):
            name = f"{folder}/{base}"
            if layout.is_index_file(name, save_id, rank) or layout.is_data_file(
                name, save_id, rank
            ):
                with contextlib.suppress(Exception):
                    backend.remove_tree(name)


def _write_adaptive(
    backend: Backend,
    save_id: str,
    rank: int,
    jobs: list[WriteJob],
    options: SaveOptions,
    reuse: ReuseTable | None,
    fetcher: Callable[[], ChunkFetcher] | None,
) -> tuple[tuple[DataFile, ...], tuple[ChunkRef, ...]]:
    """``write_chunks`` compressing only the chunks that pay for time (``shell/codec_choice.py``)."""
    infos = [
        codec_choice.ChunkInfo(j.item.nbytes, j.item.dtype, j.itemsize, j.source) for j in jobs
    ]
    total = sum(i.nbytes for i in infos)
    if total < codec_choice.SMALL_SAVE_BYTES:  # too little to measure, too little to gain
        jobs = [dataclasses.replace(j, compress=False) for j in jobs]
        return write_chunks(backend, save_id, rank, jobs, options, reuse, fetcher)
    key = backend.storage_key()
    meter = codec_choice.MeteredBackend(backend)
    probed = codec_choice.probe_classes(infos, options.compression)
    chooser = codec_choice.CodecChooser(
        infos,
        codec_choice.class_rates(probed),
        write_bps=codec_choice.RATES.get(key),
        lanes=max(1, min(options.io_threads, len(jobs))),
        cores=codec_choice.cores(),
        meter=meter,
        probe_bytes=min(codec_choice.PROBE_BYTES, total // 8),
    )
    jobs = [dataclasses.replace(j, compress=chooser.asker(n)) for n, j in enumerate(jobs)]
    out = write_chunks(meter, save_id, rank, jobs, options, reuse, fetcher)
    written, seconds = meter.sample()
    if written >= codec_choice.LEARN_MIN_BYTES and seconds > 0:
        codec_choice.RATES.learn(key, written / seconds)
    chooser.learn(codec_choice.ENCODE_RATES, probed)
    return out


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
    # Chunks of device tensors are copied through each lane's reused host buffers.
    fetcher = lane_fetchers([j.source for j in jobs], options.chunk_bytes)
    if options.compression.mode == "adaptive":
        files, chunks = _write_adaptive(backend, save_id, rank, jobs, options, reuse, fetcher)
    else:
        files, chunks = write_chunks(backend, save_id, rank, jobs, options, reuse, fetcher)
    blob = encode_binary_index(ChunkIndex(save_id=save_id, rank=rank, files=files, chunks=chunks))
    name = layout.binary_index_file(save_id, rank)
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

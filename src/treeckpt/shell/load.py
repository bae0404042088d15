"""One load: read the manifest, match the template, plan, read in place, rebuild.

Strict by default: missing and unexpected keys, shape, dtype and kind
mismatches are collected and raised together before any byte of the template
changes. Inside a ``Stateful`` object other than an ``nn.Module`` (an
optimizer, a scheduler, a user object), the checkpoint's structure wins:
entries the template lacks are materialised (a fresh optimizer has no state
yet) and the object's own ``load_state_dict`` receives the full state.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf, ValueLeaf
from treeckpt.core.manifest import Manifest
from treeckpt.core.options import LoadOptions
from treeckpt.core.plan import LoadPlan, ReadItem, StoredTensor, plan_load
from treeckpt.core.specs import ShardSpec, full_spec
from treeckpt.core.tree import (
    StatefulRef,
    build_tree,
    find_subtree,
    flatten_tree,
    map_tree,
    update_tree,
)
from treeckpt.core.values import adopt_value
from treeckpt.core.widening import cast_refusal
from treeckpt.errors import LoadMismatchError, ManifestError, UnsupportedLeafError
from treeckpt.shell.optim import safe_torch_state_init, state_targets
from treeckpt.shell.sharded import ADAPTERS
from treeckpt.shell.tensors import (
    Converter,
    Destination,
    allocate,
    destination,
    dtype_code,
    finish_leaf,
    local_shards,
    on_meta,
)
from treeckpt.shell.transfer import Uploads
from treeckpt.store.backends import Backend
from treeckpt.store.chunks import ReadTarget, ReadTask, read_chunks
from treeckpt.store.reader import StoredChunks, read_indexes, stored_tensors

__all__ = ["load_tree", "read_into", "restore_tree"]

log = logging.getLogger("treeckpt.load")


_NO_TEMPLATE: Any = object()


def value_of(fqn: str, rec: LeafRecord, *, allow_pickle: bool, template: Any = _NO_TEMPLATE) -> Any:
    """The Python value of a non-tensor leaf record (a fresh copy: sets, Counters).

    With ``template`` (the template's leaf at ``fqn``), enum members take the
    template's enum types (raises LoadMismatchError when its type lacks the
    member or gives it another value).
    """
    if isinstance(rec, ValueLeaf):
        return adopt_value(fqn, rec.value, None if template is _NO_TEMPLATE else template)
    if isinstance(rec, PickleLeaf):
        if not allow_pickle:
            raise UnsupportedLeafError(
                f"{fqn!r} was saved with pickle; loading it runs code from the checkpoint. "
                "Pass allow_pickle=True only if you trust this checkpoint"
            )
        return pickle.loads(rec.data)
    raise TypeError(f"{fqn!r} is a tensor")


def read_into(
    backend: Backend,
    manifest: Manifest,
    stored: Mapping[str, StoredTensor],
    targets: Mapping[str, Any],
    options: LoadOptions,
) -> LoadPlan:
    """Fill ``targets`` (FQN -> tensor, DTensor, ShardedTensor or array) in place.

    Each target asks for the boxes this rank holds of it (the whole tensor for
    plain tensors), and only the chunks covering those boxes are read.
    """
    regions: dict[str, list[tuple[Box, Any]]] = {}
    for fqn, obj in targets.items():
        rec = manifest.records[fqn]
        assert isinstance(rec, TensorLeaf)
        regions[fqn] = local_shards(fqn, obj, rec)[1]
    return read_regions(backend, manifest, stored, regions, options)


def read_regions(
    backend: Backend,
    manifest: Manifest,
    stored: Mapping[str, StoredTensor],
    regions: Mapping[str, list[tuple[Box, Any]]],
    options: LoadOptions,
) -> LoadPlan:
    """Fill each (global box, local tensor or array) pair of ``regions`` from the checkpoint.

    A local tensor of another dtype than the stored one is filled by
    converting each region as it lands (:class:`Converter`), when the
    conversion is exact or ``options.allow_lossy_cast`` names its FQN; the
    returned plan lists the conversions (``LoadPlan.converted``), and they
    are logged on the ``treeckpt.load`` logger.
    """
    requests: list[ShardSpec] = []
    dests: dict[tuple[str, Box], Destination | Converter] = {}
    itemsizes: dict[str, int] = {}
    uploads = Uploads()  # device tensors: staged in pooled host buffers, copied without waiting
    for fqn, pairs in regions.items():
        rec = manifest.records[fqn]
        assert isinstance(rec, TensorLeaf)
        boxes_by_dtype: dict[str, list[Box]] = {}
        for box, local in pairs:
            code = dtype_code(local)
            if code is None:
                raise UnsupportedLeafError(
                    f"{fqn!r}: the destination's dtype {local.dtype} is not one the format stores"
                )
            boxes_by_dtype.setdefault(code, []).append(box)
            if code == rec.dtype:
                dests[(fqn, box)] = destination(local, rec.dtype, box.sizes, uploads)
            else:
                dests[(fqn, box)] = Converter(local, rec.dtype)
        requests.extend(
            ShardSpec(fqn=fqn, dtype=code, shape=rec.shape, boxes=tuple(boxes))
            for code, boxes in boxes_by_dtype.items()
        )
        itemsizes[fqn] = dtype_info(rec.dtype).itemsize
    view = stored.for_requests(requests) if isinstance(stored, StoredChunks) else stored
    plan = plan_load(view, requests, allow_lossy_cast=options.allows_lossy_cast)
    if plan.converted:
        log.info("%s: the load %s", backend.root, plan.conversions())
    grouped: dict[tuple[str, int], list[ReadItem]] = {}
    for item in plan.items:
        grouped.setdefault((item.chunk.file, item.chunk.offset), []).append(item)
    ranges = plan.ranges
    tasks = [
        ReadTask(
            chunk=items[0].chunk,
            itemsize=itemsizes[items[0].fqn],
            targets=tuple(
                ReadTarget(
                    src=i.src,
                    dst=i.dst,
                    dest=_dest_bytes(dests[(i.fqn, i.request)]),
                    byte_range=i.byte_range,
                )
                for i in items
            ),
            read_range=ranges[key],
        )
        for key, items in grouped.items()
    ]
    # A staged destination is finished (copied to its tensor, its buffer
    # dropped) as soon as the last chunk feeding it has landed.
    pending: dict[int, int] = {}
    by_id: dict[int, Destination] = {}
    for task in tasks:
        for t in task.targets:
            if isinstance(t.dest, Destination):
                pending[id(t.dest)] = pending.get(id(t.dest), 0) + 1
                by_id[id(t.dest)] = t.dest
    lock = threading.Lock()

    def done(task: ReadTask) -> None:
        ready = []
        with lock:
            for t in task.targets:
                key = id(t.dest)
                if key in pending:
                    pending[key] -= 1
                    if pending[key] == 0:
                        ready.append(by_id[key])
        for d in ready:
            d.finish()

    if pending:
        # Fill staged destinations one after the other (in tree order, each
        # one's chunks in file order), so few staging buffers live at once.
        rank = {key: n for n, key in enumerate(by_id)}
        tasks.sort(
            key=lambda task: (
                min((rank[id(t.dest)] for t in task.targets if id(t.dest) in rank), default=-1),
                task.chunk.file,
                task.chunk.offset,
            )
        )
    try:
        read_chunks(
            backend,
            tasks,
            io_threads=options.io_threads,
            on_done=done if pending else None,
            in_file_order=not pending,
        )
        for d in dests.values():
            d.finish()  # destinations no chunk fed (nothing staged: a no-op)
    finally:
        uploads.wait()  # every host-to-device copy has landed before the load returns
    return plan


def _dest_bytes(d: Destination | Converter) -> Any:
    """What a read target writes into: the array itself, the staged destination or the converter."""
    return d if d.staged or isinstance(d, Converter) else d.array()


def read_stored(backend: Backend, manifest: Manifest) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint with its chunks (reads every chunk index)."""
    return stored_tensors(manifest, read_indexes(backend, manifest))


def allocate_covered(
    manifest: Manifest, stored: Mapping[str, StoredTensor], fqns: list[str]
) -> dict[str, Any]:
    """Fresh leaves for ``fqns``, allocated only once their stored chunks are known to cover them.

    Shapes come from the manifest (untrusted): planning first means a forged
    shape with no chunks behind it is a PlanError, never a huge allocation.
    """
    recs = {f: manifest.records[f] for f in fqns}
    plan_load(
        stored,
        [full_spec(f, r.dtype, r.shape) for f, r in recs.items() if isinstance(r, TensorLeaf)],
    )
    return {f: allocate(r, f) for f, r in recs.items() if isinstance(r, TensorLeaf)}


def restore_tree(
    backend: Backend,
    manifest: Manifest,
    stored: Mapping[str, StoredTensor],
    *,
    allow_pickle: bool,
    options: LoadOptions,
) -> Any:
    """The whole tree, materialised on CPU, with no template."""
    _check_pickles(manifest, allow_pickle)
    tensor_fqns = [f for f, r in manifest.records.items() if isinstance(r, TensorLeaf)]
    targets = allocate_covered(manifest, stored, tensor_fqns)
    read_into(backend, manifest, stored, targets, options)

    def leaf(fqn: str) -> Any:
        rec = manifest.records[fqn]
        if isinstance(rec, TensorLeaf):
            return finish_leaf(targets[fqn], rec)
        return value_of(fqn, rec, allow_pickle=allow_pickle)

    return build_tree(manifest.structure, leaf)


def _check_pickles(manifest: Manifest, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    for fqn, rec in manifest.records.items():
        if isinstance(rec, PickleLeaf):
            value_of(fqn, rec, allow_pickle=False)


def _under(fqn: str, prefix: str) -> bool:
    return not prefix or fqn == prefix or fqn.startswith(prefix + ".")


def _describe(rec: LeafRecord) -> str:
    if isinstance(rec, TensorLeaf):
        return f"{rec.lib} tensor {rec.dtype}{list(rec.shape)}"
    return "pickled object" if isinstance(rec, PickleLeaf) else "value"


def load_tree(
    tree: Any,
    backend: Backend,
    manifest: Manifest,
    stored: Mapping[str, StoredTensor],
    *,
    strict: bool,
    allow_pickle: bool,
    options: LoadOptions,
    rank: int = 0,
    world_size: int = 1,
) -> Any:
    """Load ``manifest``'s checkpoint into ``tree`` in place; returns ``tree``.

    Tensors are filled in place; every mutable container of ``tree`` gets
    its new values assigned (an immutable one is rebuilt inside its mutable
    parent, so the return value differs from ``tree`` only when the root
    itself is immutable); Stateful objects get ``load_state_dict``. Nothing
    changes until the whole template is known to match, and nothing outside
    what is loaded changes: optimizers get their state without a step.
    ``rank`` and ``world_size`` are the loading rank's: a key that only other
    saving ranks held is not expected of it (see :func:`key_differences`).
    """
    with safe_torch_state_init():  # state_dict() of wrappers around torch's utilities
        flat = flatten_tree(tree, allow_pickle=True, adapters=ADAPTERS)
    ck = manifest.records
    # Statefuls whose state follows the checkpoint's structure (not modules).
    open_refs = [s for s in flat.statefuls if not isinstance(s.obj, torch.nn.Module)]
    open_prefixes = [s.fqn for s in open_refs]

    missing, unexpected, notes = key_differences(
        flat.records, manifest, open_prefixes, rank=rank, world_size=world_size
    )
    mismatched = []
    for fqn, trec in flat.records.items():
        crec = ck.get(fqn)
        if crec is None:
            continue
        if isinstance(trec, TensorLeaf) != isinstance(crec, TensorLeaf):
            mismatched.append(f"{fqn} (template {_describe(trec)}, checkpoint {_describe(crec)})")
        elif (
            isinstance(trec, TensorLeaf)
            and isinstance(crec, TensorLeaf)
            and (why := _tensor_mismatch(fqn, trec, crec, flat.leaves[fqn], options))
        ):
            mismatched.append(why)
        elif isinstance(crec, ValueLeaf) and (why := _value_mismatch(fqn, crec, flat.leaves[fqn])):
            mismatched.append(why)  # an enum the template's type cannot hold
        elif isinstance(crec, TensorLeaf) and on_meta(flat.leaves[fqn]):
            mismatched.append(
                f"{fqn} (template tensor is on the meta device and holds no memory to load "
                "into; materialise it first, e.g. module.to_empty(device=...))"
            )
    if mismatched or (strict and (missing or unexpected)):
        raise LoadMismatchError(
            missing=missing if strict else (),
            unexpected=unexpected if strict else (),
            mismatched=mismatched,
            notes=notes if strict else (),
        )

    # Destinations: template tensors in place; state a fresh optimizer lacks is
    # laid out like its parameters (no step); anything else is materialised.
    targets: dict[str, Any] = {}
    fresh: list[str] = []
    for fqn, rec in ck.items():
        if not isinstance(rec, TensorLeaf):
            if isinstance(rec, PickleLeaf) and (
                fqn in flat.records or _in_open(fqn, open_prefixes)
            ):
                value_of(fqn, rec, allow_pickle=allow_pickle)  # refuse before any byte changes
            continue
        obj = flat.leaves.get(fqn)
        if isinstance(obj, torch.Tensor | np.ndarray):
            targets[fqn] = obj
        elif fqn in flat.records or _in_open(fqn, open_prefixes):
            fresh.append(fqn)  # numpy scalars, and state a fresh Stateful lacks
    wanted = set(fresh)
    for ref in open_refs:
        if isinstance(ref.obj, torch.optim.Optimizer):
            like = state_targets(ref.obj, ref.path, manifest.structure, ck, wanted)
            targets.update(like)
            wanted.difference_update(like)
    targets.update(allocate_covered(manifest, stored, [f for f in fresh if f in wanted]))
    read_into(backend, manifest, stored, targets, options)

    def ck_leaf(fqn: str) -> Any:
        rec = ck[fqn]
        if isinstance(rec, TensorLeaf):
            if fqn not in targets:
                raise ManifestError(f"{fqn!r}: tensor was not loaded")
            return finish_leaf(targets[fqn], rec)
        # The template's leaf (inside a Stateful: the object's own current state)
        # is the template of the value: enum members come back in its enum types.
        if fqn in flat.leaves:
            return value_of(fqn, rec, allow_pickle=allow_pickle, template=flat.leaves[fqn])
        return value_of(fqn, rec, allow_pickle=allow_pickle)

    def leaf(fqn: str, obj: Any) -> Any:
        return ck_leaf(fqn) if fqn in ck else obj  # not in ck: missing, strict=False

    def stateful(ref: StatefulRef) -> Any:
        if isinstance(ref.obj, torch.nn.Module):
            state = map_tree(ref.obj.state_dict(), _prefixed(ref.fqn, leaf), _no_stateful)
            ref.obj.load_state_dict(state, strict=strict)
            return ref.obj
        node = find_subtree(manifest.structure, ref.path)
        if node is None:
            if strict:
                raise LoadMismatchError(missing=[ref.fqn or "<root>"])
            return ref.obj
        ref.obj.load_state_dict(build_tree(node, ck_leaf))
        return ref.obj

    with safe_torch_state_init():
        return update_tree(tree, leaf, stateful)


def _tensor_mismatch(
    fqn: str, trec: TensorLeaf, crec: TensorLeaf, obj: Any, options: LoadOptions
) -> str | None:
    """Why the template's tensor ``obj`` cannot take the checkpoint's ``crec`` (``None``: it can).

    Another dtype is fine when the conversion is exact or allowed by name
    (``LoadOptions.allow_lossy_cast``), and only for a tensor or array that is
    filled in place: a leaf the load rebuilds (a numpy scalar) comes back in
    the stored dtype, so a dtype difference there stays an error.
    """
    if trec.dtype == crec.dtype and trec.shape == crec.shape:
        return None
    shapes = (
        f"{fqn} (template {trec.dtype}{list(trec.shape)}, checkpoint {crec.dtype}{list(crec.shape)}"
    )
    if trec.shape != crec.shape or not isinstance(obj, torch.Tensor | np.ndarray):
        return shapes + ")"
    why = cast_refusal(fqn, crec.dtype, trec.dtype, options.allows_lossy_cast)
    return None if why is None else f"{shapes}: {why})"


def _value_mismatch(fqn: str, rec: ValueLeaf, template: Any) -> str | None:
    """Why ``rec`` cannot be loaded where the template holds ``template`` (enum members)."""
    try:
        adopt_value(fqn, rec.value, template)
    except LoadMismatchError as exc:
        return exc.mismatched[0]
    return None


def key_differences(
    template: Mapping[str, LeafRecord],
    manifest: Manifest,
    open_prefixes: list[str],
    *,
    rank: int,
    world_size: int,
) -> tuple[list[str], list[str], list[str]]:
    """The template's keys the checkpoint lacks, the checkpoint's keys this rank should load but
    does not ask for, and notes explaining the latter.

    A key every saving rank held is expected of every loading rank (unless it
    lies inside a Stateful whose state follows the checkpoint). A key only
    some saving ranks held (``manifest.holders``, a per-rank key such as
    ``dataloader.dp_rank_1``) is expected only of the loading ranks with the
    same numbers. When no loading rank has any of those numbers (a restart on
    fewer ranks), nobody would load it: it is expected of every rank, with a
    note saying so, and ``strict=False`` skips it.
    """
    ck = manifest.records
    missing = [f for f in template if f not in ck]
    unexpected: list[str] = []
    orphans: list[str] = []
    for f in ck:
        if f in template or _in_open(f, open_prefixes):
            continue
        holders = manifest.holders.get(f)
        if holders is None or rank in holders:
            unexpected.append(f)
        elif holders[0] >= world_size:
            unexpected.append(f)
            orphans.append(f"{f} (rank{'s' if len(holders) > 1 else ''} {_list(holders)})")
    notes = []
    if orphans:
        notes.append(
            f"saved only by ranks this load of {world_size} rank(s) does not have: "
            + ", ".join(orphans[:5])
            + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        )
    return missing, unexpected, notes


def _list(ranks: tuple[int, ...]) -> str:
    return ", ".join(map(str, ranks))


def _in_open(fqn: str, prefixes: list[str]) -> bool:
    return any(_under(fqn, p) for p in prefixes)


def _prefixed(prefix: str, leaf: Any) -> Any:
    def inner(fqn: str, obj: Any) -> Any:
        return leaf(f"{prefix}.{fqn}" if prefix and fqn else (prefix or fqn), obj)

    return inner


def _no_stateful(ref: StatefulRef) -> Any:
    return ref.obj

"""DCP's default plans over treeckpt's checks: the functions behind the default planners.

Save: one write item per local shard and per value, replicas written once,
every tensor's shards checked to tile it before any byte is written. Load:
read items from the intersection of each local shard with the stored chunks,
with coverage checked; shape and kind mismatches are errors, and a dtype
difference is one unless the conversion keeps every value or the planner
consents to it by name (``allows_lossy_cast``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from treeckpt.core.box import Box, check_tiling
from treeckpt.dcp._flat import shards_of
from treeckpt.errors import LoadMismatchError, PlanError
from treeckpt.formats.torch_dcp.protocol import torch_cast_refusal

__all__ = [
    "create_default_global_load_plan",
    "create_default_global_save_plan",
    "create_default_local_load_plan",
    "create_default_local_save_plan",
    "dedup_plans",
    "local_for",
    "local_load_plan",
]

log = logging.getLogger("treeckpt.dcp")


def _box(chunk: ChunkStorageMetadata) -> Box:
    return Box(
        offsets=tuple(int(o) for o in chunk.offsets), sizes=tuple(int(s) for s in chunk.sizes)
    )


def _chunk(box: Box) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(box.offsets), sizes=torch.Size(box.sizes))


def local_for(obj: Any, fqn: str, offsets: Any) -> tuple[Box, torch.Tensor]:
    """The (box, local tensor) of ``obj`` whose box starts at ``offsets``."""
    _, pairs, _ = shards_of(fqn, obj)
    want = tuple(int(o) for o in offsets) if offsets is not None else None
    for box, local in pairs:
        if want is None or box.offsets == want:
            return box, local
    raise PlanError(f"{fqn!r}: this rank holds no shard at offsets {list(want or ())}")


def _write_items(fqn: str, obj: Any) -> list[WriteItem]:
    if not isinstance(obj, torch.Tensor):
        return [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)]
    shape, pairs, distributed = shards_of(fqn, obj)
    kind = WriteItemType.SHARD if distributed else WriteItemType.TENSOR
    return [
        WriteItem(
            index=MetadataIndex(fqn, torch.Size(box.offsets)),
            type=kind,
            tensor_data=TensorWriteData(
                chunk=_chunk(box),
                properties=TensorProperties.create_from_tensor(local),
                size=torch.Size(shape),
            ),
        )
        for box, local in pairs
    ]


def create_default_local_save_plan(state_dict: dict[str, Any], is_coordinator: bool) -> SavePlan:
    """One write item per local shard of each tensor and one per non-tensor value.

    Non-tensor values are written by the coordinator only, as in DCP.
    """
    items: list[WriteItem] = []
    for fqn, obj in state_dict.items():
        if not isinstance(obj, torch.Tensor) and not is_coordinator:
            continue
        items.extend(_write_items(fqn, obj))
    return SavePlan(items)


def _nbytes(item: WriteItem) -> int:
    td = item.tensor_data
    if td is None:
        return 0
    n = torch.empty((), dtype=td.properties.dtype).element_size()
    for s in td.chunk.sizes:
        n *= int(s)
    return n


def dedup_plans(all_plans: list[SavePlan], to_lowest_rank: bool) -> list[SavePlan]:
    """Each replicated item (same FQN, offsets and sizes on several ranks) written once.

    By default the holder with the fewest bytes so far writes it, largest items
    first (DCP's policy); with ``to_lowest_rank`` the lowest holder does.
    """
    holders: dict[tuple[str, Any, Any], list[int]] = {}
    sizes: dict[tuple[str, Any, Any], int] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                continue
            assert item.tensor_data is not None
            key = (
                item.index.fqn,
                tuple(item.index.offset or ()),
                tuple(item.tensor_data.chunk.sizes),
            )
            holders.setdefault(key, []).append(rank)
            sizes[key] = _nbytes(item)
    load = [0] * len(all_plans)
    keep: dict[tuple[str, Any, Any], int] = {}
    for key in sorted(holders, key=lambda k: (-sizes[k], k[0])):
        ranks = holders[key]
        owner = ranks[0] if to_lowest_rank else min(ranks, key=lambda r: (load[r], r))
        keep[key] = owner
        load[owner] += sizes[key]
    out = []
    for rank, plan in enumerate(all_plans):
        items = []
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                assert item.tensor_data is not None
                key = (
                    item.index.fqn,
                    tuple(item.index.offset or ()),
                    tuple(item.tensor_data.chunk.sizes),
                )
                if keep[key] != rank:
                    continue
            items.append(item)
        out.append(dataclasses.replace(plan, items=items))
    return out


def create_default_global_save_plan(
    all_plans: list[SavePlan], rewrite_index_hints: bool = True
) -> tuple[list[SavePlan], Metadata]:
    """Check every tensor's shards and build the checkpoint's :class:`Metadata`.

    Raises:
        PlanError: ranks disagree on a tensor's shape or dtype, or its shards
            leave gaps or overlap partly (the FQN and the boxes are named).
    """
    md: dict[str, Any] = {}
    boxes: dict[str, list[Box]] = {}
    new_plans = []
    for rank, plan in enumerate(all_plans):
        items = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                if isinstance(md.get(fqn), TensorStorageMetadata):
                    raise PlanError(f"{fqn!r}: a tensor on one rank and a value on rank {rank}")
                md[fqn] = BytesStorageMetadata()
                items.append(item)
                continue
            td = item.tensor_data
            assert td is not None
            tmd = md.setdefault(
                fqn,
                TensorStorageMetadata(properties=td.properties, size=td.size, chunks=[]),
            )
            if not isinstance(tmd, TensorStorageMetadata):
                raise PlanError(f"{fqn!r}: a value on one rank and a tensor on rank {rank}")
            if tuple(tmd.size) != tuple(td.size) or tmd.properties.dtype != td.properties.dtype:
                raise PlanError(
                    f"{fqn!r}: rank {rank} has {td.properties.dtype}{list(td.size)}, another "
                    f"rank {tmd.properties.dtype}{list(tmd.size)}"
                )
            if rewrite_index_hints:
                item = dataclasses.replace(
                    item, index=dataclasses.replace(item.index, index=len(tmd.chunks))
                )
            tmd.chunks.append(td.chunk)
            boxes.setdefault(fqn, []).append(_box(td.chunk))
            items.append(item)
        new_plans.append(dataclasses.replace(plan, items=items))
    for fqn, bs in boxes.items():
        tmd = md[fqn]
        if len(set(bs)) != len(bs):
            raise PlanError(f"{fqn!r}: the same shard is written twice (replicas not deduplicated)")
        check_tiling(tuple(int(s) for s in tmd.size), bs, what=fqn)
    return new_plans, Metadata(state_dict_metadata=md)


def create_default_local_load_plan(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool = True
) -> LoadPlan:
    """Read items for every key of ``state_dict`` the checkpoint has (exact dtype conversions only).

    Raises:
        LoadMismatchError: as :func:`local_load_plan` with no planner.
    """
    return local_load_plan(state_dict, metadata, strict)


def local_load_plan(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool = True, *, planner: Any = None
) -> LoadPlan:
    """Read items for every key of ``state_dict`` the checkpoint has.

    A tensor of another dtype than the stored one is read when the
    conversion is exact, or when ``planner.allows_lossy_cast(fqn)`` says so.

    Raises:
        LoadMismatchError: with ``strict``, every key the checkpoint lacks; always,
            every shape or kind mismatch and every dtype the stored one does
            not convert to (exactly, or with consent).
    """
    items: list[ReadItem] = []
    missing: list[str] = []
    mismatched: list[str] = []
    smd = metadata.state_dict_metadata
    for fqn, obj in state_dict.items():
        md = smd.get(fqn)
        if md is None:
            missing.append(fqn)
            continue
        if not isinstance(obj, torch.Tensor):
            if isinstance(md, TensorStorageMetadata):
                mismatched.append(f"{fqn} (checkpoint has a tensor, state dict a value)")
                continue
            items.append(
                ReadItem(
                    type=LoadItemType.BYTE_IO,
                    dest_index=MetadataIndex(fqn),
                    dest_offsets=torch.Size((0,)),
                    storage_index=MetadataIndex(fqn),
                    storage_offsets=torch.Size((0,)),
                    lengths=torch.Size((0,)),
                )
            )
            continue
        if not isinstance(md, TensorStorageMetadata):
            mismatched.append(f"{fqn} (checkpoint has a value, state dict a tensor)")
            continue
        shape, pairs, _ = shards_of(fqn, obj)
        dtype = _dtype_of(obj)
        why = None
        if tuple(shape) == tuple(md.size) and dtype != md.properties.dtype:
            why = torch_cast_refusal(fqn, md.properties.dtype, dtype, planner)
        if tuple(shape) != tuple(md.size) or why is not None:
            mismatched.append(
                f"{fqn} (checkpoint {md.properties.dtype}{list(md.size)}, state dict "
                f"{dtype}{list(shape)}" + (f": {why})" if why else ")")
            )
            continue
        items.extend(_tensor_read_items(fqn, md, pairs))
    if (missing and strict) or mismatched:
        raise LoadMismatchError(missing=missing if strict else (), mismatched=mismatched)
    unexpected = [k for k in smd if k not in state_dict]
    if unexpected:
        log.info("keys in the checkpoint not loaded (not in the state dict): %s", unexpected[:20])
    return LoadPlan(items)


def _tensor_read_items(
    fqn: str, md: TensorStorageMetadata, pairs: list[tuple[Box, Any]]
) -> list[ReadItem]:
    stored = [_box(c) for c in md.chunks]
    items = []
    for box, _local in pairs:
        covered = 0
        for i, sbox in enumerate(stored):
            common = box.intersect(sbox)
            if common is None:
                continue
            covered += common.volume
            items.append(
                ReadItem(
                    type=LoadItemType.TENSOR,
                    dest_index=MetadataIndex(fqn, torch.Size(box.offsets)),
                    dest_offsets=torch.Size(common.relative_to(box).offsets),
                    storage_index=MetadataIndex(fqn, torch.Size(sbox.offsets), i),
                    storage_offsets=torch.Size(common.relative_to(sbox).offsets),
                    lengths=torch.Size(common.sizes),
                )
            )
        if covered != box.volume:
            raise PlanError(
                f"{fqn!r}: the checkpoint's chunks cover {covered} of the {box.volume} elements "
                f"of the shard at {list(box.offsets)} (overlapping or missing chunks)"
            )
    return items


def create_default_global_load_plan(all_plans: list[LoadPlan]) -> list[LoadPlan]:
    """Loads need no global decision: each rank reads what it holds."""
    return all_plans


def _dtype_of(obj: torch.Tensor) -> torch.dtype:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ShardedTensor's, deprecated by torch
        return obj.dtype

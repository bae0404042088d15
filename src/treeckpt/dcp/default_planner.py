"""The default planners, as in ``torch.distributed.checkpoint.default_planner``.

They implement DCP's planner protocol, so custom storage plugins and planner
subclasses work unchanged, with treeckpt's rules on top: a tensor's shards
must tile it (checked by :func:`treeckpt.core.box.check_tiling` before any
byte is written), replicas are written once, a load never casts a dtype, and
every missing key and mismatch is reported in one error. Non-tensor values
travel as ``torch.save`` bytes read back with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections import ChainMap
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from treeckpt.core.box import Box, check_tiling
from treeckpt.dcp._flat import decode_bytes, encode_bytes, flatten_dcp, set_path, shards_of
from treeckpt.errors import LoadMismatchError, PlanError

__all__ = [
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "create_default_global_load_plan",
    "create_default_global_save_plan",
    "create_default_local_load_plan",
    "create_default_local_save_plan",
]

log = logging.getLogger("treeckpt.dcp")


def _box(chunk: ChunkStorageMetadata) -> Box:
    return Box(
        offsets=tuple(int(o) for o in chunk.offsets), sizes=tuple(int(s) for s in chunk.sizes)
    )


def _chunk(box: Box) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(box.offsets), sizes=torch.Size(box.sizes))


def _local_for(obj: Any, fqn: str, offsets: Any) -> tuple[Box, torch.Tensor]:
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


def _dedup(all_plans: list[SavePlan], to_lowest_rank: bool) -> list[SavePlan]:
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


class DefaultSavePlanner(SavePlanner):
    """DCP's default save planner over treeckpt's checks (same arguments and defaults).

    ``dedup_save_to_lowest_rank`` sends each replicated shard to its lowest
    holder instead of the least-loaded one; ``enable_plan_caching`` reuses the
    previous global plan when every rank's local plan is unchanged.
    ``flatten_sharded_tensors`` and ``dedup_replicated_tensors`` are accepted
    for compatibility (replicas are always written once).
    """

    _cached: ClassVar[dict[str, tuple[list[SavePlan], list[SavePlan], Metadata]]] = {}

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        dedup_replicated_tensors: bool | None = None,
        dedup_save_to_lowest_rank: bool = False,
        enable_plan_caching: bool = False,
    ) -> None:
        self.flatten_state_dict = flatten_state_dict
        self.flatten_sharded_tensors = flatten_sharded_tensors
        self.dedup_save_to_lowest_rank = dedup_save_to_lowest_rank
        self.enable_plan_caching = enable_plan_caching
        self.mappings: dict[str, Any] = {}
        self.storage_meta: StorageMeta | None = None
        self._cache_key = type(self).__qualname__

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        if self.flatten_state_dict:
            state_dict, self.mappings = flatten_dcp(state_dict)
        self.state_dict = state_dict
        self.storage_meta = storage_meta
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        plan = create_default_local_save_plan(self.state_dict, self.is_coordinator)
        if self.flatten_state_dict:
            plan = dataclasses.replace(plan, planner_data=self.mappings)
        self.plan = plan
        return plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if self.enable_plan_caching:
            cached = self._cached.get(self._cache_key)
            if cached is not None and cached[0] == all_plans:
                self.global_plan, self.metadata = cached[1], cached[2]
                return cached[1], cached[2]
        deduped = _dedup(all_plans, self.dedup_save_to_lowest_rank)
        global_plan, metadata = create_default_global_save_plan(deduped)
        if self.flatten_state_dict:
            merged = dict(ChainMap(*[p.planner_data or {} for p in global_plan]))
            metadata = dataclasses.replace(metadata, planner_data=merged)
        if self.storage_meta is not None:
            metadata = dataclasses.replace(metadata, storage_meta=self.storage_meta)
        if self.enable_plan_caching:
            self._cached[self._cache_key] = (list(all_plans), global_plan, metadata)
        self.global_plan, self.metadata = global_plan, metadata
        return global_plan, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        obj = self.lookup_object(write_item.index)
        return self.transform_object(write_item, obj)

    def lookup_object(self, index: MetadataIndex) -> Any:
        """The object (or local shard) an index names."""
        obj = self.state_dict[index.fqn]
        if isinstance(obj, torch.Tensor):
            return _local_for(obj, index.fqn, index.offset)[1]
        return obj

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        """Tensors as they are; other values as ``torch.save`` bytes."""
        if write_item.type == WriteItemType.BYTE_IO:
            return encode_bytes(write_item.index.fqn, object)
        return object.detach()


def create_default_local_load_plan(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool = True
) -> LoadPlan:
    """Read items for every key of ``state_dict`` the checkpoint has.

    Raises:
        LoadMismatchError: with ``strict``, every key the checkpoint lacks; always,
            every shape, dtype or kind mismatch (nothing is cast).
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
        if tuple(shape) != tuple(md.size) or obj.dtype != md.properties.dtype:
            mismatched.append(
                f"{fqn} (checkpoint {md.properties.dtype}{list(md.size)}, state dict "
                f"{obj.dtype}{list(shape)})"
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


class DefaultLoadPlanner(LoadPlanner):
    """DCP's default load planner over treeckpt's checks (same arguments and defaults).

    Keys of the state dict missing from the checkpoint are an error unless
    ``allow_partial_load``; keys the state dict lacks are not loaded (logged
    on the ``treeckpt.dcp`` logger). Shape, dtype and kind mismatches are
    always errors, all reported together before anything is read.
    """

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        allow_partial_load: bool = False,
    ) -> None:
        self.flatten_state_dict = flatten_state_dict
        self.flatten_sharded_tensors = flatten_sharded_tensors
        self.allow_partial_load = allow_partial_load
        self.mappings: dict[str, Any] = {}

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        self.original_state_dict = state_dict
        if self.flatten_state_dict:
            state_dict, self.mappings = flatten_dcp(state_dict)
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        return create_default_local_load_plan(
            self.state_dict, self.metadata, not self.allow_partial_load
        )

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return create_default_global_load_plan(global_plan)

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        return new_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = decode_bytes(fqn, value)
        if self.flatten_state_dict and fqn in self.mappings:
            set_path(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        tensor = self.lookup_tensor(read_item.dest_index)
        return self.transform_tensor(read_item, tensor)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        return None

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        """The local tensor (or shard) an index names."""
        return _local_for(self.state_dict[index.fqn], index.fqn, index.offset)[1]

    def transform_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> torch.Tensor:
        """The region of ``tensor`` that ``read_item`` fills."""
        box = Box(
            offsets=tuple(int(o) for o in read_item.dest_offsets),
            sizes=tuple(int(s) for s in read_item.lengths),
        )
        return tensor.detach()[box.slices()] if box.ndim else tensor.detach()

"""The default planners, as in ``torch.distributed.checkpoint.default_planner``.

They implement DCP's planner protocol, so custom storage plugins and planner
subclasses work unchanged, with treeckpt's rules on top: a tensor's shards
must tile it (checked by :func:`treeckpt.core.box.check_tiling` before any
byte is written), replicas are written once, a load converts a dtype only
when every value survives (or the planner consents by name), and
every missing key and mismatch is reported in one error. Non-tensor values
travel as ``torch.save`` bytes read back with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import io
from collections import ChainMap
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)

from treeckpt.core.box import Box
from treeckpt.dcp._flat import flatten_dcp, set_path
from treeckpt.dcp._plans import (
    create_default_global_load_plan,
    create_default_global_save_plan,
    create_default_local_load_plan,
    create_default_local_save_plan,
    dedup_plans,
    local_for,
    local_load_plan,
)
from treeckpt.formats.torch_dcp.protocol import decode_bytes, encode_bytes

__all__ = [
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "create_default_global_load_plan",
    "create_default_global_save_plan",
    "create_default_local_load_plan",
    "create_default_local_save_plan",
]


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
        deduped = dedup_plans(all_plans, self.dedup_save_to_lowest_rank)
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
            return local_for(obj, index.fqn, index.offset)[1]
        return obj

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        """Tensors as they are; other values as ``torch.save`` bytes."""
        if write_item.type == WriteItemType.BYTE_IO:
            return encode_bytes(write_item.index.fqn, object)
        return object.detach()


class DefaultLoadPlanner(LoadPlanner):
    """DCP's default load planner over treeckpt's checks (same arguments and defaults).

    Keys of the state dict missing from the checkpoint are an error unless
    ``allow_partial_load``; keys the state dict lacks are not loaded (logged
    on the ``treeckpt.dcp`` logger). Shape and kind mismatches are always
    errors, all reported together before anything is read. A tensor of
    another dtype than the stored one is converted when every value survives
    (bfloat16 into float32...); a conversion that can lose bits is an error
    unless :meth:`allows_lossy_cast` (a treeckpt extension: override it in a
    subclass) says yes for the key.
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

    def allows_lossy_cast(self, fqn: str) -> bool:
        """Whether the tensor ``fqn`` may be converted to the state dict's dtype with a loss of bits.

        ``False`` for every key: only exact conversions are made. Override it
        to consent by name (``return fqn in {"model.embed.weight"}``).
        """
        return False

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
        return local_load_plan(
            self.state_dict, self.metadata, not self.allow_partial_load, planner=self
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
        return local_for(self.state_dict[index.fqn], index.fqn, index.offset)[1]

    def transform_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> torch.Tensor:
        """The region of ``tensor`` that ``read_item`` fills."""
        box = Box(
            offsets=tuple(int(o) for o in read_item.dest_offsets),
            sizes=tuple(int(s) for s in read_item.lengths),
        )
        return tensor.detach()[box.slices()] if box.ndim else tensor.detach()

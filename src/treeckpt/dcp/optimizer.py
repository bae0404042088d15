"""``treeckpt.dcp.optimizer``: ``load_sharded_optimizer_state_dict``, as in DCP.

Loads the optimizer state saved under ``optimizer_key`` with every
multi-element tensor as a ``ShardedTensor`` chunked along dimension 0 over
the ranks of the default group (the layout FSDP's sharded optimizer state
dict expects: ``FSDP.optim_state_dict_to_load`` takes it), one-element
tensors (such as ``step``) whole on every rank, and non-tensor values as
saved. The reads go through :func:`treeckpt.dcp.load`, so a checkpoint
written by ``treeckpt.dcp`` and one torch's DCP wrote both load, resharded
from whatever layout they were saved with.

Unlike torch's function, each rank allocates only its own chunk (torch
allocates the whole tensor on every rank, then keeps a chunk). A model state
dict whose ``ShardedTensor``\\ s nest another ``ShardedTensor`` (FSDP over
tensor parallelism with ``ShardedTensor``) is refused, naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import (
    Shard,
    ShardedTensor,
    ShardedTensorMetadata,
    ShardMetadata,
)
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties as _StProperties
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader

from treeckpt.dcp._view import TreeckptStorage, list_paths, value_item
from treeckpt.dcp.state_dict_loader import load
from treeckpt.errors import CheckpointError, OptionsError

__all__ = ["load_sharded_optimizer_state_dict"]

#: The value a non-tensor item holds until the load replaces it (as in torch).
BYTES_PLACEHOLDER = "<bytes_io>"


def load_sharded_optimizer_state_dict(
    model_state_dict: STATE_DICT_TYPE,
    optimizer_key: str,
    storage_reader: StorageReader,
    planner: LoadPlanner | None = None,
) -> STATE_DICT_TYPE:
    """Load the optimizer state under ``optimizer_key``, sharded for FSDP (see the module).

    Returns a nested dict ``{optimizer_key: ...}`` as saved, every rank
    calling it. ``model_state_dict`` is the model's sharded state dict.

    Raises:
        CheckpointException: the load failed on some rank (every rank raises it).
        CheckpointError: the reader's metadata has no key paths, or nothing is
            stored under ``optimizer_key``.
        OptionsError: a nested ``ShardedTensor`` in ``model_state_dict``.
    """
    for key, value in model_state_dict.items():
        if _nested(value):
            raise OptionsError(
                f"{key!r}: a ShardedTensor nested in a ShardedTensor (FSDP over tensor "
                "parallelism) is not supported by treeckpt.dcp.load_sharded_optimizer_state_dict; "
                "save with DTensor state dicts (FSDP2, torch.distributed.checkpoint.state_dict)"
            )
    metadata = storage_reader.read_metadata()
    paths = metadata.planner_data
    if not isinstance(paths, Mapping):
        where = getattr(storage_reader, "checkpoint_id", type(storage_reader).__name__)
        raise CheckpointError(
            f"{where}: the reader's Metadata has no planner_data (the key path of each item)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device(dist.distributed_c10d._get_object_coll_device())
    storage = metadata.storage_data
    flat: dict[str, Any] = {}
    for key, md in metadata.state_dict_metadata.items():
        path = paths.get(key)
        if not path or path[0] != optimizer_key:
            continue
        if isinstance(md, BytesStorageMetadata):
            # treeckpt's reader has the value already (typed records, no pickle);
            # another reader fills the placeholder during the load.
            is_ours = isinstance(storage, TreeckptStorage)
            flat[key] = value_item(storage, key) if is_ours else BYTES_PLACEHOLDER
        elif md.size.numel() == 1:
            flat[key] = _empty(md, md.size, device)
        else:
            flat[key] = _chunked(md, world, rank, device)
    if not flat:
        raise CheckpointError(f"nothing is stored under the optimizer key {optimizer_key!r}")
    state = nest(flat, paths, _list_paths(metadata))
    load(state, storage_reader=storage_reader, planner=planner)
    return state


def _nested(value: Any) -> bool:
    return (
        type(value) is ShardedTensor
        and bool(value.local_shards())
        and isinstance(value.local_shards()[0].tensor, ShardedTensor)
    )


def _empty(md: TensorStorageMetadata, size: Any, device: torch.device) -> torch.Tensor:
    props = md.properties
    return torch.empty(
        tuple(size),
        dtype=props.dtype,
        layout=props.layout,
        requires_grad=props.requires_grad,
        device=device,
    )


def chunk_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """``(offset, length)`` along dimension 0 of each chunk, as ``torch.chunk(t, world)`` cuts.

    Every chunk but the last has ``ceil(rows / world)`` rows; there may be
    fewer chunks than ranks (the ranks past the last chunk hold none).
    """
    if rows == 0:
        return [(0, 0)]
    step = -(-rows // world)
    return [(start, min(step, rows - start)) for start in range(0, rows, step)]


def _placement(rank: int, device: torch.device) -> str:
    if device.type == "cpu":
        return f"rank:{rank}/cpu"
    count = torch.get_device_module(device.type).device_count()
    return f"rank:{rank}/{device.type}:{rank % max(count, 1)}"


def _chunked(
    md: TensorStorageMetadata, world: int, rank: int, device: torch.device
) -> ShardedTensor:
    size = list(md.size)
    shards_md = [
        ShardMetadata(
            shard_offsets=[start] + [0] * (len(size) - 1),
            shard_sizes=[rows, *size[1:]],
            placement=_placement(r, device),
        )
        for r, (start, rows) in enumerate(chunk_rows(size[0], world))
    ]
    if device.type != "cpu":
        device = torch.device(device.type, torch.get_device_module(device.type).current_device())
    local = [
        Shard(tensor=_empty(md, s.shard_sizes, device), metadata=s)
        for r, s in enumerate(shards_md)
        if r == rank
    ]
    props = md.properties
    global_md = ShardedTensorMetadata(
        shards_metadata=shards_md,
        size=md.size,
        tensor_properties=_StProperties(
            dtype=props.dtype,
            layout=props.layout,
            requires_grad=props.requires_grad,
            memory_format=props.memory_format,
            pin_memory=props.pin_memory,
        ),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, global_md)


def _list_paths(metadata: Metadata) -> set[tuple[Any, ...]] | None:
    """The key paths that are lists in the checkpoint, when the reader knows (treeckpt's does)."""
    storage = metadata.storage_data
    if isinstance(storage, TreeckptStorage):
        return list_paths(storage.manifest)
    return None


def nest(
    flat: Mapping[str, Any],
    paths: Mapping[str, tuple[Any, ...]],
    lists: set[tuple[Any, ...]] | None,
) -> dict[str, Any]:
    """Build the nested state dict of ``flat`` from each key's path.

    A container is a list when ``lists`` names its path; without ``lists``
    (a reader that does not say), an integer key makes a list, as DCP's
    ``unflatten_state_dict`` does. List items are placed at their index.
    """
    root: dict[Any, Any] = {}
    for key, value in flat.items():
        path = paths[key]
        node: Any = root
        for depth, part in enumerate(path[:-1]):
            nxt = path[depth + 1]
            is_list = path[: depth + 1] in lists if lists is not None else isinstance(nxt, int)
            node = _child(node, part, [] if is_list else {})
        _put(node, path[-1], value)
    return root


def _child(node: Any, part: Any, empty: Any) -> Any:
    if isinstance(node, list):
        while len(node) <= part:
            node.append(None)
        if node[part] is None:
            node[part] = empty
        return node[part]
    return node.setdefault(part, empty)


def _put(node: Any, part: Any, value: Any) -> None:
    if isinstance(node, list):
        while len(node) <= part:
            node.append(None)
    node[part] = value

"""The tensor adapters treeckpt knows, in one tuple (protocol: ``core/adapter.py``).

``ADAPTERS`` is tried in order and the first match wins: the explicit-shards
hook, ``DTensor``, ``ShardedTensor``, then any other ``torch.Tensor`` held
whole. It is immutable: treeckpt has no global registry a library could
change behind the caller's back; a new sharded type is a new adapter here.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from treeckpt.core.adapter import PLAIN_TENSOR, Copy, GlobalTensor, TensorAdapter, adapter_for
from treeckpt.core.box import Box
from treeckpt.errors import UnsupportedLeafError

__all__ = ["ADAPTERS", "DTensorAdapter", "ExplicitShards", "ShardedTensorAdapter", "adapter_of"]


@functools.cache
def _classes() -> tuple[type, type] | None:
    """(DTensor, ShardedTensor), imported on first use (``None``: torch without distributed)."""
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor, ShardedTensor


def _box(offsets: Any, sizes: Any) -> Box:
    return Box(offsets=tuple(int(o) for o in offsets), sizes=tuple(int(s) for s in sizes))


class ExplicitShards:
    """A ``torch.Tensor`` subclass with ``__treeckpt_local_shards__()``.

    The hook returns ``[(offsets, sizes, local tensor), ...]`` in global
    coordinates; ``shape`` and ``dtype`` are the global ones. The DCP facade
    builds one (``dcp/_shards.py``) from a planner's write items. It is saved
    from the original (``stage`` copies nothing).
    """

    def matches(self, obj: Any) -> bool:
        return isinstance(obj, torch.Tensor) and hasattr(obj, "__treeckpt_local_shards__")

    def describe(self, fqn: str, obj: Any) -> GlobalTensor:
        return PLAIN_TENSOR.describe(fqn, obj)

    def local_shards(self, fqn: str, obj: Any) -> list[tuple[Box, Any]]:
        return [
            (_box(offs, sizes), local) for offs, sizes, local in obj.__treeckpt_local_shards__()
        ]

    def stage(self, obj: Any, copy: Copy) -> Any:
        return obj


class DTensorAdapter:
    """A ``DTensor``: its local tensor, placed by ``__create_chunk_list__``.

    That placement handles uneven splits, empty shards and FSDP2's
    ``_StridedShard`` when the local tensor is one box of the global tensor.
    A DTensor whose local tensor stands for several boxes (a local tensor of
    its own sharded type, for which ``__create_chunk_list__`` returns more
    than one chunk) is refused: which elements of the local tensor belong to
    which box is the local type's business, and copying by guess would save
    wrong data. Staging keeps the DTensor (same mesh, placements and global
    shape) with its local tensor copied.
    """

    def matches(self, obj: Any) -> bool:
        if not isinstance(obj, torch.Tensor) or type(obj) in (torch.Tensor, torch.nn.Parameter):
            return False  # the common cases, without importing torch.distributed
        classes = _classes()
        return classes is not None and isinstance(obj, classes[0])

    def describe(self, fqn: str, obj: Any) -> GlobalTensor:
        return PLAIN_TENSOR.describe(fqn, obj)

    def local_shards(self, fqn: str, obj: Any) -> list[tuple[Box, Any]]:
        chunks = obj.__create_chunk_list__()
        if len(chunks) != 1:
            raise UnsupportedLeafError(
                f"{fqn!r}: a DTensor whose local tensor holds {len(chunks)} regions of the "
                f"global tensor (placements {tuple(obj.placements)}, local type "
                f"{type(obj._local_tensor).__qualname__}) cannot be saved; redistribute it to "
                "Shard/Replicate placements of a plain local tensor first"
            )
        box = _box(chunks[0].offsets, chunks[0].sizes)
        local = obj.to_local()
        return [(box, local.view(box.sizes) if tuple(local.shape) != box.sizes else local)]

    def stage(self, obj: Any, copy: Copy) -> Any:
        # Same spec, local shard in host memory; from_local would move it back
        # to the mesh's device.
        classes = _classes()
        assert classes is not None  # obj is a DTensor
        return classes[0](copy(obj.to_local()), obj._spec, requires_grad=False)


class ShardedTensorAdapter:
    """A ``ShardedTensor`` (deprecated by torch, still saved): its local shards
    and their metadata. Its deprecation warnings are silenced (supporting it is
    deliberate). It is saved from the original (``stage`` copies nothing).
    """

    def matches(self, obj: Any) -> bool:
        if not isinstance(obj, torch.Tensor) or type(obj) in (torch.Tensor, torch.nn.Parameter):
            return False
        classes = _classes()
        return classes is not None and isinstance(obj, classes[1])

    def describe(self, fqn: str, obj: Any) -> GlobalTensor:
        return PLAIN_TENSOR.describe(fqn, obj)  # reads a subclass with its warnings silenced

    def local_shards(self, fqn: str, obj: Any) -> list[tuple[Box, Any]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            shards = obj.local_shards()
        return [(_box(s.metadata.shard_offsets, s.metadata.shard_sizes), s.tensor) for s in shards]

    def stage(self, obj: Any, copy: Copy) -> Any:
        return obj


#: Every tensor adapter, tried in order; the plain-tensor fallback comes last.
ADAPTERS: tuple[TensorAdapter, ...] = (
    ExplicitShards(),
    DTensorAdapter(),
    ShardedTensorAdapter(),
    PLAIN_TENSOR,
)


def adapter_of(obj: Any) -> TensorAdapter | None:
    """The adapter of ``obj`` among ``ADAPTERS`` (``None``: not a tensor, e.g. a numpy array)."""
    return adapter_for(obj, ADAPTERS)

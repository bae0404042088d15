"""The tensor adapter protocol: how treeckpt sees one kind of (sharded) tensor.

Every tensor leaf goes through one adapter, the first in a tuple whose
``matches`` accepts it. The adapter says what the tensor is globally (dtype,
shape: what the manifest records), which regions of it this rank holds (a
:class:`~treeckpt.core.box.Box` in global coordinates and the local tensor
holding it, sharing memory so a load fills it in place), and how to make a
host copy of it for an asynchronous save. Nothing else in treeckpt knows a
sharded type: flattening (``core/tree.py``), describing and filling shards
(``shell/tensors.py``) and staging (``dcp/staging.py``) all ask the adapter.

This module holds the protocol and the fallback for any other
``torch.Tensor`` (held whole by every rank); it imports no
``torch.distributed`` (``core`` is pure). ``ADAPTERS`` in ``shell/sharded.py``,
one immutable tuple (no global registry), holds the adapters of the explicit
``__treeckpt_local_shards__`` hook, ``DTensor`` and ``ShardedTensor``, then
this fallback.

To add a sharded type, write a class with these four methods and put an
instance into ``ADAPTERS`` ahead of the plain-tensor fallback (see
``docs/concepts.md``, "Adding a sharded tensor type").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from treeckpt.core.box import Box, full_box
from treeckpt.errors import UnsupportedLeafError

__all__ = ["PLAIN_TENSOR", "GlobalTensor", "PlainTensor", "TensorAdapter", "adapter_for"]

#: Makes the host copy of one local tensor (an async save's staging step).
Copy = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalTensor:
    """What a tensor is as a whole, on every rank alike (what the manifest records)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool = False


class TensorAdapter(Protocol):
    """One kind of tensor, as treeckpt sees it. Methods raise
    ``UnsupportedLeafError`` naming ``fqn`` for an object they cannot handle.
    """

    def matches(self, obj: Any) -> bool:
        """Whether this adapter handles ``obj`` (the first adapter that matches does)."""
        ...

    def describe(self, fqn: str, obj: Any) -> GlobalTensor:
        """The global dtype and shape (the same on every rank holding a part)."""
        ...

    def local_shards(self, fqn: str, obj: Any) -> list[tuple[Box, Any]]:
        """What this rank holds: (global box, local tensor of the box's sizes) pairs.

        Boxes may be empty (uneven sharding), several per rank, and repeated
        on other ranks (replicas, written once). The local tensors must share
        memory with ``obj``: a load writes into them.
        """
        ...

    def stage(self, obj: Any, copy: Copy) -> Any:
        """An object like ``obj`` whose local tensors are ``copy(local)`` (or ``obj`` itself
        when it cannot be rebuilt: it is then saved from the original)."""
        ...


class PlainTensor:
    """Any ``torch.Tensor`` no other adapter claims: one box, the whole tensor.

    Dense strided layouts only: a sparse, quantized or other layout is
    refused. A subclass's attributes are read with its warnings silenced.
    """

    def matches(self, obj: Any) -> bool:
        return isinstance(obj, torch.Tensor)

    def describe(self, fqn: str, obj: Any) -> GlobalTensor:
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            if obj.is_quantized or obj.is_sparse or obj.layout != torch.strided:
                raise UnsupportedLeafError(
                    f"{fqn!r}: tensor layout {obj.layout} / quantized={obj.is_quantized} is not "
                    "supported; convert it to a dense tensor"
                )
            return GlobalTensor(
                dtype=obj.dtype, shape=tuple(obj.shape), requires_grad=obj.requires_grad
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return GlobalTensor(
                dtype=obj.dtype,
                shape=tuple(int(s) for s in obj.shape),
                requires_grad=bool(obj.requires_grad),
            )

    def local_shards(self, fqn: str, obj: Any) -> list[tuple[Box, Any]]:
        return [(full_box(tuple(int(s) for s in obj.shape)), obj)]

    def stage(self, obj: Any, copy: Copy) -> Any:
        # A subclass of unknown meaning is saved from the original.
        return copy(obj) if type(obj) in (torch.Tensor, torch.nn.Parameter) else obj


PLAIN_TENSOR = PlainTensor()


def adapter_for(obj: Any, adapters: Sequence[TensorAdapter]) -> TensorAdapter | None:
    """The first of ``adapters`` that matches ``obj``; ``None`` when none does."""
    return next((a for a in adapters if a.matches(obj)), None)

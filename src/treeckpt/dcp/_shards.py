"""A stand-in tensor for explicit shards, so treeckpt's save can write a planner's items."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ShardSet"]

Shard = tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]


class ShardSet(torch.Tensor):
    """A stand-in tensor of a global shape whose data is explicit local shards.

    treeckpt's save describes it by ``__treeckpt_local_shards__``; any torch
    operation on it is an error (it has no storage of its own).
    """

    _shards: list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]

    @staticmethod
    def __new__(
        cls,
        shape: Sequence[int],
        dtype: torch.dtype,
        shards: list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]],
    ) -> ShardSet:
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype)
        t._shards = shards
        return t

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        raise TypeError(f"{func} called on a placeholder for explicit shards")

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def __treeckpt_local_shards__(
        self,
    ) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]:
        return self._shards

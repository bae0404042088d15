"""Staging for ``async_save``, as in ``torch.distributed.checkpoint.staging``.

A stager copies the state dict's tensors into host memory so training can
change the originals while the save runs. ``AsyncStager`` (the protocol) and
``StagingOptions`` (plain options) are torch's; the stagers are treeckpt's.
DTensors stay DTensors (same mesh and placements, local shard on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager, StagingOptions

from treeckpt.dcp._walk import map_containers
from treeckpt.shell.sharded import adapter_of

__all__ = ["AsyncStager", "BlockingAsyncStager", "DefaultStager", "StagingOptions"]


#: Allocates a host buffer of a shape and dtype (``torch.empty`` unless told otherwise).
Alloc = Callable[[torch.Size, torch.dtype], torch.Tensor]


def _host_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cpu")


def _stage_tensor(
    t: torch.Tensor, cache: dict[int, torch.Tensor] | None, key: int, alloc: Alloc | None = None
) -> torch.Tensor:
    """A host copy of ``t`` as its adapter rebuilds it (``shell/sharded.py``): a DTensor
    stays a DTensor (its local shard copied), a plain tensor is copied, a type
    that cannot be rebuilt is saved from the original. ``alloc`` allocates
    the copies (shared memory, for a checkpoint process to map)."""

    def copy(src: torch.Tensor) -> torch.Tensor:
        src = src.detach()
        buf = cache.get(key) if cache is not None else None
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = (alloc or _host_buffer)(src.shape, src.dtype)
            if cache is not None:
                cache[key] = buf
        buf.copy_(src)
        return buf

    adapter = adapter_of(t)
    assert adapter is not None  # every torch.Tensor has one
    staged: torch.Tensor = adapter.stage(t, copy)
    return staged


def stage_state_dict(
    state_dict: Any, cache: dict[int, torch.Tensor] | None = None, alloc: Alloc | None = None
) -> Any:
    """A copy of ``state_dict`` whose tensors live in host memory (containers rebuilt);
    their buffers from ``alloc`` when given."""
    counter = [0]

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            counter[0] += 1
            return _stage_tensor(obj, cache, counter[0], alloc)
        return obj

    return map_containers(walk, state_dict)


class BlockingAsyncStager(AsyncStager):
    """Stage synchronously into host memory; with ``cache_staged_state_dict`` reuse the buffers."""

    _synchronize_after_execute: bool = False

    def __init__(self, cache_staged_state_dict: bool = False, type_check: bool = False) -> None:
        self.cache_staged_state_dict = cache_staged_state_dict
        self.type_check = type_check
        self._cache: dict[int, torch.Tensor] | None = {} if cache_staged_state_dict else None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        staged: dict[str, Any] = stage_state_dict(state_dict, self._cache)
        return staged

    def synchronize_staging(self) -> None:
        return None

    def close(self) -> None:
        self._cache = None


class DefaultStager(AsyncStager):
    """Stage into host memory, in a background thread when ``use_async_staging``.

    ``stage`` then returns a ``Future`` of the staged state dict. Buffers are
    reused across saves of the same shapes. Pinned and shared memory options
    are accepted for compatibility (treeckpt stages into ordinary host memory;
    a PROCESS ``async_save`` without a stager of the user's stages into shared
    memory, which its checkpoint process maps without a copy).
    """

    #: Where staged copies go (``async_save`` sets shared memory for its own PROCESS stager).
    alloc: Alloc | None = None

    def __init__(self, config: StagingOptions = StagingOptions()) -> None:  # noqa: B008
        self.config = config
        self._cache: dict[int, torch.Tensor] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[dict[str, Any]] | None = None

    def stage(
        self, state_dict: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any] | Future[dict[str, Any]]:
        if not self.config.use_async_staging:
            staged: dict[str, Any] = stage_state_dict(state_dict, self._cache, self.alloc)
            return staged
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="treeckpt-stage")
        self._pending = self._executor.submit(stage_state_dict, state_dict, self._cache, self.alloc)
        return self._pending

    def synchronize_staging(self) -> None:
        if self._pending is not None:
            self._pending.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

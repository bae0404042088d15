"""Host copies of a planned save's tensors, so training can go on while they are written.

Only the shards this rank writes are staged (replicas another rank writes
are not copied: the digest their check needs is taken now), into buffers kept from one save to the next: the second
save of the same state allocates nothing. Buffers for CUDA tensors are
pinned, and the device-to-host copies are issued without waiting, then
synchronised once.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch

from treeckpt.core.box import Box
from treeckpt.shell.save import PreparedSave
from treeckpt.shell.union import tensor_digest

__all__ = ["StagingPool"]


class StagingPool:
    """Reusable host buffers, one per (FQN, shard box) this rank writes."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, Box], Any] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Host memory the buffers hold now."""
        with self._lock:
            return sum(_nbytes(b) for b in self._buffers.values())

    def clear(self) -> None:
        with self._lock:
            self._buffers = {}

    def stage(self, prepared: PreparedSave) -> tuple[PreparedSave, int]:
        """``prepared`` with its tensors replaced by host copies, and the bytes copied.

        Buffers the save does not need are released: the pool holds at most
        one save's share of the state.
        """
        needed = {(item.fqn, item.shard) for item in prepared.items}
        with self._lock:
            kept: dict[tuple[str, Box], Any] = {}
            local: dict[str, list[tuple[Box, Any]]] = {}
            devices: set[torch.device] = set()
            copied = 0
            for fqn, pairs in prepared.local.items():
                staged = []
                for box, data in pairs:
                    if (fqn, box) not in needed:
                        continue
                    buf = _copy_into(self._buffers.get((fqn, box)), data, devices)
                    kept[(fqn, box)] = buf
                    staged.append((box, buf))
                    copied += _nbytes(buf)
                if staged:
                    local[fqn] = staged
            for device in devices:
                torch.cuda.synchronize(device)
            self._buffers = kept
        # A replica this rank does not write is compared by its digest, which
        # must be taken before training changes it.
        digests = {
            f: tensor_digest(prepared.local[f][0][1]) for f in prepared.plain if f not in local
        }
        return dataclasses.replace(prepared, local=local, digests=digests), copied


def _nbytes(buf: Any) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return int(buf.nbytes)


def _copy_into(buf: Any, data: Any, devices: set[torch.device]) -> Any:
    """Copy ``data`` into ``buf`` when it fits, else into a new host buffer."""
    if isinstance(data, torch.Tensor):
        data = data.detach()
        on_gpu = data.device.type == "cuda"
        if not (
            isinstance(buf, torch.Tensor)
            and buf.shape == data.shape
            and buf.dtype == data.dtype
            and (buf.is_pinned() or not on_gpu)
        ):
            buf = torch.empty(
                data.shape, dtype=data.dtype, pin_memory=on_gpu and torch.cuda.is_available()
            )
        buf.copy_(data, non_blocking=on_gpu)
        if on_gpu:
            devices.add(data.device)
        return buf
    arr = np.asarray(data)
    if not (isinstance(buf, np.ndarray) and buf.shape == arr.shape and buf.dtype == arr.dtype):
        buf = np.empty_like(arr, order="C")
    np.copyto(buf, arr)
    return buf

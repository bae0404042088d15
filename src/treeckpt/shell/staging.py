"""Host copies of a planned save's tensors, so training can go on while they are written.

Only the shards this rank writes are staged (replicas another rank writes
are not copied: the digest their check needs is taken now), into buffers kept from one save to the next: the second
save of the same state allocates nothing. Buffers for CUDA tensors are
pinned, and the device-to-host copies are all issued first (on CUDA: on a
side stream, after the work queued on the tensors' stream), then waited for:
the caller is held for the copy and no longer
(``shell/transfer.py``, whose device interface lets tests defer the copies).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch

from treeckpt.core.box import Box
from treeckpt.shell.save import PreparedSave
from treeckpt.shell.transfer import Mark, device_for
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
            marks: list[Mark] = []
            points: dict[torch.device, Any] = {}  # the work queued now, per device
            copied = 0
            try:
                for fqn, pairs in prepared.local.items():
                    staged = []
                    for box, data in pairs:
                        if (fqn, box) not in needed:
                            continue
                        buf = _copy_into(self._buffers.get((fqn, box)), data, marks, points)
                        kept[(fqn, box)] = buf
                        staged.append((box, buf))
                        copied += _nbytes(buf)
                    if staged:
                        local[fqn] = staged
            finally:
                for mark in marks:  # every copy issued has landed, even after a failure
                    mark.wait()
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


def _copy_into(buf: Any, data: Any, marks: list[Mark], points: dict[torch.device, Any]) -> Any:
    """Copy ``data`` into ``buf`` when it fits, else into a new host buffer.

    A device tensor's copy is only issued (after ``points[device]``, the work
    queued on its device when staging began): its mark goes to ``marks``.
    """
    if isinstance(data, torch.Tensor):
        data = data.detach()
        device = device_for(data)
        pinned = device is not None and device.pinned
        if not (
            isinstance(buf, torch.Tensor)
            and buf.shape == data.shape
            and buf.dtype == data.dtype
            and (not pinned or buf.is_pinned())
        ):
            if device is None:
                buf = torch.empty(data.shape, dtype=data.dtype)
            else:
                nbytes = data.numel() * data.element_size()
                buf = device.host_buffer(nbytes).view(data.dtype).view(data.shape)
        if device is None:
            with torch.no_grad():
                buf.copy_(data)
        else:
            if data.device not in points:
                points[data.device] = device.point(data)
            marks.append(device.to_host(buf, data, points[data.device]))
        return buf
    arr = np.asarray(data)
    if not (isinstance(buf, np.ndarray) and buf.shape == arr.shape and buf.dtype == arr.dtype):
        buf = np.empty_like(arr, order="C")
    np.copyto(buf, arr)
    return buf

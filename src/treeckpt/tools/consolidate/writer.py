"""The streaming writer: one ``torch.load``-able zip file, its tensors filled in slabs.

Pass 1 is ``torch.save`` of the skeleton with a ``FakeTensor`` for each hole
under ``torch.serialization.skip_data`` (the pickle, the zip headers and room
for each tensor's bytes; no tensor memory). Pass 2 fills that room with
``pwrite`` from slabs read from the source: runs of whole leading-dimension
rows, contiguous in the output, at most the budget in bytes, laid out in one
reused buffer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info, torch_dtype
from treeckpt.core.leaves import TensorLeaf
from treeckpt.tools.consolidate.sources import Hole, Source

__all__ = ["Progress", "plain", "slabs", "sync_dir", "write"]

_ALIGN = 64  # slabs in the buffer start at this alignment (any dtype can view them)

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, called as tensor bytes are written."""


def plain(obj: Any) -> Any:
    """Containers ``torch.load(weights_only=True)`` accepts: namedtuples become
    tuples, dataclasses dicts, defaultdicts dicts, deques lists."""
    if isinstance(obj, Hole):
        return obj
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, (list, collections.deque)):
        return [plain(v) for v in obj]
    return obj


def _fill_fakes(tree: Any, records: dict[str, TensorLeaf]) -> Any:
    """Replace each hole by a FakeTensor of the stored shape and dtype (no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fakes = {
            fqn: torch.empty(rec.shape, dtype=torch_dtype(rec.dtype))
            for fqn, rec in records.items()
        }
    return _map_holes(tree, lambda h: fakes[h.fqn])


def _map_holes(obj: Any, fn: Callable[[Hole], Any]) -> Any:
    if isinstance(obj, Hole):
        return fn(obj)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _map_holes(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _map_holes(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_holes(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_holes(v, fn) for v in obj]
    return obj


def _holes_with_tensors(skeleton: Any, loaded: Any) -> Iterator[tuple[str, Any]]:
    """(fqn, loaded fake tensor) pairs, walking the skeleton and torch.load's tree together."""
    if isinstance(skeleton, Hole):
        yield skeleton.fqn, loaded
    elif isinstance(skeleton, dict):
        for k, v in skeleton.items():
            yield from _holes_with_tensors(v, loaded[k])
    elif isinstance(skeleton, (list, tuple)):
        for v, w in zip(skeleton, loaded, strict=True):
            yield from _holes_with_tensors(v, w)


def slabs(shape: tuple[int, ...], itemsize: int, budget: int) -> Iterator[tuple[Box, int]]:
    """Boxes covering ``shape`` in row-major order, each contiguous in memory and
    at most ``budget`` bytes (one element at least), with their byte offset."""
    ndim = len(shape)
    if ndim == 0 or math.prod(shape) == 0:
        yield Box(offsets=(0,) * ndim, sizes=shape), 0
        return
    strides = [itemsize * math.prod(shape[d + 1 :]) for d in range(ndim)]

    def rec(prefix: tuple[int, ...]) -> Iterator[tuple[Box, int]]:
        d = len(prefix)
        row = strides[d]  # bytes of one index along dim d, with the rest full
        base = sum(i * s for i, s in zip(prefix, strides, strict=False))
        if row <= budget or d == ndim - 1:
            step = max(1, budget // row)
            for start in range(0, shape[d], step):
                n = min(step, shape[d] - start)
                yield (
                    Box(
                        offsets=(*prefix, start) + (0,) * (ndim - d - 1),
                        sizes=(1,) * d + (n,) + shape[d + 1 :],
                    ),
                    base + start * row,
                )
        else:
            for i in range(shape[d]):
                yield from rec((*prefix, i))

    yield from rec(())


def write(
    source: Source,
    skeleton: Any,
    records: dict[str, TensorLeaf],
    tmp: str,
    budget: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Pass 1: the file with holes; pass 2: fill them. Returns (tensor bytes, largest read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(_fill_fakes(skeleton, records), tmp)
    with FakeTensorMode():
        back = torch.load(tmp, weights_only=True, map_location="cpu")
    offsets = {
        fqn: int(t.untyped_storage()._checkpoint_offset)
        for fqn, t in _holes_with_tensors(skeleton, back)
    }
    total = sum(_nbytes(rec) for rec in records.values())
    done = largest = 0
    batch: list[tuple[str, Box, torch.Tensor, int]] = []
    batch_bytes = 0
    arena = torch.empty(min(budget, total), dtype=torch.uint8)
    fd = os.open(tmp, os.O_WRONLY)
    try:

        def flush() -> None:
            nonlocal batch, batch_bytes, done, largest
            if not batch:
                return
            largest = max(largest, batch_bytes)
            source.read([(f, b, t) for f, b, t, _ in batch])
            for _, _, t, pos in batch:
                data = t.reshape(-1).view(torch.uint8).numpy()
                view = memoryview(data.data)
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
                done += data.nbytes
            batch, batch_bytes = [], 0
            if progress is not None:
                progress(done, total)

        for fqn, rec in records.items():
            itemsize = dtype_info(rec.dtype).itemsize
            dtype = torch_dtype(rec.dtype)
            parts = (
                [(Box(offsets=(0,) * len(rec.shape), sizes=rec.shape), 0)]
                if source.whole_tensors_only()
                else slabs(rec.shape, itemsize, budget)
            )
            for box, rel in parts:
                n = math.prod(box.sizes) * itemsize
                start = -(-batch_bytes // _ALIGN) * _ALIGN
                if start + n > arena.numel():
                    flush()
                    start = 0
                if n <= arena.numel():
                    # A view of the one buffer: no allocation per slab, so the
                    # allocator cannot pile up freed blocks beyond the budget.
                    buf = arena[start : start + n].view(dtype).reshape(box.sizes)
                else:  # one element, or one whole DCP tensor, larger than the budget
                    buf = torch.empty(box.sizes, dtype=dtype)
                batch.append((fqn, box, buf, offsets[fqn] + rel))
                batch_bytes = start + n
        flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    return done, largest


def _nbytes(rec: TensorLeaf) -> int:
    return math.prod(rec.shape) * dtype_info(rec.dtype).itemsize


def sync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

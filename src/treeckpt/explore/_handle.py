"""A tensor of an open checkpoint, described without reading its data."""

from __future__ import annotations

import operator
from html import escape
from typing import Any

import numpy as np
import torch

from treeckpt.core.box import Box, full_box
from treeckpt.core.dtypes import dtype_info, torch_dtype
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.plan import LoadPlan
from treeckpt.explore._source import ChunkInfo, Source
from treeckpt.explore._stats import StatsAccumulator, TensorStats
from treeckpt.explore._units import codecs_text, fmt_size, ratio
from treeckpt.shell.tensors import finish_leaf

__all__ = ["STATS_BATCH_BYTES", "TensorHandle"]

#: Raw bytes read at a time by :meth:`TensorHandle.stats`.
STATS_BATCH_BYTES = 32 << 20


class TensorHandle:
    """A tensor of the checkpoint, described without reading its data.

    ``read()`` gives the whole tensor, ``h[index]`` a part of it (ints,
    slices with positive steps and ``...``; only the chunks covering the
    index are read), ``stats()`` summary statistics computed chunk by chunk.
    Results are CPU torch tensors (numpy arrays for arrays saved from numpy).
    """

    def __init__(self, source: Source, fqn: str, rec: TensorLeaf) -> None:
        self._src = source
        self.fqn = fqn
        self._rec = rec

    @property
    def shape(self) -> tuple[int, ...]:
        """The global shape (of the whole tensor, however it was sharded)."""
        return self._rec.shape

    @property
    def dtype(self) -> str:
        """The format's dtype code (``float32``, ``bfloat16``...); see :attr:`torch_dtype`."""
        return self._rec.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` of :attr:`dtype`."""
        return torch_dtype(self._rec.dtype)

    @property
    def lib(self) -> str:
        """What was saved: ``torch``, ``numpy`` or ``numpy-scalar``."""
        return self._rec.lib

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self._rec.shape)

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self._rec.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Raw size in bytes."""
        return self.numel * dtype_info(self._rec.dtype).itemsize

    @property
    def chunks(self) -> tuple[ChunkInfo, ...]:
        """Every stored chunk (region, writer rank, file, sizes, codec)."""
        return self._src.chunks(self.fqn)

    @property
    def stored_bytes(self) -> int:
        """Bytes its chunks take in the data files (reads the chunk indexes once)."""
        return sum(c.stored_bytes for c in self.chunks)

    @property
    def ratio(self) -> float:
        """Compression ratio, raw / stored (1.0 for raw chunks)."""
        stored = self.stored_bytes
        return self.nbytes / stored if stored else 1.0

    @property
    def codecs(self) -> dict[str, int]:
        """Codec -> number of chunks stored with it (``raw``, ``zstd``, ``shuffle+zstd``...)."""
        out: dict[str, int] = {}
        for c in self.chunks:
            out[c.codec] = out.get(c.codec, 0) + 1
        return out

    @property
    def layout(self) -> dict[int, tuple[Box, ...]]:
        """Writer rank -> the regions (chunk boxes) it stored: the shard layout at save time."""
        out: dict[int, list[Box]] = {}
        for c in self.chunks:
            out.setdefault(c.rank, []).append(c.box)
        return {r: tuple(sorted(b, key=lambda x: x.offsets)) for r, b in sorted(out.items())}

    def read(self) -> Any:
        """The whole tensor (CPU)."""
        (out,) = self._src.read(self.fqn, (full_box(self.shape),))
        return finish_leaf(out, self._rec)

    def __getitem__(self, index: Any) -> Any:
        box, post = _index_box(self.shape, index)
        (out,) = self._src.read(self.fqn, (box,))
        if self._rec.lib == "numpy-scalar":
            return finish_leaf(out, self._rec)
        result = out[post]
        steps = any(isinstance(p, slice) and p.step not in (None, 1) for p in post)
        if steps:  # a strided view would keep the whole covering block alive
            result = result.clone() if isinstance(result, torch.Tensor) else np.array(result)
        return result

    def plan(self, index: Any = ...) -> LoadPlan:
        """Dry run: what reading ``h[index]`` would read (``.report()``), reading no data."""
        box, _ = _index_box(self.shape, index)
        return self._src.plan(self.fqn, (box,))

    def stats(self, *, batch_bytes: int = STATS_BATCH_BYTES) -> TensorStats:
        """Summary statistics (see :class:`TensorStats`), reading the tensor chunk by chunk.

        At most about ``batch_bytes`` raw bytes (or one chunk, if larger) are
        held at a time, so any size can be summarised.
        """
        self._src.plan(self.fqn, (full_box(self.shape),))  # the chunks tile the tensor
        acc = StatsAccumulator()
        batch: list[Box] = []
        size = 0

        def flush() -> None:
            for out in self._src.read(self.fqn, tuple(batch)):
                acc.add(out if isinstance(out, torch.Tensor) else torch.from_numpy(out))

        for c in sorted(self.chunks, key=lambda c: (c.file, c.offset)):
            if not c.box.volume:
                continue
            if batch and size + c.raw_bytes > batch_bytes:
                flush()
                batch, size = [], 0
            batch.append(c.box)
            size += c.raw_bytes
        if batch:
            flush()
        return acc.result()

    def __repr__(self) -> str:
        return _text(self)

    def _repr_html_(self) -> str:
        return _html(self)


def _index_box(shape: tuple[int, ...], index: Any) -> tuple[Box, tuple[Any, ...]]:
    """The box covering ``index`` and the index that picks the result out of that box."""
    items = index if isinstance(index, tuple) else (index,)
    ndim = len(shape)
    ellipses = [i for i, x in enumerate(items) if x is Ellipsis]
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        k = ellipses[0]
        fill = ndim - (len(items) - 1)
        items = (*items[:k], *(slice(None),) * max(fill, 0), *items[k + 1 :])
    if len(items) > ndim:
        raise IndexError(f"too many indices for a {ndim}-d tensor: {len(items)} were given")
    items = (*items, *(slice(None),) * (ndim - len(items)))
    offsets: list[int] = []
    sizes: list[int] = []
    post: list[Any] = []
    for d, (ix, dim) in enumerate(zip(items, shape, strict=True)):
        if isinstance(ix, slice):
            start, stop, step = ix.indices(dim)
            if step <= 0:
                raise IndexError("only positive slice steps can be read")
            n = len(range(start, stop, step))
            offsets.append(min(start, dim) if n else 0)
            sizes.append((n - 1) * step + 1 if n else 0)
            post.append(slice(None, None, step) if step != 1 else slice(None))
            continue
        if isinstance(ix, bool | np.bool_) or ix is None:
            raise TypeError(f"index {ix!r}: only ints, slices and ... can index a tensor handle")
        try:
            k = operator.index(ix)
        except TypeError:
            raise TypeError(
                f"index of type {type(ix).__name__}: only ints, slices and ... can index a "
                "tensor handle (read() it first for other indexing)"
            ) from None
        if not -dim <= k < dim:
            raise IndexError(f"index {k} is out of bounds for dimension {d} with size {dim}")
        offsets.append(k % dim)
        sizes.append(1)
        post.append(0)
    return Box(offsets=tuple(offsets), sizes=tuple(sizes)), tuple(post)


def _text(h: TensorHandle) -> str:
    return (
        f"<tensor {h.fqn} {h.dtype}{list(h.shape)}: {fmt_size(h.nbytes)} raw, "
        f"{fmt_size(h.stored_bytes)} stored ({ratio(h.nbytes, h.stored_bytes)}), "
        f"{len(h.chunks)} chunk(s) {codecs_text(h.codecs)} from {len(h.layout)} writer rank(s)>"
    )


def _html(h: TensorHandle) -> str:
    e = escape
    layout = "; ".join(f"rank {r}: {len(boxes)} chunk(s)" for r, boxes in h.layout.items())
    return (
        f'<div class="treeckpt" style="font-family:monospace"><b>{e(h.fqn)}</b> '
        f"{e(h.dtype)}{e(str(list(h.shape)))}<br>{fmt_size(h.nbytes)} raw, "
        f"{fmt_size(h.stored_bytes)} stored ({ratio(h.nbytes, h.stored_bytes)}); "
        f"{len(h.chunks)} chunk(s): {e(codecs_text(h.codecs))}; {e(layout)}</div>"
    )

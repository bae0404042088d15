"""Save and load planning: pure functions from specs to work items.

``plan_save`` decides which rank writes which chunk (on columns, in
``core/plan_table.py``, re-exported here); ``plan_load`` decides which stored
byte ranges feed which destination region. Both take plain frozen data and
return plain frozen data, so any world size can be planned and checked in one
process, and every decision is property-tested.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from treeckpt.core.box import Box, check_tiling
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.manifest import ChunkRef
from treeckpt.core.plan_table import SavePlan, WriteItem, plan_save
from treeckpt.core.sizes import fmt_size
from treeckpt.core.specs import ShardSpec
from treeckpt.core.widening import cast_refusal, widening
from treeckpt.errors import PlanError

__all__ = [
    "LoadPlan",
    "ReadItem",
    "SavePlan",
    "StoredTensor",
    "WriteItem",
    "chunk_read_ranges",
    "contiguous_range",
    "plan_load",
    "plan_save",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredTensor:
    """A tensor as a checkpoint stores it: global description plus its chunks."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadItem:
    """Copy region ``src`` of a chunk into region ``dst`` of the requested box.

    ``src`` is relative to ``chunk.box``, ``dst`` relative to ``request``
    (the destination's box in global coordinates). ``byte_range`` is set when
    ``src`` is one contiguous run of the chunk's row-major raw bytes: the
    ``[start, stop)`` byte range holding it.
    """

    fqn: str
    chunk: ChunkRef
    request: Box
    src: Box
    dst: Box
    byte_range: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPlan:
    """What one rank reads. Reports the cost before any I/O.

    ``needed_bytes`` is what the destinations hold; ``read_raw_bytes`` is the
    raw size of what is read and decoded (a chunk cut into blocks only from its
    first to its last needed block, any other chunk whole), so
    ``read_amplification`` = read / needed (1.0 is ideal).

    Bytes are counted in the stored dtype (a destination of a wider dtype
    holds more), so read amplification compares like with like.

    ``converted`` maps each FQN whose destination has another dtype than the
    checkpoint to ``(stored dtype, destination dtype)``; ``lossy`` lists those
    of them whose conversion can lose bits (allowed by name by the caller).
    """

    items: tuple[ReadItem, ...]
    needed_bytes: int
    read_raw_bytes: int
    read_stored_bytes: int
    files: tuple[str, ...]
    converted: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    lossy: tuple[str, ...] = ()

    @property
    def read_amplification(self) -> float:
        return self.read_raw_bytes / self.needed_bytes if self.needed_bytes else 1.0

    @property
    def ranges(self) -> dict[tuple[str, int], tuple[int, int]]:
        """Per chunk (file, offset): the range of its raw bytes to read, whole blocks."""
        return chunk_read_ranges(self.items)

    @property
    def chunks(self) -> tuple[ChunkRef, ...]:
        """Distinct chunks touched, in file order."""
        seen: dict[tuple[str, int], ChunkRef] = {}
        for item in self.items:
            seen.setdefault((item.chunk.file, item.chunk.offset), item.chunk)
        return tuple(seen[k] for k in sorted(seen))

    def report(self) -> str:
        return (
            f"load plan: {len(self.items)} read items from {len(self.chunks)} chunks in "
            f"{len(self.files)} files; needed {fmt_size(self.needed_bytes)}, reads "
            f"{fmt_size(self.read_stored_bytes)} stored / {fmt_size(self.read_raw_bytes)} raw "
            f"(read amplification {self.read_amplification:.3f})"
            + (f"; {self.conversions()}" if self.converted else "")
        )

    def conversions(self) -> str:
        """The dtype conversions, counted per pair of dtypes; lossy ones name their FQNs.

        >>> LoadPlan(items=(), needed_bytes=0, read_raw_bytes=0, read_stored_bytes=0, files=(),
        ...          converted={"a": ("bfloat16", "float32"), "b": ("bfloat16", "float32"),
        ...                     "c": ("float32", "bfloat16")}, lossy=("c",)).conversions()
        'converts 3 tensors: 2 bfloat16 -> float32, 1 float32 -> bfloat16 (lossy, allowed by name: c)'
        """
        by_pair: dict[tuple[str, str, bool], list[str]] = {}
        lossy = set(self.lossy)
        for fqn, (src, dst) in self.converted.items():
            by_pair.setdefault((src, dst, fqn in lossy), []).append(fqn)
        parts = []
        for (src, dst, bad), fqns in sorted(by_pair.items()):
            part = f"{len(fqns)} {src} -> {dst}"
            if bad:
                more = f" and {len(fqns) - 3} more" if len(fqns) > 3 else ""
                part += f" (lossy, allowed by name: {', '.join(fqns[:3])}{more})"
            parts.append(part)
        n = len(self.converted)
        return f"converts {n} tensor{'s' if n != 1 else ''}: " + ", ".join(parts)


def plan_load(
    stored: Mapping[str, StoredTensor],
    requests: Sequence[ShardSpec],
    *,
    allow_lossy_cast: Callable[[str], bool] | None = None,
) -> LoadPlan:
    """Plan the reads that fill every requested box from stored chunks.

    Each requested box is intersected with the chunks of its tensor (found by
    bisection along dim 0, so a rank's cost grows with what it reads, not with
    the number of chunks). Coverage is checked: the intersections must
    partition every request (same total volume, no partial overlap), so every
    element comes from exactly one stored chunk, or a PlanError names the FQN
    and box.

    A request's dtype is its destination's: one the stored dtype converts to
    exactly (``core/widening.py``) is planned and listed in
    ``LoadPlan.converted``; one that can lose bits only when
    ``allow_lossy_cast(fqn)`` is true (also listed in ``LoadPlan.lossy``).

    Raises:
        PlanError: unknown FQN, a shape mismatch, a dtype the stored one does
            not convert to (exactly, or with consent), chunks that do not tile
            their tensor, or a request not fully covered.
    """
    items: list[ReadItem] = []
    needed = 0
    touched: dict[tuple[str, int], ChunkRef] = {}
    indexes: dict[str, _ChunkIndex] = {}
    converted: dict[str, tuple[str, str]] = {}
    lossy: dict[str, None] = {}
    for req in requests:
        st = stored.get(req.fqn)
        if st is None:
            raise PlanError(f"{req.fqn}: not in the checkpoint")
        if st.shape != req.shape or (
            st.dtype != req.dtype
            and (cast := cast_refusal(req.fqn, st.dtype, req.dtype, allow_lossy_cast)) is not None
        ):
            raise PlanError(
                f"{req.fqn}: checkpoint has dtype {st.dtype} shape {list(st.shape)}, request has "
                f"dtype {req.dtype} shape {list(req.shape)}"
                + (f" ({cast})" if st.shape == req.shape else "")
            )
        if st.dtype != req.dtype:
            converted[req.fqn] = (st.dtype, req.dtype)
            if widening(st.dtype, req.dtype) != "exact":
                lossy[req.fqn] = None
        index = indexes.get(req.fqn)
        if index is None:
            index = indexes[req.fqn] = _ChunkIndex(st)
        itemsize = dtype_info(st.dtype).itemsize
        for box in req.boxes:
            if box.is_empty():
                continue
            whole = index.exact(box)
            if whole is not None:
                # One stored chunk is exactly the request (a tensor saved and
                # loaded the same way): nothing to intersect or tile.
                touched[(whole.file, whole.offset)] = whole
                zero = Box(offsets=(0,) * box.ndim, sizes=box.sizes)
                items.append(
                    ReadItem(
                        fqn=req.fqn,
                        chunk=whole,
                        request=box,
                        src=zero,
                        dst=zero,
                        byte_range=(0, whole.raw_length) if whole.blocks else None,
                    )
                )
                needed += box.volume * itemsize
                continue
            covered = 0
            parts: list[Box] = []
            for chunk in index.candidates(box):
                inter = chunk.box.intersect(box)
                if inter is None:
                    continue
                covered += inter.volume
                touched[(chunk.file, chunk.offset)] = chunk
                parts.append(inter.relative_to(box))
                src = inter.relative_to(chunk.box)
                items.append(
                    ReadItem(
                        fqn=req.fqn,
                        chunk=chunk,
                        request=box,
                        src=src,
                        dst=parts[-1],
                        byte_range=contiguous_range(chunk.box, src, itemsize)
                        if chunk.blocks
                        else None,
                    )
                )
            if covered >= box.volume:
                # No partial overlap and equal volume: the parts partition the request.
                check_tiling(box.sizes, parts, what=req.fqn)
            if covered != box.volume:
                raise PlanError(
                    f"{req.fqn}: stored chunks cover {covered} of the {box.volume} elements of "
                    f"the requested region offsets {list(box.offsets)} sizes {list(box.sizes)}"
                )
            needed += box.volume * itemsize
    ranges = chunk_read_ranges(items)
    chunks = touched.values()
    return LoadPlan(
        items=tuple(items),
        needed_bytes=needed,
        read_raw_bytes=sum(_span(ranges[(c.file, c.offset)]) for c in chunks),
        read_stored_bytes=sum(_span(c.stored_range(*ranges[(c.file, c.offset)])) for c in chunks),
        files=tuple(sorted({c.file for c in chunks})),
        converted=converted,
        lossy=tuple(lossy),
    )


def _span(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def contiguous_range(chunk: Box, src: Box, itemsize: int) -> tuple[int, int] | None:
    """The row-major byte range of region ``src`` (relative to ``chunk``), if it is one run.

    A region is one run when, past its first dimension of size > 1, it spans
    every later dimension whole.

    >>> contiguous_range(Box(offsets=(0, 0), sizes=(4, 3)), Box(offsets=(1, 0), sizes=(2, 3)), 4)
    (12, 36)
    >>> contiguous_range(Box(offsets=(0, 0), sizes=(4, 3)), Box(offsets=(1, 0), sizes=(2, 2)), 4) is None
    True
    """
    dims = chunk.sizes
    first = next((d for d, s in enumerate(src.sizes) if s > 1), len(dims) - 1)
    if any(src.sizes[d] != dims[d] for d in range(first + 1, len(dims))):
        return None
    start = 0
    for d in range(len(dims)):
        start = start * dims[d] + src.offsets[d]
    return start * itemsize, (start + src.volume) * itemsize


def chunk_read_ranges(items: Sequence[ReadItem]) -> dict[tuple[str, int], tuple[int, int]]:
    """For each chunk the items touch, the range of its raw bytes to read and decode.

    A chunk cut into blocks is read from the first to the last block any item
    needs (a ranged read of ``ChunkRef.stored_range``); any other chunk is
    read whole.
    """
    out: dict[tuple[str, int], tuple[int, int]] = {}
    whole: set[tuple[str, int]] = set()
    for item in items:
        c = item.chunk
        key = (c.file, c.offset)
        if key in whole:
            continue
        if item.byte_range is None or not c.blocks:
            out[key] = (0, c.raw_length)
            whole.add(key)
            continue
        lo, hi = c.raw_block_range(*item.byte_range)
        if key in out:
            lo, hi = min(lo, out[key][0]), max(hi, out[key][1])
        out[key] = (lo, hi)
    return out


class _ChunkIndex:
    """Chunks of one tensor sorted along dim 0.

    Coverage is checked per request (the intersections must partition it), so
    a rank pays for the chunks it reads, not for every chunk of the tensor.
    """

    def __init__(self, st: StoredTensor) -> None:
        boxes = [c.box for c in st.chunks]
        if len(set(boxes)) != len(boxes):
            raise PlanError(f"{st.fqn}: the checkpoint stores the same chunk twice")
        self.chunks = sorted(st.chunks, key=lambda c: c.box.offsets[:1])
        self.by_box = {c.box: c for c in st.chunks}
        self.scalar = len(st.shape) == 0
        self.starts = [c.box.offsets[0] for c in self.chunks] if not self.scalar else []
        running = 0
        self.max_ends: list[int] = []
        for c in self.chunks:
            if not self.scalar:
                running = max(running, c.box.offsets[0] + c.box.sizes[0])
                self.max_ends.append(running)

    def exact(self, box: Box) -> ChunkRef | None:
        """The chunk whose box is ``box``, when it is the only chunk intersecting it."""
        found = self.by_box.get(box)
        if found is None:
            return None
        cands = self.candidates(box)
        return found if len(cands) == 1 else None

    def candidates(self, box: Box) -> list[ChunkRef]:
        if self.scalar:
            return list(self.chunks)
        lo = bisect.bisect_right(self.max_ends, box.offsets[0])
        hi = bisect.bisect_left(self.starts, box.offsets[0] + box.sizes[0])
        return self.chunks[lo:hi]

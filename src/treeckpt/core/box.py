"""Box geometry: n-d regions of a global tensor.

A rank's local shard is a Box, a stored chunk is a Box, and resharding is Box
intersection. Zero-size boxes are legal (uneven sharding produces them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from treeckpt.errors import PlanError

__all__ = ["Box", "check_tiling", "full_box", "split_box"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Box:
    """An n-d region: ``offsets[d] <= i[d] < offsets[d] + sizes[d]`` for every dim d.

    >>> Box(offsets=(0, 2), sizes=(4, 2)).intersect(Box(offsets=(1, 0), sizes=(2, 3)))
    Box(offsets=(1, 2), sizes=(2, 1))
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.sizes):
            raise PlanError(f"box has {len(self.offsets)} offsets but {len(self.sizes)} sizes")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.sizes):
            raise PlanError(f"box has a negative offset or size: {self.offsets}, {self.sizes}")

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def volume(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes, strict=True))

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.sizes)

    def contains(self, other: Box) -> bool:
        """True when ``other`` lies inside this box (an empty box lies anywhere)."""
        if other.is_empty():
            return True
        return all(
            so <= oo and oo + osz <= so + ssz
            for so, ssz, oo, osz in zip(
                self.offsets, self.sizes, other.offsets, other.sizes, strict=True
            )
        )

    def intersect(self, other: Box) -> Box | None:
        """The common region, or ``None`` when there is none of positive volume."""
        offs = []
        sizes = []
        for a, asz, b, bsz in zip(
            self.offsets, self.sizes, other.offsets, other.sizes, strict=True
        ):
            lo = max(a, b)
            hi = min(a + asz, b + bsz)
            if hi <= lo:
                return None
            offs.append(lo)
            sizes.append(hi - lo)
        return Box(offsets=tuple(offs), sizes=tuple(sizes))

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (which must contain it)."""
        return Box(
            offsets=tuple(a - b for a, b in zip(self.offsets, outer.offsets, strict=True)),
            sizes=self.sizes,
        )

    def slices(self) -> tuple[slice, ...]:
        """Index slices selecting this box from an array whose origin is the global origin."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True))


def full_box(shape: Sequence[int]) -> Box:
    """The box covering a whole tensor of ``shape``."""
    return Box(offsets=(0,) * len(shape), sizes=tuple(shape))


def split_box(box: Box, itemsize: int, max_bytes: int) -> tuple[Box, ...]:
    """Split ``box`` into row-major chunks of at most ``max_bytes`` each.

    Chunks are boxes too, so a reader fetches only the chunks it needs. The
    split cuts the outermost dimension whose inner slab fits in ``max_bytes``,
    so every chunk is a contiguous run of the box in row-major order; a single
    element larger than ``max_bytes`` still forms one chunk. Empty boxes give
    no chunks (there is nothing to store).

    >>> [b.sizes for b in split_box(full_box((5, 4)), 4, 32)]
    [(2, 4), (2, 4), (1, 4)]
    """
    if max_bytes <= 0:
        raise PlanError(f"chunk size must be positive, got {max_bytes}")
    if box.is_empty():
        return ()
    if box.volume * itemsize <= max_bytes or box.ndim == 0:
        return (box,)
    inner = itemsize
    split_dim = box.ndim - 1
    # Find the outermost dim d whose slab (product of sizes after d) fits.
    for d in range(box.ndim - 1, -1, -1):
        if inner * box.sizes[d] > max_bytes:
            split_dim = d
            break
        inner *= box.sizes[d]
    step = max(1, max_bytes // inner)
    return tuple(_iter_split(box, split_dim, step))


def _iter_split(box: Box, split_dim: int, step: int) -> Iterator[Box]:
    outer_ranges = [range(box.offsets[d], box.offsets[d] + box.sizes[d]) for d in range(split_dim)]
    tail_offsets = box.offsets[split_dim + 1 :]
    tail_sizes = box.sizes[split_dim + 1 :]
    start, size = box.offsets[split_dim], box.sizes[split_dim]
    for outer in _product(outer_ranges):
        for lo in range(start, start + size, step):
            n = min(step, start + size - lo)
            yield Box(
                offsets=(*outer, lo, *tail_offsets),
                sizes=(*(1,) * len(outer), n, *tail_sizes),
            )


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for head in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (head, *rest)


def check_tiling(shape: Sequence[int], boxes: Sequence[Box], *, what: str) -> None:
    """Check that ``boxes`` tile a tensor of ``shape``: no gaps, no partial overlaps.

    Exact duplicates (replicas) are allowed; call with distinct boxes to forbid
    them. Raises :class:`PlanError` naming ``what`` (an FQN) and the offending
    boxes. Runs in O(n log n) for the layouts sharding produces (a sweep along
    the most-cut dim compares a box only with boxes whose extent there overlaps it).
    """
    shape = tuple(shape)
    outer = full_box(shape)
    distinct = sorted({b for b in boxes if not b.is_empty()}, key=lambda b: (b.offsets, b.sizes))
    for b in distinct:
        if b.ndim != len(shape) or not outer.contains(b):
            raise PlanError(f"{what}: shard {_fmt(b)} lies outside the tensor shape {list(shape)}")
    total = sum(b.volume for b in distinct)
    if len(shape) == 0:
        if total != 1:
            raise PlanError(f"{what}: scalar tensor has no stored shard")
        return
    # Sweep along the dim with the most distinct offsets: boxes of a sharded
    # layout are cut along it, so few boxes are active at any point.
    dim = max(range(len(shape)), key=lambda d: len({b.offsets[d] for b in distinct}))
    distinct.sort(key=lambda b: b.offsets[dim])
    active: list[Box] = []
    for b in distinct:
        start = b.offsets[dim]
        active = [a for a in active if a.offsets[dim] + a.sizes[dim] > start]
        for a in active:
            if a.intersect(b) is not None:
                raise PlanError(
                    f"{what}: shards {_fmt(a)} and {_fmt(b)} overlap without being replicas"
                )
        active.append(b)
    expected = math.prod(shape)
    if total != expected:
        raise PlanError(
            f"{what}: shards cover {total} of {expected} elements of shape {list(shape)} (a gap)"
        )


def _fmt(b: Box) -> str:
    return f"[offsets {list(b.offsets)}, sizes {list(b.sizes)}]"

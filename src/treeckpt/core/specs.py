"""Shard specs: what one rank holds of each tensor, as plain data."""

from __future__ import annotations

from dataclasses import dataclass

from treeckpt.core.box import Box, full_box

__all__ = ["ShardSpec", "full_spec"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSpec:
    """The boxes of tensor ``fqn`` (global ``shape``, dtype code ``dtype``) one rank holds.

    A plain tensor is the full box; a DTensor or ShardedTensor shard is its
    region of the global tensor; replicas are identical boxes on several ranks.
    """

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    boxes: tuple[Box, ...]


def full_spec(fqn: str, dtype: str, shape: tuple[int, ...]) -> ShardSpec:
    """The spec of a rank holding the whole tensor."""
    return ShardSpec(fqn=fqn, dtype=dtype, shape=shape, boxes=(full_box(shape),))

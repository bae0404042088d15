"""Leaf records: what the format knows about each leaf, as plain data.

A leaf is a tensor (torch tensor incl. DTensor/ShardedTensor, numpy array or
numpy scalar), a typed value (None, bool, int of any size, float bit-exact,
str, bytes) or, only when the caller opts in, a pickled object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = ["LeafRecord", "PickleLeaf", "TensorLeaf", "TensorLib", "Value", "ValueLeaf"]

Value: TypeAlias = bool | int | float | str | bytes | None
TensorLib = Literal["torch", "numpy", "numpy-scalar"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorLeaf:
    """A tensor leaf: which library it came from, its dtype code and global shape."""

    lib: TensorLib
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ValueLeaf:
    """A plain value stored typed in the manifest."""

    value: Value


@dataclass(frozen=True, slots=True, kw_only=True)
class PickleLeaf:
    """An arbitrary object pickled on the caller's explicit request (``allow_pickle=True``)."""

    data: bytes


LeafRecord: TypeAlias = TensorLeaf | ValueLeaf | PickleLeaf

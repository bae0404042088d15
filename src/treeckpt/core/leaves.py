"""Leaf records: what the format knows about each leaf, as plain data.

A leaf is a tensor (torch tensor incl. DTensor/ShardedTensor, numpy array or
numpy scalar), a typed plain value (None, bool, int of any size, float and
complex bit-exact, str, bytes, and the types listed in ``core/values.py``:
sets, Counters, torch dtypes, paths, datetimes, enum members...) or, only when
the caller opts in, a pickled object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

__all__ = ["LeafRecord", "PickleLeaf", "TensorLeaf", "TensorLib", "Value", "ValueLeaf"]

# A plain value (see core/values.py for the closed list of types).
Value: TypeAlias = Any
TensorLib = Literal["torch", "numpy", "numpy-scalar"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorLeaf:
    """A tensor leaf: which library it came from, its dtype code and global shape.

    ``requires_grad`` and ``parameter`` (a torch ``nn.Parameter``) are restored
    on tensors made from the checkpoint; a load into a template keeps the
    template's own tensors and flags.
    """

    lib: TensorLib
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool = False
    parameter: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ValueLeaf:
    """A plain value stored typed in the manifest (a snapshot: sets and Counters are copied)."""

    value: Value


@dataclass(frozen=True, slots=True, kw_only=True)
class PickleLeaf:
    """An arbitrary object pickled on the caller's explicit request (``allow_pickle=True``)."""

    data: bytes


LeafRecord: TypeAlias = TensorLeaf | ValueLeaf | PickleLeaf

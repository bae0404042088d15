"""Test support shipped with treeckpt.

- :func:`assert_same_tree` compares a restored tree with the saved one: same
  containers, same key types and order, bit-identical leaves.
- ``treeckpt.testing.strategies`` holds hypothesis strategies for boxes,
  shapes, shard layouts, per-rank shard specs and trees, so code built on
  treeckpt (and treeckpt's own tests) can property-test the same way. It needs
  ``hypothesis`` (the ``test`` extra); importing this package alone does not.
- ``treeckpt.testing.backends`` ships ``BackendTests``, the storage backend
  conformance suite: subclass it in a pytest module with a ``backend``
  fixture to hold your own backend to the contract treeckpt's backends pass.
  It needs ``pytest``.
- ``treeckpt.testing.faults`` holds ``FaultyBackend``, a backend wrapper that
  fails (or kills the process) at a chosen call.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
from typing import Any

import numpy as np
import optree
import torch

__all__ = ["assert_same_tree"]


def assert_same_tree(actual: Any, expected: Any, *, strict_types: bool = False) -> None:
    """Assert that ``actual`` has the structure and bit-identical leaves of ``expected``.

    Containers must have the same type; dict keys the same values, types and
    order; a defaultdict the same factory; a deque the same ``maxlen``.
    Namedtuples and dataclasses compare by class name and field names, since a
    tree restored without a template gets freshly made classes; pass
    ``strict_types=True`` to require the very same classes. Floats compare by
    bit pattern (``nan`` equals itself, ``-0.0`` differs from ``0.0``), tensors
    and arrays by type, dtype, shape and bytes.

    Raises:
        AssertionError: naming the path of the first difference.
    """
    _compare(actual, expected, "<root>", strict_types)


def _fail(path: str, what: str) -> None:
    raise AssertionError(f"{path}: {what}")


def _compare(a: Any, b: Any, path: str, strict: bool) -> None:
    if optree.is_namedtuple_instance(b) or (
        dataclasses.is_dataclass(b) and not isinstance(b, type)
    ):
        _compare_record(a, b, path, strict)
        return
    if isinstance(b, dict):
        if type(a) is not type(b):
            _fail(path, f"{type(a).__name__} instead of {type(b).__name__}")
        ka, kb = list(a), list(b)
        if [(type(k), k) for k in ka] != [(type(k), k) for k in kb]:
            _fail(path, f"keys {ka!r} instead of {kb!r}")
        if isinstance(b, collections.defaultdict) and a.default_factory is not b.default_factory:
            _fail(path, f"default_factory {a.default_factory} instead of {b.default_factory}")
        for k in kb:
            _compare(a[k], b[k], f"{path}[{k!r}]", strict)
        return
    if isinstance(b, list | tuple | collections.deque):
        if type(a) is not type(b):
            _fail(path, f"{type(a).__name__} instead of {type(b).__name__}")
        if len(a) != len(b):
            _fail(path, f"{len(a)} items instead of {len(b)}")
        if isinstance(b, collections.deque) and a.maxlen != b.maxlen:
            _fail(path, f"maxlen {a.maxlen} instead of {b.maxlen}")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _compare(x, y, f"{path}[{i}]", strict)
        return
    _compare_leaf(a, b, path)


def _compare_record(a: Any, b: Any, path: str, strict: bool) -> None:
    ta, tb = type(a), type(b)
    if strict and ta is not tb:
        _fail(path, f"{ta!r} instead of {tb!r}")
    if optree.is_namedtuple_instance(b):
        if not optree.is_namedtuple_instance(a):
            _fail(path, f"{ta.__name__} is not a namedtuple")
        names_a, names_b = list(ta._fields), list(tb._fields)
    else:
        if not dataclasses.is_dataclass(a) or isinstance(a, type):
            _fail(path, f"{ta.__name__} is not a dataclass")
        names_a = [f.name for f in dataclasses.fields(a)]
        names_b = [f.name for f in dataclasses.fields(b)]
    if ta.__name__ != tb.__name__ or names_a != names_b:
        _fail(path, f"{ta.__name__}{names_a} instead of {tb.__name__}{names_b}")
    for name in names_b:
        _compare(getattr(a, name), getattr(b, name), f"{path}.{name}", strict)


def _compare_leaf(a: Any, b: Any, path: str) -> None:
    if type(a) is not type(b):
        _fail(path, f"{type(a).__qualname__} {a!r} instead of {type(b).__qualname__} {b!r}")
    if isinstance(b, float):
        if struct.pack("<d", a) != struct.pack("<d", b):
            _fail(path, f"{a!r} instead of {b!r} (bit patterns differ)")
    elif isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            _fail(path, f"tensor {a.dtype}{list(a.shape)} instead of {b.dtype}{list(b.shape)}")
        if _tensor_bytes(a) != _tensor_bytes(b):
            _fail(path, "tensor contents differ")
    elif isinstance(b, np.ndarray | np.generic):
        if a.dtype != b.dtype or np.shape(a) != np.shape(b):
            _fail(path, f"array {a.dtype}{np.shape(a)} instead of {b.dtype}{np.shape(b)}")
        if np.asarray(a).tobytes() != np.asarray(b).tobytes():
            _fail(path, "array contents differ")
    elif a != b:
        _fail(path, f"{a!r} instead of {b!r}")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())

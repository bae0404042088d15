"""Minimal helpers over nested dict/list/tuple trees of tensors and plain values.

The harness keeps its own tiny tree walker so that it measures every contender
on the same data without depending on the library under test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

Tree = Any
"""A nested structure of dicts, lists and tuples whose leaves are tensors or plain values."""


def iter_tensors(tree: Tree) -> Iterator[torch.Tensor]:
    """Yield every tensor leaf of ``tree`` in a deterministic order."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from iter_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from iter_tensors(value)


def map_tensors(tree: Tree, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tree:
    """Return a copy of ``tree`` with ``fn`` applied to tensor leaves; other leaves are deep-copied."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, list):
        return [map_tensors(value, fn) for value in tree]
    if isinstance(tree, tuple):
        return tuple(map_tensors(value, fn) for value in tree)
    return copy.deepcopy(tree)


def tensor_bytes(tree: Tree) -> int:
    """Total bytes held by the tensor leaves of ``tree``."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(tree))


def tensor_count(tree: Tree) -> int:
    """Number of tensor leaves of ``tree``."""
    return sum(1 for _ in iter_tensors(tree))


def zeros_template(tree: Tree) -> Tree:
    """A tree of the same structure whose tensors are zero-filled (pages touched, like a live model)."""
    return map_tensors(tree, torch.zeros_like)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's contents (copied to contiguous memory when needed)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


class TreeMismatch(AssertionError):
    """Raised when a loaded tree differs from the tree that was saved."""


def assert_same_tree(expected: Tree, actual: Tree, path: str = "") -> None:
    """Raise :class:`TreeMismatch` unless ``actual`` equals ``expected`` bit for bit.

    Tensors must match in dtype, shape and raw bytes; dict keys must match
    exactly; other leaves must compare equal and have the same type.
    """
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        _assert_same_tensor(expected, actual, where)
    elif isinstance(expected, dict):
        _assert_same_dict(expected, actual, path)
    elif isinstance(expected, (list, tuple)):
        if type(actual) is not type(expected) or len(actual) != len(expected):
            raise TreeMismatch(
                f"{where}: expected {type(expected).__name__} of {len(expected)}, got {actual!r:.200}"
            )
        for index, (exp, act) in enumerate(zip(expected, actual, strict=True)):
            assert_same_tree(exp, act, f"{path}[{index}]")
    elif type(actual) is not type(expected) or actual != expected:
        raise TreeMismatch(f"{where}: expected {expected!r:.200}, got {actual!r:.200}")


def _assert_same_dict(expected: dict[Any, Any], actual: Tree, path: str) -> None:
    if not isinstance(actual, dict):
        raise TreeMismatch(f"{path or '<root>'}: expected a dict, got {type(actual).__name__}")
    if set(expected) != set(actual):
        missing = sorted(map(repr, set(expected) - set(actual)))[:5]
        extra = sorted(map(repr, set(actual) - set(expected)))[:5]
        raise TreeMismatch(
            f"{path or '<root>'}: keys differ (missing {missing}, unexpected {extra})"
        )
    for key, value in expected.items():
        assert_same_tree(value, actual[key], f"{path}.{key}" if path else str(key))


def _assert_same_tensor(expected: torch.Tensor, actual: Tree, where: str) -> None:
    if not isinstance(actual, torch.Tensor):
        raise TreeMismatch(f"{where}: expected a tensor, got {type(actual).__name__}")
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise TreeMismatch(
            f"{where}: expected {expected.dtype} {tuple(expected.shape)}, got {actual.dtype} {tuple(actual.shape)}"
        )
    if actual.device != expected.device:
        raise TreeMismatch(f"{where}: expected device {expected.device}, got {actual.device}")
    if not torch.equal(as_bytes(expected), as_bytes(actual)):
        raise TreeMismatch(f"{where}: tensor contents differ")

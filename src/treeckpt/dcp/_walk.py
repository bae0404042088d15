"""One walk over a DCP state dict's containers, shared by staging and the checkpoint process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["map_containers"]


def map_containers(leaf: Callable[[Any], Any], obj: Any) -> Any:
    """``obj`` with its dicts, lists and (plain) tuples rebuilt and ``leaf`` applied to the rest.

    Named tuples are leaves, as DCP's own copying of a state dict treats them.
    """
    if isinstance(obj, dict):
        return {k: map_containers(leaf, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_containers(leaf, v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(map_containers(leaf, v) for v in obj)
    return leaf(obj)

"""DCP's view of a state dict: flat FQN -> object, tensors' local shards, values as bytes.

DCP flattens nested dicts into dotted keys (``model.layer.weight``) and keeps
a mapping back to the original path so loaded values land where they came
from. Lists are walked only when they hold tensors or dicts; a list or tuple of
plain values is one item. Non-tensor items travel as ``torch.save`` bytes
(:mod:`treeckpt.formats.torch_dcp.protocol`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from treeckpt.core.box import Box
from treeckpt.core.tree import describe_leaf
from treeckpt.shell.sharded import ADAPTERS
from treeckpt.shell.tensors import local_shards

__all__ = ["flatten_dcp", "set_path", "shards_of"]

Path = tuple[Any, ...]


def _keep_walking(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    if isinstance(value, list):
        return any(isinstance(v, torch.Tensor) or _keep_walking(v) for v in value)
    return False


def flatten_dcp(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """``(flat, mappings)``: dotted FQN -> object, and FQN -> path in ``state_dict``."""
    flat: dict[str, Any] = {}
    mappings: dict[str, Path] = {}

    def walk(path: Path, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk((*path, k), v)
        elif isinstance(value, list) and _keep_walking(value):
            for i, v in enumerate(value):
                walk((*path, i), v)
        else:
            fqn = ".".join(str(p) for p in path)
            flat[fqn] = value
            mappings[fqn] = path

    for k, v in state_dict.items():
        walk((k,), v)
    return flat, mappings


def set_path(root: Any, path: Path, value: Any) -> None:
    """Put ``value`` at ``path`` in ``root``, creating dicts on the way."""
    node = root
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value


def shards_of(fqn: str, obj: torch.Tensor) -> tuple[tuple[int, ...], list[tuple[Box, Any]], bool]:
    """``(global shape, [(global box, local tensor)], distributed)`` of a tensor leaf."""
    rec = describe_leaf(fqn, obj, adapters=ADAPTERS)
    assert hasattr(rec, "shape")
    spec, pairs = local_shards(fqn, obj, rec)  # type: ignore[arg-type]
    return spec.shape, pairs, type(obj) not in (torch.Tensor, torch.nn.Parameter)

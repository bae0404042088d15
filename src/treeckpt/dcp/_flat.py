"""DCP's view of a state dict: flat FQN -> object, tensors' local shards, values as bytes.

DCP flattens nested dicts into dotted keys (``model.layer.weight``) and keeps
a mapping back to the original path so loaded values land where they came
from. Lists are walked only when they hold tensors or dicts; a list or tuple of
plain values is one item. Non-tensor items travel as ``torch.save`` bytes and
are read back with ``torch.load(weights_only=True)``: no code runs from them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from torch.futures import Future

from treeckpt.core.box import Box
from treeckpt.core.tree import describe_leaf
from treeckpt.errors import LoadMismatchError, UnsupportedLeafError
from treeckpt.shell.sharded import ADAPTERS
from treeckpt.shell.tensors import local_shards

__all__ = [
    "commit_read",
    "decode_bytes",
    "done",
    "encode_bytes",
    "flatten_dcp",
    "set_path",
    "shards_of",
    "stored_box",
]

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


def encode_bytes(fqn: str, obj: Any) -> io.BytesIO:
    """A non-tensor item as ``torch.save`` bytes (what DCP storage plugins expect)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def decode_bytes(fqn: str, value: io.BytesIO) -> Any:
    """Read an item written by :func:`encode_bytes` (or by DCP), executing no code."""
    try:
        return torch.load(value, weights_only=True)
    except Exception as exc:
        raise UnsupportedLeafError(
            f"{fqn!r}: the stored value is not plain data loadable with weights_only=True "
            f"(treeckpt never unpickles arbitrary objects): {str(exc).splitlines()[0][:200]}"
        ) from None


def commit_read(planner: Any, item: Any, src: torch.Tensor) -> None:
    """Copy ``src`` (what storage holds for a ``ReadItem``) into the planner's tensor.

    Nothing is cast: a dtype or shape that differs from the destination's is a
    :class:`~treeckpt.LoadMismatchError` naming the FQN.
    """
    target = planner.resolve_tensor(item).detach()
    fqn = item.dest_index.fqn
    if target.dtype != src.dtype or tuple(target.shape) != tuple(src.shape):
        raise LoadMismatchError(
            mismatched=[
                f"{fqn} (checkpoint {src.dtype}{list(src.shape)}, destination "
                f"{target.dtype}{list(target.shape)}; nothing is cast)"
            ]
        )
    with torch.no_grad():
        target.copy_(src)
    planner.commit_tensor(item, target)


def done(value: Any) -> Future[Any]:
    """A future that has ``value`` already (storage plugins' ``read_data`` return one)."""
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def stored_box(item: Any) -> Box:
    """The region of the stored tensor a ``ReadItem`` reads, in global coordinates.

    ``storage_offsets`` are relative to the stored chunk, which starts at
    ``storage_index.offset`` (the origin when the index names no chunk).
    """
    base = tuple(int(o) for o in (item.storage_index.offset or ())) or (0,) * len(item.lengths)
    return Box(
        offsets=tuple(b + int(o) for b, o in zip(base, item.storage_offsets, strict=True)),
        sizes=tuple(int(s) for s in item.lengths),
    )

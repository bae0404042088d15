"""DCP's view of a treeckpt checkpoint, as planners and storage readers expect it.

Every torch tensor appears by its dotted key with its stored chunks; every
other value is a bytes item. Keys follow DCP's flattening: dicts are walked,
lists only when they hold tensors or dicts, and any other container of plain
values is one item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from treeckpt.core.box import Box
from treeckpt.core.dtypes import torch_dtype
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import Manifest
from treeckpt.core.plan import StoredTensor
from treeckpt.core.plan_table import SavePlan
from treeckpt.core.tree import _decode_key as decode_key
from treeckpt.core.tree import build_tree
from treeckpt.errors import LoadMismatchError, UnsupportedLeafError
from treeckpt.shell.load import value_of
from treeckpt.store import layout
from treeckpt.store.backends import Backend
from treeckpt.store.reader import has_dcp_metadata

__all__ = [
    "RAW_BYTES_KEY",
    "TreeckptStorage",
    "is_torch_format",
    "list_paths",
    "metadata_from_plan",
    "metadata_of",
    "value_item",
]

# user_metadata key under which a checkpoint written through a planner lists
# the items whose stored value is the planner's own bytes.
RAW_BYTES_KEY = "treeckpt.dcp.raw_bytes"


@dataclass(frozen=True)
class TreeckptStorage:
    """What a reader keeps of a treeckpt checkpoint (in ``Metadata.storage_data``).

    ``values`` maps each non-tensor item of DCP's view to its node of the
    manifest's tree structure (one leaf, or a list or tuple of plain values).
    """

    manifest: Manifest
    stored: dict[str, StoredTensor]
    values: dict[str, Any]


_DICTS = ("dict", "odict", "ddict")


def _dcp_view(
    manifest: Manifest,
) -> tuple[list[str], dict[str, Any], dict[str, tuple[Any, ...]]]:
    """Tensor FQNs, value items and each item's key path, as DCP's flattening sees the tree.

    Dicts are walked; lists are walked only when they hold tensors or dicts;
    any other container (a list of numbers, a tuple) is one value item. The
    key paths are DCP's ``Metadata.planner_data`` (what ``unflatten_state_dict``
    and torch's planners that rebuild a state dict read).
    """
    tensors: list[str] = []
    values: dict[str, Any] = {}
    paths: dict[str, tuple[Any, ...]] = {}

    def is_tensor(node: Any) -> bool:
        return "leaf" in node and isinstance(manifest.records.get(node["leaf"]), TensorLeaf)

    def keep_walking(node: Any) -> bool:
        if node.get("type") in _DICTS:
            return True
        if node.get("type") == "list":
            return any(
                is_tensor(c) or ("leaf" not in c and keep_walking(c)) for c in node["children"]
            )
        return False

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        fqn = ".".join(str(p) for p in path)
        if "leaf" in node:
            if is_tensor(node) and manifest.records[node["leaf"]].lib == "torch":  # type: ignore[union-attr]
                tensors.append(node["leaf"])
                paths[node["leaf"]] = path
            else:
                values[fqn] = node
                paths[fqn] = path
        elif node.get("type") in _DICTS:
            keys = [decode_key(k) for k in node.get("keys", [])]
            for k, child in zip(keys, node["children"], strict=True):
                walk(child, (*path, k))
        elif node.get("type") == "list" and keep_walking(node):
            for i, child in enumerate(node["children"]):
                walk(child, (*path, i))
        else:
            values[fqn] = node
            paths[fqn] = path

    walk(manifest.structure, ())
    return tensors, values, paths


def list_paths(manifest: Manifest) -> set[tuple[Any, ...]]:
    """The key path of every list of the saved tree that DCP's flattening walks into."""
    found: set[tuple[Any, ...]] = set()

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if "leaf" in node:
            return
        if node.get("type") in _DICTS:
            keys = [decode_key(k) for k in node.get("keys", [])]
            for k, child in zip(keys, node["children"], strict=True):
                walk(child, (*path, k))
        elif node.get("type") == "list":
            found.add(path)
            for i, child in enumerate(node["children"]):
                walk(child, (*path, i))

    walk(manifest.structure, ())
    return found


def metadata_of(manifest: Manifest, stored: dict[str, StoredTensor]) -> Metadata:
    """DCP's view of a treeckpt checkpoint: torch tensors by FQN, everything else bytes."""
    boxes = {fqn: [c.box for c in st.chunks] for fqn, st in stored.items()}
    md, values, paths = _state_dict_metadata(manifest, boxes)
    return Metadata(
        state_dict_metadata=md,
        planner_data=paths,
        storage_data=TreeckptStorage(manifest=manifest, stored=stored, values=values),
    )


def metadata_from_plan(manifest: Manifest, plan: SavePlan) -> Metadata:
    """The view of a save just committed, from its plan: no chunk index is read."""
    boxes: dict[str, list[Box]] = {}
    for rank in range(plan.world):
        for item in plan.items_for(rank):
            boxes.setdefault(item.fqn, []).append(item.chunk)
    md, _, paths = _state_dict_metadata(manifest, boxes)
    return Metadata(state_dict_metadata=md, planner_data=paths)


def _state_dict_metadata(
    manifest: Manifest, boxes: dict[str, list[Box]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[Any, ...]]]:
    tensors, values, paths = _dcp_view(manifest)
    md: dict[str, Any] = {}
    for fqn in tensors:
        rec = manifest.records[fqn]
        assert isinstance(rec, TensorLeaf)
        chunks = [
            ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes))
            for b in boxes.get(fqn, ())
        ]
        md[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=torch_dtype(rec.dtype)),
            size=torch.Size(rec.shape),
            chunks=chunks,
        )
    for fqn in values:
        md[fqn] = BytesStorageMetadata()
    return md, values, paths


def value_item(storage: TreeckptStorage, fqn: str) -> Any:
    """The Python value of a non-tensor item of DCP's view (no pickle is ever loaded)."""
    records = storage.manifest.records
    node = storage.values.get(fqn)
    if node is None:
        raise LoadMismatchError(missing=[fqn])

    def leaf(name: str) -> Any:
        rec = records[name]
        if isinstance(rec, TensorLeaf):
            raise UnsupportedLeafError(
                f"{fqn!r}: holds arrays or tensors inside a tuple or list of values; read it "
                "with treeckpt.load"
            )
        return value_of(name, rec, allow_pickle=False)

    return build_tree(node, leaf)


def is_torch_format(backend: Backend) -> bool:
    """True for a directory torch's DCP wrote: DCP's ``.metadata`` (not treeckpt's marker)
    and no ``manifest.json``."""
    return backend.size(layout.MANIFEST) is None and has_dcp_metadata(backend)

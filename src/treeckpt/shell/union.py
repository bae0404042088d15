"""What a multi-rank save compares across ranks: tree digests and replica digests.

A save stores the union of every rank's tree (``treeckpt.core.merge``).
Gathering every rank's structure and values on each save would cost a
manifest's worth of data per rank, so each rank first sends a digest of its
own: when every digest equals the coordinator's, the coordinator's tree is
the union and nothing more crosses ranks. Only when they differ are the
descriptions gathered and merged (``shell/negotiate.py``), and then only of the
top-level entries that differ: the coordinator sends a digest of each of its
own (``part_digests``), and a rank sends just the entries whose digest is not
the coordinator's (``describe_parts``). A training state whose ranks differ
only in their data loader's entry sends that entry, not the model's and
optimizer's structure.

Plain tensors (not DTensor or ShardedTensor) held by several ranks are
replicas: one rank writes them. Each rank sends an xxh3-128 digest of its
copy's bytes with its chunk index reference, and the coordinator refuses to
commit when the copies differ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xxhash

from treeckpt.core.box import Box
from treeckpt.core.leaves import LeafRecord
from treeckpt.core.merge import TreeDescription
from treeckpt.core.tree import FlatTree, iter_leaf_fqns
from treeckpt.store.manifest import encode_record

__all__ = [
    "describe_parts",
    "describe_tree",
    "is_plain",
    "part_digests",
    "replica_digests",
    "tensor_digest",
    "tree_digest",
]

# Device tensors are hashed through host copies of this many bytes at a time.
_DEVICE_BLOCK = 64 << 20


def describe_tree(flat: FlatTree) -> TreeDescription:
    """This rank's tree as the plain data the coordinator merges."""
    return TreeDescription(structure=flat.structure, records=flat.records)


_DICTS = ("dict", "odict", "ddict")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def part_digests(flat: FlatTree) -> dict[str, str] | None:
    """A digest of each top-level entry (by its key's JSON), or ``None`` if the root is no dict."""
    root = flat.structure
    if root.get("type") not in _DICTS:
        return None
    out = {}
    for raw, child in zip(root["keys"], root["children"], strict=True):
        recs = [encode_record(flat.records[f]) for f in iter_leaf_fqns(child)]
        out[json.dumps(raw)] = xxhash.xxh3_128_hexdigest(_dumps([child, recs]))
    return out


def describe_parts(flat: FlatTree, theirs: Mapping[str, str] | None) -> TreeDescription:
    """This rank's tree, less the top-level entries whose digest ``theirs`` (the coordinator's) has.

    A left-out entry is a ``None`` child of the root, which
    ``treeckpt.core.merge.merge_trees`` reads as the coordinator's entry.
    """
    mine = part_digests(flat)
    root = flat.structure
    if mine is None or theirs is None:
        return describe_tree(flat)
    children: list[Any] = []
    records: dict[str, LeafRecord] = {}
    for raw, child in zip(root["keys"], root["children"], strict=True):
        key = json.dumps(raw)
        if theirs.get(key) == mine[key]:
            children.append(None)
            continue
        children.append(child)
        records.update((f, flat.records[f]) for f in iter_leaf_fqns(child))
    return TreeDescription(structure={**root, "children": children}, records=records)


def tree_digest(flat: FlatTree) -> str:
    """xxh3-128 of the structure and of every leaf record in its stored form.

    Two ranks with equal digests hold the same keys, container types and
    exact values (an accidental match of 128-bit digests is negligible).
    """
    # The structure names every leaf, in the order of the records.
    doc = [flat.structure, [encode_record(rec) for rec in flat.records.values()]]
    return xxhash.xxh3_128_hexdigest(json.dumps(doc, separators=(",", ":")).encode())


def is_plain(obj: Any) -> bool:
    """A leaf held whole by each rank that has it: a plain tensor, a numpy array or scalar."""
    return type(obj) in (torch.Tensor, torch.nn.Parameter) or isinstance(
        obj, np.ndarray | np.generic
    )


def tensor_digest(data: Any) -> str:
    """xxh3-128 of a tensor's or array's bytes in row-major order (device tensors in blocks)."""
    h = xxhash.xxh3_128()
    if isinstance(data, torch.Tensor):
        t = data.detach().resolve_conj().resolve_neg()
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        if t.device.type == "cpu":
            h.update(flat.numpy().data)
        else:
            for start in range(0, flat.numel(), _DEVICE_BLOCK):
                h.update(flat[start : start + _DEVICE_BLOCK].cpu().numpy().data)
    else:
        h.update(np.ascontiguousarray(np.asarray(data)).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def replica_digests(
    local: Mapping[str, list[tuple[Box, Any]]], fqns: tuple[str, ...], known: Mapping[str, str]
) -> dict[str, str]:
    """The digest of each plain tensor ``fqns`` names: from ``known``, else from ``local``."""
    return {f: known[f] if f in known else tensor_digest(local[f][0][1]) for f in fqns}

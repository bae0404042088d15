"""The tree a multi-rank save stores: the union of every rank's tree.

Each rank flattens its own state. Most keys are the same on every rank (a
model, an optimizer, a step counter), but some exist on one rank only: a
data loader saves its position under ``dataloader.dp_rank_<r>`` on rank r.
The checkpoint stores the union of the ranks' trees, so that no rank's state
is dropped, and records which ranks held each key that not every rank held.

The union is refused when the ranks contradict each other, because storing
one rank's version would silently lose the others':

- the same path is a leaf on one rank and a container on another, or
  containers of different kinds (a dict and a list, two namedtuple types, a
  list of another length);
- the same FQN is a tensor on one rank and a value on another, or tensors of
  different dtypes, shapes or libraries;
- the same FQN holds values that differ, compared by their exact stored form
  (type and bits: ``1``, ``True`` and ``1.0`` differ, ``nan`` equals ``nan``,
  ``0.0`` and ``-0.0`` differ);
- two different paths render to the same FQN on different ranks.

Dict-like containers merge key by key (the coordinator's keys first, in its
order, then each other rank's new keys in rank order); every other container
must have the same shape on every rank holding it.

Plain (not sharded) tensors saved from several ranks are written by one of
them; :func:`replica_conflicts` finds those whose bytes differ between ranks,
from per-rank content digests.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf
from treeckpt.core.tree import PathEntry, render_fqn
from treeckpt.errors import RankConflictError

__all__ = [
    "MergedTree",
    "TreeDescription",
    "exact_key",
    "merge_trees",
    "replica_conflicts",
]

Node = dict[str, Any]
_DICTS = ("dict", "odict", "ddict")
_MAX_SHOWN = 5  # conflicts named in one error; the rest are counted
_PER_RANK_HINT = (
    'save per-rank state under per-rank keys (e.g. f"rng.rank_{rank}") or make it equal '
    "on every rank"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeDescription:
    """One rank's tree as plain data: its structure record and its leaf records."""

    structure: Node
    records: dict[str, LeafRecord]


@dataclass(frozen=True, slots=True, kw_only=True)
class MergedTree:
    """The union of every rank's tree.

    ``holders`` maps each FQN that not every rank held to the ranks that did
    (sorted); an FQN every rank held is absent from it.
    """

    structure: Node
    records: dict[str, LeafRecord]
    holders: dict[str, tuple[int, ...]]


def exact_key(rec: LeafRecord) -> Hashable:
    """A key equal for two records exactly when their stored forms are equal.

    Mirrors the manifest encoding: the value's type is part of it, floats
    compare by their IEEE-754 bits.
    """
    if isinstance(rec, TensorLeaf):
        return ("tensor", rec.lib, rec.dtype, rec.shape)
    if isinstance(rec, PickleLeaf):
        return ("pickle", rec.data)
    v = rec.value
    if isinstance(v, float):
        return ("float", struct.pack(">d", v))
    return (type(v).__name__, v)


def merge_trees(trees: Sequence[TreeDescription]) -> MergedTree:
    """The union of ``trees`` (``trees[r]`` is rank r's), or an error naming every conflict.

    Ranks passing the very same description object are merged once, so the
    common case (every rank alike) costs one walk of one tree.

    Raises:
        RankConflictError: the ranks' trees contradict each other (see the
            module docstring); each conflict names its path or FQN and the ranks.
    """
    if not trees:
        raise ValueError("merge_trees needs at least one tree")
    groups: dict[int, tuple[TreeDescription, list[int]]] = {}
    for rank, tree in enumerate(trees):
        groups.setdefault(id(tree), (tree, []))[1].append(rank)
    parts = [(tuple(ranks), tree) for tree, ranks in groups.values()]
    merger = _Merger(len(trees))
    structure = merger.node([(ranks, t.structure) for ranks, t in parts], ())
    records = merger.records(parts)
    if merger.conflicts:
        shown = merger.conflicts[:_MAX_SHOWN]
        more = len(merger.conflicts) - len(shown)
        text = "; ".join(shown) + (f"; and {more} more" if more else "")
        raise RankConflictError(f"the ranks' trees contradict each other: {text}")
    return MergedTree(structure=structure, records=records, holders=merger.holders)


def _ranks(ranks: Sequence[int]) -> str:
    ordered = sorted(ranks)
    return f"rank {ordered[0]}" if len(ordered) == 1 else "ranks " + ", ".join(map(str, ordered))


def _describe_node(node: Node) -> str:
    if "leaf" in node:
        return "a leaf"
    kind = node.get("type")
    if kind in ("namedtuple", "dataclass"):
        text = f"{kind} {node.get('name')}({', '.join(map(str, node.get('fields', [])))})"
    elif kind in ("list", "tuple", "deque"):
        text = f"{kind} of {len(node.get('children', []))}"
        if kind == "deque":
            text += f" (maxlen {node.get('maxlen')})"
    elif kind == "ddict":
        text = f"defaultdict({node.get('factory')})"
    else:
        text = str(kind)
    return text + (" from state_dict()" if node.get("stateful") else "")


def _header(node: Node) -> Hashable:
    """What must be equal at one path on every rank (leaf vs container, its kind and shape)."""
    if "leaf" in node:
        return ("leaf",)
    kind = node.get("type")
    extra = tuple(sorted((k, repr(v)) for k, v in node.items() if k not in ("children", "keys")))
    if kind in _DICTS:
        return (kind, extra)
    return (kind, extra, len(node.get("children", [])))


def _key_id(raw: Any) -> Hashable:
    return ("int", raw["int"]) if isinstance(raw, dict) else ("str", raw)


def _key_entry(raw: Any) -> PathEntry:
    return int(raw["int"]) if isinstance(raw, dict) else raw


def _describe_record(rec: LeafRecord) -> str:
    if isinstance(rec, TensorLeaf):
        return f"{rec.lib} tensor {rec.dtype}{list(rec.shape)}"
    if isinstance(rec, PickleLeaf):
        return f"pickled object of {len(rec.data)} bytes"
    v = rec.value
    if isinstance(v, str | bytes) and len(v) > 40:
        return f"{type(v).__name__} of length {len(v)}"
    return f"{type(v).__name__} {v!r}"


class _Merger:
    def __init__(self, world: int) -> None:
        self.world = world
        self.conflicts: list[str] = []
        self.holders: dict[str, tuple[int, ...]] = {}
        self.leaf_ranks: dict[str, tuple[int, ...]] = {}
        self.paths: dict[str, tuple[PathEntry, ...]] = {}

    def node(self, parts: list[tuple[tuple[int, ...], Node]], path: tuple[PathEntry, ...]) -> Node:
        first = parts[0][1]
        if len(parts) == 1:
            self._leaves(first, parts[0][0], path)
            return first
        headers: dict[Hashable, list[int]] = {}
        for ranks, n in parts:
            headers.setdefault(_header(n), []).extend(ranks)
        if len(headers) > 1:
            by_desc: dict[str, list[int]] = {}
            for ranks, n in parts:
                by_desc.setdefault(_describe_node(n), []).extend(ranks)
            sides = "; ".join(f"{_ranks(r)}: {d}" for d, r in by_desc.items())
            where = render_fqn(path) or "<root>"
            self.conflicts.append(f"{where!r} is not the same kind of node on every rank ({sides})")
            return first
        ranks_here = tuple(sorted(r for ranks, _ in parts for r in ranks))
        if "leaf" in first:
            self._leaf(first["leaf"], ranks_here, path)
            return first
        kind = first["type"]
        out: Node = {k: v for k, v in first.items() if k not in ("children", "keys")}
        if kind in _DICTS:
            order: dict[Hashable, tuple[Any, list[tuple[tuple[int, ...], Node]]]] = {}
            for ranks, n in parts:
                for raw, child in zip(n["keys"], n["children"], strict=True):
                    order.setdefault(_key_id(raw), (raw, []))[1].append((ranks, child))
            out["keys"] = [raw for raw, _ in order.values()]
            out["children"] = [
                self.node(kids, (*path, _key_entry(raw))) for raw, kids in order.values()
            ]
            return out
        entries = first.get("fields") or range(len(first["children"]))
        out["children"] = [
            self.node([(ranks, n["children"][i]) for ranks, n in parts], (*path, entry))
            for i, entry in enumerate(entries)
        ]
        return out

    def _leaves(self, node: Node, ranks: tuple[int, ...], path: tuple[PathEntry, ...]) -> None:
        """Every leaf below ``node``, which only ``ranks`` hold (alike)."""
        if "leaf" in node:
            self._leaf(node["leaf"], tuple(sorted(ranks)), path)
            return
        kind = node.get("type")
        if kind in _DICTS:
            entries: Sequence[PathEntry] = [_key_entry(k) for k in node.get("keys", [])]
        else:
            entries = node.get("fields") or range(len(node.get("children", [])))
        for entry, child in zip(entries, node.get("children", []), strict=True):
            self._leaves(child, ranks, (*path, entry))

    def _leaf(self, fqn: str, ranks: tuple[int, ...], path: tuple[PathEntry, ...]) -> None:
        seen = self.paths.get(fqn)
        if seen is not None:
            other = self.leaf_ranks[fqn]
            self.conflicts.append(
                f"two paths render to the FQN {fqn!r}: {_access(seen)} on {_ranks(other)} and "
                f"{_access(path)} on {_ranks(ranks)}; rename one of the keys"
            )
            return
        self.paths[fqn] = path
        self.leaf_ranks[fqn] = ranks
        if len(ranks) != self.world:
            self.holders[fqn] = ranks

    def records(
        self, parts: list[tuple[tuple[int, ...], TreeDescription]]
    ) -> dict[str, LeafRecord]:
        """Each FQN's record, checked equal on every rank holding it (first holder's order)."""
        out: dict[str, LeafRecord] = {}
        if len(parts) == 1:
            return dict(parts[0][1].records)
        found: dict[str, dict[Hashable, tuple[LeafRecord, list[int]]]] = {}
        for ranks, t in parts:
            for fqn, rec in t.records.items():
                found.setdefault(fqn, {}).setdefault(exact_key(rec), (rec, []))[1].extend(ranks)
        ordered = {fqn: found[fqn] for fqn in self.paths if fqn in found}
        for fqn, variants in ordered.items():
            first = next(iter(variants.values()))[0]
            out[fqn] = first
            if len(variants) > 1:
                self.conflicts.append(_record_conflict(fqn, list(variants.values())))
        return out


def _access(path: Sequence[PathEntry]) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def _record_conflict(fqn: str, variants: list[tuple[LeafRecord, list[int]]]) -> str:
    sides = "; ".join(f"{_ranks(r)}: {_describe_record(rec)}" for rec, r in variants)
    tensors = [isinstance(rec, TensorLeaf) for rec, _ in variants]
    if all(tensors):
        return f"{fqn!r} is a tensor of different dtypes or shapes on different ranks ({sides})"
    if any(tensors):
        return f"{fqn!r} is a tensor on some ranks and a value on others ({sides})"
    return f"{fqn!r} holds different values on different ranks ({sides}); {_PER_RANK_HINT}"


def replica_conflicts(digests: Sequence[Mapping[str, str]]) -> list[str]:
    """The plain tensors whose content differs between the ranks holding them, described.

    ``digests[r]`` maps each plain (not sharded) tensor of rank r to a digest
    of its bytes. An empty list means every copy of each tensor is alike.
    """
    seen: dict[str, dict[str, list[int]]] = {}
    for rank, d in enumerate(digests):
        for fqn, digest in d.items():
            seen.setdefault(fqn, {}).setdefault(digest, []).append(rank)
    out = []
    for fqn, variants in seen.items():
        if len(variants) > 1:
            sides = " vs ".join(_ranks(r) for r in variants.values())
            out.append(
                f"{fqn!r}: a plain tensor saved from several ranks with different bytes "
                f"({sides}); only one copy would be stored: {_PER_RANK_HINT}, or save it "
                "as a DTensor"
            )
    return out

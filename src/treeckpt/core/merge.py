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
  (type and bits: ``1``, ``True`` and ``1.0`` differ, ``0.0`` and ``-0.0``
  differ, a ``nan`` equals a ``nan`` of the same bits);
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
    records: Mapping[str, LeafRecord]


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

    A rank's tree may leave out top-level entries it has exactly like rank 0:
    when both roots are dict-like, a child of ``trees[r]``'s root may be
    ``None``, standing for ``trees[0]``'s child under the same key (with
    ``trees[0]``'s records; ``trees[r].records`` then needs only the records
    of the children it gives). Ranks passing the very same node object with
    the same records (or leaving an entry out) are merged once, so the cost
    grows with the parts that differ, not with the number of ranks.

    Raises:
        RankConflictError: the ranks' trees contradict each other (see the
            module docstring); each conflict names its path or FQN and the ranks.
        ValueError: ``trees`` is empty, or a ``None`` child stands for nothing.
    """
    if not trees:
        raise ValueError("merge_trees needs at least one tree")
    groups: dict[int, tuple[TreeDescription, list[int]]] = {}
    for rank, tree in enumerate(trees):
        groups.setdefault(id(tree), (tree, []))[1].append(rank)
    merger = _Merger(len(trees), trees[0])
    structure = merger.node(
        [(tuple(ranks), t.structure, t.records) for t, ranks in groups.values()], ()
    )
    if merger.conflicts:
        shown = merger.conflicts[:_MAX_SHOWN]
        more = len(merger.conflicts) - len(shown)
        text = "; ".join(shown) + (f"; and {more} more" if more else "")
        raise RankConflictError(f"the ranks' trees contradict each other: {text}")
    return MergedTree(structure=structure, records=merger.records, holders=merger.holders)


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
    if isinstance(v, float) and v != v:  # nans differ only in their bits
        return f"float nan (bits {struct.pack('>d', v).hex()})"
    return f"{type(v).__name__} {v!r}"


Records = Mapping[str, LeafRecord]
Part = tuple[tuple[int, ...], Node, Records]  # ranks holding a node alike, with their records


class _Merger:
    def __init__(self, world: int, base: TreeDescription) -> None:
        self.world = world
        self.base = base
        self.conflicts: list[str] = []
        self.holders: dict[str, tuple[int, ...]] = {}
        self.records: dict[str, LeafRecord] = {}
        self.leaf_ranks: dict[str, tuple[int, ...]] = {}
        self.paths: dict[str, tuple[PathEntry, ...]] = {}

    def node(self, parts: list[Part], path: tuple[PathEntry, ...]) -> Node:
        if len(parts) > 1:  # ranks passing the very same node and records are merged once
            same: dict[tuple[int, int], tuple[list[int], Node, Records]] = {}
            for ranks, n, recs in parts:
                same.setdefault((id(n), id(recs)), ([], n, recs))[0].extend(ranks)
            parts = [(tuple(sorted(ranks)), n, recs) for ranks, n, recs in same.values()]
        first = parts[0][1]
        if len(parts) == 1:
            self._leaves(first, parts[0][0], parts[0][2], path)
            return first
        headers: dict[Hashable, list[int]] = {}
        for ranks, n, _ in parts:
            headers.setdefault(_header(n), []).extend(ranks)
        if len(headers) > 1:
            by_desc: dict[str, list[int]] = {}
            for ranks, n, _ in parts:
                by_desc.setdefault(_describe_node(n), []).extend(ranks)
            sides = "; ".join(f"{_ranks(r)}: {d}" for d, r in by_desc.items())
            where = render_fqn(path) or "<root>"
            self.conflicts.append(f"{where!r} is not the same kind of node on every rank ({sides})")
            return first
        if "leaf" in first:
            self._leaf(first["leaf"], parts, path)
            return first
        kind = first["type"]
        out: Node = {k: v for k, v in first.items() if k not in ("children", "keys")}
        if kind in _DICTS:
            order: dict[Hashable, tuple[Any, list[Part]]] = {}
            for ranks, n, recs in parts:
                for raw, child in zip(n["keys"], n["children"], strict=True):
                    got = self._child(raw, child, recs, path)
                    order.setdefault(_key_id(raw), (raw, []))[1].append((ranks, *got))
            out["keys"] = [raw for raw, _ in order.values()]
            out["children"] = [
                self.node(kids, (*path, _key_entry(raw))) for raw, kids in order.values()
            ]
            return out
        entries = first.get("fields") or range(len(first["children"]))
        out["children"] = [
            self.node([(ranks, n["children"][i], recs) for ranks, n, recs in parts], (*path, e))
            for i, e in enumerate(entries)
        ]
        return out

    def _child(self, raw: Any, child: Any, recs: Records, path: tuple[PathEntry, ...]) -> Any:
        """A dict child with its records; ``None`` at the root stands for rank 0's child."""
        if child is not None:
            return child, recs
        root = self.base.structure
        if path or root.get("type") not in _DICTS:
            raise ValueError(f"{render_fqn(path) or '<root>'!r}: a left-out child below the root")
        for k, c in zip(root["keys"], root["children"], strict=True):
            if _key_id(k) == _key_id(raw) and c is not None:
                return c, self.base.records
        raise ValueError(f"{_key_entry(raw)!r}: a left-out child that rank 0 does not have")

    def _leaves(
        self, node: Node, ranks: tuple[int, ...], recs: Records, path: tuple[PathEntry, ...]
    ) -> None:
        """Every leaf below ``node``, which only ``ranks`` hold, alike, with records ``recs``."""
        if "leaf" in node:
            self._leaf(node["leaf"], [(ranks, node, recs)], path)
            return
        kind = node.get("type")
        if kind in _DICTS:
            for raw, child in zip(node.get("keys", []), node.get("children", []), strict=True):
                kid, kid_recs = self._child(raw, child, recs, path)
                self._leaves(kid, ranks, kid_recs, (*path, _key_entry(raw)))
            return
        entries = node.get("fields") or range(len(node.get("children", [])))
        for entry, child in zip(entries, node.get("children", []), strict=True):
            self._leaves(child, ranks, recs, (*path, entry))

    def _leaf(self, fqn: str, parts: list[Part], path: tuple[PathEntry, ...]) -> None:
        ranks = tuple(sorted(r for rs, _, _ in parts for r in rs))
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
        # By object first (ranks often share record objects), then by exact form.
        objects: dict[int, tuple[LeafRecord, list[int]]] = {}
        for rs, _, recs in parts:
            rec = recs[fqn]
            objects.setdefault(id(rec), (rec, []))[1].extend(rs)
        if len(objects) == 1:
            self.records[fqn] = next(iter(objects.values()))[0]
            return
        variants: dict[Hashable, tuple[LeafRecord, list[int]]] = {}
        for rec, held in objects.values():
            variants.setdefault(exact_key(rec), (rec, []))[1].extend(held)
        self.records[fqn] = next(iter(variants.values()))[0]
        if len(variants) > 1:
            self.conflicts.append(_record_conflict(fqn, list(variants.values())))


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

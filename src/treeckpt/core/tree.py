"""Flatten training state into FQN-keyed leaves, and build it back.

The traversal uses optree's node registry one level at a time (dicts are
read in insertion order directly, not through optree's process-wide
``dict_insertion_ordered`` switch, so flattening is thread-safe) and adds what training state needs on top: ``Stateful``
objects at any depth are replaced by their state dicts, dataclasses are
traversed field by field, and the structure is recorded as plain JSON-able
data so a tree can be rebuilt with no template and no pickle.

Structure record nodes (the ``tree`` field of the manifest)::

    {"leaf": FQN}
    {"type": "dict" | "odict" | "ddict", "keys": [KEY...], "children": [...], "factory": NAME}
    {"type": "namespace", "keys": [STR...], "children": [...]}   (argparse.Namespace)
    {"type": "list" | "tuple" | "deque", "children": [...], "maxlen": INT | None}
    {"type": "namedtuple" | "dataclass", "name": NAME, "fields": [STR...], "children": [...]}

KEY is a JSON string for a str key and ``{"int": "DIGITS"}`` for an int key.
Any node may carry ``"stateful": true``: it was produced by ``state_dict()``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import keyword
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optree
import torch

from treeckpt.core.adapter import PLAIN_TENSOR, TensorAdapter, adapter_for
from treeckpt.core.dtypes import numpy_dtype_code, torch_dtype_code
from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf, TensorLib, ValueLeaf
from treeckpt.core.values import NUMPY_VALUE_TYPES, copy_value, encode_value, is_plain_value
from treeckpt.errors import FQNCollisionError, ManifestError, UnsupportedLeafError

__all__ = [
    "FlatTree",
    "PathEntry",
    "StatefulRef",
    "UnstorableFactory",
    "build_tree",
    "describe_leaf",
    "find_subtree",
    "flatten_tree",
    "is_stateful",
    "iter_leaf_fqns",
    "map_tree",
    "node_items",
    "render_fqn",
    "update_tree",
]

NAMESPACE = "treeckpt"
PathEntry = str | int
Path = tuple[PathEntry, ...]
Node = dict[str, Any]

# defaultdict factories that can be named in a manifest without importing code.
_FACTORIES: dict[str, Callable[[], Any] | None] = {
    "list": list,
    "dict": dict,
    "set": set,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "tuple": tuple,
    "none": None,
}
_FACTORY_NAMES = {f: n for n, f in _FACTORIES.items() if f is not None}
_MAX_DEPTH = 200
_MAX_INT_DIGITS = 4300  # what the manifest reader accepts (Python's str/int limit)
_INT_LIMIT = 10**_MAX_INT_DIGITS


@dataclass(frozen=True, slots=True, kw_only=True)
class UnstorableFactory:
    """Stands for a ``defaultdict`` factory outside the closed list in a structure record.

    Flattening refuses such a factory at once unless ``allow_pickle=True``
    (the mode that also flattens load templates, whose structure is never
    written); then this marker takes the factory's place, and writing the
    manifest refuses it with ``message``.
    """

    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StatefulRef:
    """A ``Stateful`` object found in the tree at ``path``."""

    path: Path
    obj: Any

    @property
    def fqn(self) -> str:
        return render_fqn(self.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class FlatTree:
    """The result of :func:`flatten_tree`.

    ``leaves`` maps FQN to the leaf object (tensors are referenced, not copied),
    in traversal order; ``records`` describes each leaf as plain data;
    ``structure`` is the JSON-able structure record; ``statefuls`` lists the
    Stateful objects met, outermost first.
    """

    leaves: dict[str, Any]
    records: dict[str, LeafRecord]
    structure: Node
    statefuls: tuple[StatefulRef, ...]
    paths: dict[str, Path]


def is_stateful(obj: Any) -> bool:
    """True for objects with callable ``state_dict`` and ``load_state_dict`` (not classes)."""
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def render_fqn(path: Sequence[PathEntry]) -> str:
    """The dotted name users see: ``("model", "layers", 0, "weight")`` -> ``model.layers.0.weight``."""
    return ".".join(str(p) for p in path)


def _render_access(path: Sequence[PathEntry]) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def _is_tensor_like(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor | np.ndarray | np.generic)


def describe_leaf(
    fqn: str, obj: Any, *, allow_pickle: bool = False, adapters: Sequence[TensorAdapter] = ()
) -> LeafRecord:
    """Classify one leaf, or refuse it with an error naming the FQN and the type.

    A tensor is described by the first of ``adapters`` that matches it
    (``core/adapter.py``), any other ``torch.Tensor`` as a plain tensor.
    """
    adapter = adapter_for(obj, adapters)
    if adapter is None and isinstance(obj, torch.Tensor):
        adapter = PLAIN_TENSOR
    if adapter is not None:
        g = adapter.describe(fqn, obj)
        code = torch_dtype_code(g.dtype)
        if code is None:
            raise UnsupportedLeafError(f"{fqn!r}: torch dtype {g.dtype} is not supported")
        return TensorLeaf(
            lib="torch",
            dtype=code,
            shape=g.shape,
            requires_grad=g.requires_grad,
            parameter=isinstance(obj, torch.nn.Parameter),
        )
    if type(obj) in NUMPY_VALUE_TYPES:  # numpy scalars that are not numbers
        encode_value(obj, fqn)
        return ValueLeaf(value=obj)
    if isinstance(obj, np.ndarray | np.generic):
        code = numpy_dtype_code(obj.dtype)
        if code is None:
            raise UnsupportedLeafError(
                f"{fqn!r}: numpy dtype {obj.dtype} is not supported (use a native-endian "
                "numeric or bool dtype)"
            )
        lib: TensorLib = "numpy-scalar" if isinstance(obj, np.generic) else "numpy"
        return TensorLeaf(lib=lib, dtype=code, shape=tuple(int(s) for s in np.shape(obj)))
    if type(obj) is int and abs(obj) >= _INT_LIMIT:
        raise UnsupportedLeafError(
            f"{fqn!r}: an int of more than {_MAX_INT_DIGITS} digits cannot be stored; "
            "store it as bytes or a str"
        )
    if obj is None or type(obj) in (bool, int, float, str, bytes):
        return ValueLeaf(value=obj)
    if is_plain_value(obj):
        try:
            encode_value(obj, fqn)  # refuses, naming the FQN, what it cannot store exactly
        except UnsupportedLeafError:
            if not allow_pickle:
                raise
        else:
            return ValueLeaf(value=copy_value(obj))  # a snapshot: async saves encode it later
    if allow_pickle:
        try:
            return PickleLeaf(data=pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            raise UnsupportedLeafError(
                f"{fqn!r}: cannot pickle {type(obj).__qualname__}: {exc}"
            ) from exc
    raise UnsupportedLeafError(
        f"{fqn!r}: cannot store a {type(obj).__module__}.{type(obj).__qualname__} without pickle; "
        "convert it to tensors and plain values, give it state_dict()/load_state_dict(), "
        "or pass allow_pickle=True to save and load"
    )


class _Flattener:
    def __init__(self, allow_pickle: bool, adapters: Sequence[TensorAdapter]) -> None:
        self.allow_pickle = allow_pickle
        self.adapters = adapters
        self.leaves: dict[str, Any] = {}
        self.records: dict[str, LeafRecord] = {}
        self.paths: dict[str, Path] = {}
        self.statefuls: list[StatefulRef] = []

    def walk(self, obj: Any, path: Path) -> Node:
        if len(path) > _MAX_DEPTH:
            raise UnsupportedLeafError(
                f"{render_fqn(path)!r}: tree deeper than {_MAX_DEPTH} levels"
            )
        if is_stateful(obj) and not _is_tensor_like(obj):
            self.statefuls.append(StatefulRef(path=path, obj=obj))
            state = obj.state_dict()
            if is_stateful(state) and not _is_tensor_like(state):
                raise UnsupportedLeafError(
                    f"{render_fqn(path) or '<root>'!r}: state_dict() of {type(obj).__qualname__} "
                    "returned another Stateful object; it must return its state (a dict)"
                )
            inner = self.walk(state, path)
            return {**inner, "stateful": True}
        kind = _container_kind(obj)
        if kind is None or adapter_for(obj, self.adapters) is not None:
            return self.leaf(obj, path)
        children, entries, extra = _children(obj, kind, path)
        if kind == "ddict" and extra["factory"] is None:
            extra["factory"] = self.unstorable_factory(obj, path)
        node: Node = {"type": kind, **extra}
        node["children"] = [
            self.walk(c, (*path, e)) for c, e in zip(children, entries, strict=True)
        ]
        return node

    def unstorable_factory(self, obj: Any, path: Path) -> UnstorableFactory:
        f = obj.default_factory
        name = getattr(f, "__qualname__", None) or type(f).__qualname__
        message = (
            f"{render_fqn(path) or '<root>'!r}: the factory {name} of a defaultdict cannot be "
            "stored (only list, dict, set, int, float, str, bool, tuple or None can); "
            "convert it to a dict or use one of those"
        )
        if not self.allow_pickle:
            raise UnsupportedLeafError(message)
        return UnstorableFactory(message=message)

    def leaf(self, obj: Any, path: Path) -> Node:
        fqn = render_fqn(path)
        if fqn in self.paths:
            raise FQNCollisionError(
                f"two paths render to the FQN {fqn!r}: {_render_access(self.paths[fqn])} and "
                f"{_render_access(path)}; rename one of the keys"
            )
        self.records[fqn] = describe_leaf(
            fqn, obj, allow_pickle=self.allow_pickle, adapters=self.adapters
        )
        self.leaves[fqn] = obj
        self.paths[fqn] = path
        return {"leaf": fqn}


def flatten_tree(
    tree: Any, *, allow_pickle: bool = False, adapters: Sequence[TensorAdapter] = ()
) -> FlatTree:
    """Flatten ``tree`` into FQN-keyed leaves plus a pickle-free structure record.

    ``adapters``: the tensor types to describe (``shell.sharded.ADAPTERS``
    for a save or load; without them, every ``torch.Tensor`` is described by
    its own dtype and shape, which for the sharded types of torch are global).

    Raises:
        UnsupportedLeafError: a leaf (named by FQN) cannot be stored.
        FQNCollisionError: two paths render to the same FQN (both are named).
    """
    f = _Flattener(allow_pickle, adapters)
    structure = f.walk(tree, ())
    return FlatTree(
        leaves=f.leaves,
        records=f.records,
        structure=structure,
        statefuls=tuple(f.statefuls),
        paths=f.paths,
    )


def _container_kind(obj: Any) -> str | None:
    if isinstance(obj, torch.Tensor | np.ndarray | np.generic):
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return "dataclass"
    if optree.is_namedtuple_instance(obj):
        return "namedtuple"
    # Exact types only: optree and build_tree know just these. A subclass
    # (torch.Size, a user's dict subclass) is a leaf, refused unless pickled.
    return _CONTAINER_KINDS.get(type(obj))


_CONTAINER_KINDS: dict[type, str] = {
    collections.defaultdict: "ddict",
    collections.OrderedDict: "odict",
    dict: "dict",
    list: "list",
    tuple: "tuple",
    collections.deque: "deque",
    argparse.Namespace: "namespace",
}


def _check_key(key: Any, path: Path) -> PathEntry:
    if type(key) is str or type(key) is int:
        return key
    raise UnsupportedLeafError(
        f"{render_fqn(path) or '<root>'!r}: dict key {key!r} of type {type(key).__qualname__} is not "
        "supported; keys must be str or int"
    )


def _children(obj: Any, kind: str, path: Path) -> tuple[list[Any], list[PathEntry], Node]:
    if kind == "dataclass":
        names = [f.name for f in dataclasses.fields(obj)]
        return (
            [getattr(obj, n) for n in names],
            list(names),
            {
                "name": type(obj).__name__,
                "fields": names,
            },
        )
    if kind in ("dict", "odict", "ddict", "namespace"):
        # Insertion order, read directly: optree's dict_insertion_ordered is a
        # process-wide switch, unsafe while another thread flattens.
        src = vars(obj) if kind == "namespace" else obj
        keys = [_check_key(k, path) for k in src]
        if kind == "namespace" and not all(type(k) is str for k in keys):
            raise UnsupportedLeafError(
                f"{render_fqn(path) or '<root>'!r}: an argparse.Namespace with a non-str attribute"
            )
        children = [src[k] for k in keys]
        extra: Node = {"keys": [_encode_key(k) for k in keys]}
        if kind == "ddict":
            f = obj.default_factory
            try:
                extra["factory"] = "none" if f is None else _FACTORY_NAMES.get(f)
            except TypeError:  # an unhashable callable
                extra["factory"] = None
        return children, keys, extra
    children = list(
        optree.tree_flatten_one_level(obj, none_is_leaf=True, namespace=NAMESPACE).children
    )
    if kind == "namedtuple":
        fields = list(type(obj)._fields)
        return children, fields, {"name": type(obj).__name__, "fields": fields}
    if kind == "deque":
        return children, list(range(len(children))), {"maxlen": obj.maxlen}
    return children, list(range(len(children))), {}


def _encode_key(key: PathEntry) -> Any:
    return key if isinstance(key, str) else {"int": str(key)}


def _decode_key(raw: Any) -> PathEntry:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and set(raw) == {"int"} and isinstance(raw["int"], str):
        if not re.fullmatch(r"-?[0-9]{1,4300}", raw["int"]):
            raise ManifestError(f"bad int key in tree structure: {raw['int'][:40]!r}")
        return int(raw["int"])
    raise ManifestError(f"bad key in tree structure: {str(raw)[:60]!r}")


# ---------------------------------------------------------------- rebuilding


def build_tree(structure: Node, leaf: Callable[[str], Any]) -> Any:
    """Build a tree from a structure record, asking ``leaf(fqn)`` for each leaf.

    The structure is untrusted input (it comes from a manifest): every node is
    checked, and only the closed set of container types above is built.
    Namedtuples and dataclasses come back as freshly made types with the
    recorded name and fields (no code is imported). Raises ManifestError.
    """
    return _build(structure, leaf, 0, {})


def _build(node: Any, leaf: Callable[[str], Any], depth: int, types: dict[Any, Any]) -> Any:
    if depth > _MAX_DEPTH:
        raise ManifestError(f"tree structure deeper than {_MAX_DEPTH} levels")
    if not isinstance(node, dict):
        raise ManifestError(f"tree structure node is not an object: {str(node)[:60]!r}")
    if "leaf" in node:
        if not isinstance(node["leaf"], str):
            raise ManifestError("tree structure leaf name is not a string")
        return leaf(node["leaf"])
    kind = node.get("type")
    raw_children = node.get("children")
    if not isinstance(raw_children, list):
        raise ManifestError(f"tree structure node of type {kind!r} has no children list")
    children = [_build(c, leaf, depth + 1, types) for c in raw_children]
    if kind in ("dict", "odict", "ddict", "namespace"):
        keys = node.get("keys")
        if not isinstance(keys, list) or len(keys) != len(children):
            raise ManifestError(
                f"tree structure {kind} node has {len(children)} children but bad keys"
            )
        items = [(_decode_key(k), c) for k, c in zip(keys, children, strict=True)]
        if len(dict(items)) != len(items):
            raise ManifestError(f"tree structure {kind} node has a repeated key")
        if kind == "dict":
            return dict(items)
        if kind == "odict":
            return collections.OrderedDict(items)
        if kind == "namespace":
            if not all(isinstance(k, str) for k, _ in items):
                raise ManifestError("tree structure namespace node has a non-string key")
            return argparse.Namespace(**{str(k): v for k, v in items})
        factory = node.get("factory", "none")
        if not isinstance(factory, str) or factory not in _FACTORIES:
            raise ManifestError(
                f"tree structure defaultdict factory {str(factory)[:40]!r} is not allowed"
            )
        return collections.defaultdict(_FACTORIES[factory], items)
    if kind == "list":
        return children
    if kind == "tuple":
        return tuple(children)
    if kind == "deque":
        maxlen = node.get("maxlen")
        if maxlen is not None and (type(maxlen) is not int or maxlen < 0 or maxlen < len(children)):
            raise ManifestError("tree structure deque has a bad maxlen")
        return collections.deque(children, maxlen=maxlen)
    if kind in ("namedtuple", "dataclass"):
        name, fields = node.get("name"), node.get("fields")
        if (
            not isinstance(name, str)
            or not isinstance(fields, list)
            or len(fields) != len(children)
            or not all(isinstance(f, str) and _is_identifier(f) for f in [name, *fields])
            or len(set(fields)) != len(fields)
            # namedtuple() refuses field names with a leading underscore.
            or (kind == "namedtuple" and any(f.startswith("_") for f in fields))
        ):
            raise ManifestError(f"tree structure {kind} node has a bad name or fields")
        key = (kind, name, tuple(fields))
        if key not in types:
            if kind == "namedtuple":
                types[key] = collections.namedtuple(name, fields)
            else:
                types[key] = dataclasses.make_dataclass(name, fields)
        return types[key](*children)
    raise ManifestError(f"tree structure node has unknown type {str(kind)[:40]!r}")


def _is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("__")


def node_items(node: Node) -> list[tuple[PathEntry, Node]]:
    """The (key, child) pairs of a dict-like structure node, keys decoded; ``[]`` for others."""
    if node.get("type") not in ("dict", "odict", "ddict", "namespace"):
        return []
    return [
        (_decode_key(k), c)
        for k, c in zip(node.get("keys", []), node.get("children", []), strict=False)
    ]


def find_subtree(structure: Node, path: Sequence[PathEntry]) -> Node | None:
    """The structure node at ``path`` (a Stateful's position), or ``None``."""
    node = structure
    for entry in path:
        if "leaf" in node:
            return None
        kind = node.get("type")
        children = node.get("children", [])
        if kind in ("dict", "odict", "ddict", "namespace"):
            keys = [k for k, _ in node_items(node)]
            idx = next(
                (i for i, k in enumerate(keys) if k == entry and type(k) is type(entry)), None
            )
        elif kind in ("namedtuple", "dataclass"):
            fields = node.get("fields", [])
            idx = fields.index(entry) if entry in fields else None
        else:
            idx = entry if isinstance(entry, int) and 0 <= entry < len(children) else None
        if idx is None:
            return None
        node = children[idx]
    return node


def iter_leaf_fqns(structure: Node) -> list[str]:
    """Every leaf FQN of a structure record, in order."""
    out: list[str] = []
    stack = [structure]
    while stack:
        node = stack.pop()
        if "leaf" in node:
            out.append(node["leaf"])
        else:
            stack.extend(reversed(node.get("children", [])))
    return out


def map_tree(
    tree: Any,
    leaf: Callable[[str, Any], Any],
    stateful: Callable[[StatefulRef], Any],
) -> Any:
    """Rebuild ``tree`` with its own container types, mapping leaves and Statefuls.

    Traverses exactly like :func:`flatten_tree`. ``leaf(fqn, obj)`` gives the
    new leaf; ``stateful(ref)`` is called for each Stateful object (outermost
    only; its subtree is not traversed) and gives what stands in its place.
    """
    return _rebuild(tree, (), leaf, stateful, in_place=False)


def update_tree(
    tree: Any,
    leaf: Callable[[str, Any], Any],
    stateful: Callable[[StatefulRef], Any],
) -> Any:
    """Put new leaves into ``tree`` in place; returns the root (itself unless immutable).

    Traverses exactly like :func:`flatten_tree`. ``leaf(fqn, obj)`` gives
    each new leaf and ``stateful(ref)`` handles each Stateful object (it
    loads its state; its subtree is not traversed). A mutable container
    (dict, OrderedDict, defaultdict, list, deque, argparse.Namespace, a
    dataclass that is not frozen) keeps its identity: an entry is assigned
    only when the new leaf is another object. An immutable one (tuple, namedtuple, frozen
    dataclass) with a changed child is rebuilt, and its mutable parent
    holds the new one.
    """
    return _rebuild(tree, (), leaf, stateful, in_place=True)


def _rebuild(
    obj: Any,
    path: Path,
    leaf: Callable[[str, Any], Any],
    stateful: Callable[[StatefulRef], Any],
    *,
    in_place: bool,
) -> Any:
    """The one traversal of :func:`map_tree` and :func:`update_tree`.

    ``in_place`` is the rebuild policy: assign the changed children into the
    container where it is mutable (:func:`_update_node`), or make a new
    container every time (:func:`_new_node`).
    """
    if is_stateful(obj) and not _is_tensor_like(obj):
        return stateful(StatefulRef(path=path, obj=obj))
    kind = _container_kind(obj)
    if kind is None:
        return leaf(render_fqn(path), obj)
    children, entries, _ = _children(obj, kind, path)
    new = [
        _rebuild(c, (*path, e), leaf, stateful, in_place=in_place)
        for c, e in zip(children, entries, strict=True)
    ]
    if in_place:
        return _update_node(obj, kind, children, entries, new)
    return _new_node(obj, kind, entries, new)


def _new_node(obj: Any, kind: str, entries: list[PathEntry], new: list[Any]) -> Any:
    """A new container of ``obj``'s own type holding ``new``."""
    if kind == "dataclass":
        fields = dataclasses.fields(obj)
        init = {f.name: v for f, v in zip(fields, new, strict=True) if f.init}
        out = dataclasses.replace(obj, **init)
        for f, v in zip(fields, new, strict=True):
            if not f.init:
                object.__setattr__(out, f.name, v)
        return out
    if kind == "dict":
        return dict(zip(entries, new, strict=True))
    if kind == "odict":
        return collections.OrderedDict(zip(entries, new, strict=True))
    if kind == "ddict":
        return collections.defaultdict(obj.default_factory, zip(entries, new, strict=True))
    if kind == "namespace":
        return argparse.Namespace(**{str(k): v for k, v in zip(entries, new, strict=True)})
    one = optree.tree_flatten_one_level(obj, none_is_leaf=True, namespace=NAMESPACE)
    return one.unflatten_func(one.metadata, new)


def _update_node(
    obj: Any, kind: str, children: list[Any], entries: list[PathEntry], new: list[Any]
) -> Any:
    """``obj`` with ``new`` assigned where a child changed; an immutable one is
    rebuilt by :func:`_new_node`."""
    changed = [i for i, (c, n) in enumerate(zip(children, new, strict=True)) if c is not n]
    if not changed:
        return obj
    if kind in ("dict", "odict", "ddict", "list"):
        for i in changed:
            obj[entries[i]] = new[i]
        return obj
    if kind == "deque":
        obj.clear()
        obj.extend(new)
        return obj
    if kind == "namespace":
        for i in changed:
            setattr(obj, str(entries[i]), new[i])
        return obj
    if kind == "dataclass" and not type(obj).__dataclass_params__.frozen:
        fields = dataclasses.fields(obj)
        for i in changed:
            setattr(obj, fields[i].name, new[i])
        return obj
    return _new_node(obj, kind, entries, new)

"""core/tree.py: flattening, FQNs, structure records, Statefuls and map_tree."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import decimal
import json
import math
import re
import struct
from typing import Any, NamedTuple

import numpy as np
import optree
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from treeckpt.core.leaves import PickleLeaf, TensorLeaf, ValueLeaf
from treeckpt.core.tree import (
    FlatTree,
    StatefulRef,
    UnstorableFactory,
    build_tree,
    describe_leaf,
    find_subtree,
    flatten_tree,
    iter_leaf_fqns,
    map_tree,
    render_fqn,
)
from treeckpt.errors import (
    CheckpointError,
    FQNCollisionError,
    ManifestError,
    UnsupportedLeafError,
)
from treeckpt.testing import assert_same_tree
from treeckpt.testing.strategies import (
    ExamplePoint,
    ExamplePrivate,
    ExampleState,
    plain_values,
    trees,
)


def _get(tree: Any, path: tuple[str | int, ...]) -> Any:
    for entry in path:
        if isinstance(tree, dict):
            tree = tree[entry]
        elif isinstance(entry, str):
            tree = getattr(tree, entry)
        else:
            tree = tree[entry]
    return tree


def _rebuild(flat: FlatTree) -> Any:
    """Build from the structure record after a JSON round trip, as a manifest reader would."""
    structure = json.loads(json.dumps(flat.structure, allow_nan=False))
    return build_tree(structure, flat.leaves.__getitem__)


def _check_record(record: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor | np.ndarray | np.generic):
        assert isinstance(record, TensorLeaf)
        if isinstance(obj, torch.Tensor):
            assert (record.lib, record.shape) == ("torch", tuple(obj.shape))
            assert record.dtype == str(obj.dtype).removeprefix("torch.")
        else:
            lib = "numpy-scalar" if isinstance(obj, np.generic) else "numpy"
            assert (record.lib, record.shape, record.dtype) == (lib, np.shape(obj), obj.dtype.name)
    else:
        assert isinstance(record, ValueLeaf)
        assert type(record.value) is type(obj)
        if isinstance(obj, float):
            assert struct.pack("<d", record.value) == struct.pack("<d", obj)
        else:
            assert record.value == obj


# ------------------------------------------------------------------ round trips


@given(trees())
@example({"a": {"b": 1}, "a.c": 2})  # a dot in a key is fine while nothing collides
@example({"": {"": 1.0}, 0: [None]})
@example(collections.OrderedDict([(2, -0.0), ("b", math.nan), (1, math.inf)]))
@example({10**30: b"\x00", -5: "ünï©ødé"})
@example([(), [], {}, collections.OrderedDict(), ExamplePoint(x=(), y={})])
@example(collections.deque([1, 2], maxlen=2))
def test_flatten_build_round_trip(tree: Any) -> None:
    flat = flatten_tree(tree)
    rebuilt = _rebuild(flat)
    assert_same_tree(rebuilt, tree)
    assert list(flat.leaves) == list(flat.records) == list(flat.paths)
    assert iter_leaf_fqns(flat.structure) == list(flat.leaves)
    for fqn, path in flat.paths.items():
        assert render_fqn(path) == fqn
        obj = _get(tree, path)
        assert flat.leaves[fqn] is obj
        assert find_subtree(flat.structure, path) == {"leaf": fqn}
        _check_record(flat.records[fqn], obj)
    assert flat.statefuls == ()


@given(trees())
def test_map_tree_rebuilds_the_users_own_types(tree: Any) -> None:
    seen: list[str] = []

    def leaf(fqn: str, obj: Any) -> Any:
        seen.append(fqn)
        return obj

    out = map_tree(tree, leaf, lambda ref: ref.obj)
    assert_same_tree(out, tree, strict_types=True)
    assert seen == list(flatten_tree(tree).leaves)


@given(trees(plain_values()))
def test_map_tree_maps_leaves(tree: Any) -> None:
    out = map_tree(tree, lambda fqn, obj: ("mapped", fqn), lambda ref: ref.obj)
    flat = flatten_tree(out)
    for fqn in flat.leaves:
        # Each leaf became a ("mapped", fqn) tuple, flattened one level deeper.
        assert fqn.endswith((".0", ".1")) or fqn in ("0", "1")
    assert all(
        _get(out, path) == ("mapped", render_fqn(path))
        for path in flatten_tree(tree).paths.values()
    )


def test_flatten_orders_dicts_by_insertion_and_keeps_key_types() -> None:
    tree = {"b": 1, 2: 2, "a": 3, 1: 4}
    flat = flatten_tree(tree)
    assert list(flat.leaves) == ["b", "2", "a", "1"]
    assert flat.structure["keys"] == ["b", {"int": "2"}, "a", {"int": "1"}]
    assert list(_rebuild(flat)) == ["b", 2, "a", 1]


def test_root_leaf_and_empty_root() -> None:
    flat = flatten_tree(5)
    assert flat.structure == {"leaf": ""}
    assert _rebuild(flat) == 5
    assert _rebuild(flatten_tree({})) == {}


def test_dataclass_with_private_and_non_init_fields() -> None:
    obj = ExamplePrivate(_cache=[1], visible=2)
    obj.derived = torch.ones(2)
    flat = flatten_tree({"d": obj})
    assert list(flat.leaves) == ["d._cache.0", "d.visible", "d.derived"]
    rebuilt = _rebuild(flat)["d"]
    assert type(rebuilt).__name__ == "ExamplePrivate"
    assert_same_tree(rebuilt, obj)
    mapped = map_tree({"d": obj}, lambda f, o: o, lambda r: r.obj)["d"]
    assert type(mapped) is ExamplePrivate and mapped.derived is obj.derived


def test_rebuilt_namedtuples_share_one_class_per_record() -> None:
    tree = [ExamplePoint(1, 2), ExamplePoint(3, 4)]
    a, b = _rebuild(flatten_tree(tree))
    assert type(a) is type(b)
    assert type(a) is not ExamplePoint
    assert a._fields == ("x", "y") and a == (1, 2)


# ------------------------------------------------------------------ collisions


@pytest.mark.parametrize(
    ("tree", "first", "second"),
    [
        ({"a.b": 1, "a": {"b": 2}}, "['a.b']", "['a']['b']"),
        ({"a": {"b": 2}, "a.b": 1}, "['a']['b']", "['a.b']"),
        ({"0": 1, 0: 2}, "['0']", "[0]"),
        ({"x": [1], "x.0": 2}, "['x'][0]", "['x.0']"),
        ({"m": ExamplePoint(1, 2), "m.x": 3}, "['m']['x']", "['m.x']"),
    ],
)
def test_fqn_collisions_name_both_paths(tree: Any, first: str, second: str) -> None:
    with pytest.raises(FQNCollisionError) as info:
        flatten_tree(tree)
    msg = str(info.value)
    assert first in msg and second in msg
    assert msg.index(first) < msg.index(second)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------ unsupported leaves


class Opaque:
    pass


@pytest.mark.parametrize(
    ("leaf", "type_name"),
    [
        (object(), "builtins.object"),
        (range(3), "builtins.range"),
        (lambda: 0, "function"),
        (Opaque(), "Opaque"),
        (decimal.Decimal(1), "decimal.Decimal"),
        (np.array(["a"]), "numpy dtype <U1"),
        (np.array([1.0], dtype=">f8"), "numpy dtype >f8"),
        (np.array([None], dtype=object), "numpy dtype object"),
    ],
)
def test_unsupported_leaves_name_fqn_and_type(leaf: Any, type_name: str) -> None:
    with pytest.raises(UnsupportedLeafError) as info:
        flatten_tree({"model": {"extra": [leaf]}})
    msg = str(info.value)
    assert "'model.extra.0'" in msg
    assert type_name in msg
    assert isinstance(info.value, TypeError)


class ConfigDict(dict[str, Any]):
    pass


class RowList(list[Any]):
    pass


class RowTuple(tuple[Any, ...]):
    pass


class SortedDict(collections.OrderedDict[str, Any]):
    pass


@pytest.mark.parametrize(
    ("leaf", "type_name"),
    [
        (RowTuple((2, 3)), "RowTuple"),
        (ConfigDict(a=1), "ConfigDict"),
        (RowList([1]), "RowList"),
        (SortedDict(a=1), "SortedDict"),
    ],
)
def test_container_subclasses_are_leaves(leaf: Any, type_name: str) -> None:
    """Subclasses of dict/list/tuple are not silently flattened as their base (nor crash optree)."""
    with pytest.raises(
        UnsupportedLeafError, match=rf"'cfg': cannot store a .*{type_name} without pickle"
    ):
        flatten_tree({"cfg": leaf})
    with pytest.raises(UnsupportedLeafError, match=rf"'cfg'.*{type_name}"):
        map_tree({"cfg": leaf}, lambda fqn, o: describe_leaf(fqn, o), lambda r: r.obj)
    flat = flatten_tree({"cfg": leaf}, allow_pickle=True)
    assert isinstance(flat.records["cfg"], PickleLeaf)
    assert map_tree({"cfg": leaf}, lambda f, o: o, lambda r: r.obj)["cfg"] is leaf


def test_ints_beyond_the_readers_digit_limit_are_refused() -> None:
    edge = -(10**4300 - 1)  # 4300 digits: the largest the manifest reader accepts
    assert describe_leaf("x", edge) == ValueLeaf(value=edge)
    for too_big in (10**4300, -(10**4300), 10**5000):
        with pytest.raises(
            UnsupportedLeafError, match=r"'opt\.x': an int of more than 4300 digits"
        ):
            flatten_tree({"opt": {"x": too_big}})


@pytest.mark.parametrize("key", [(1, 2), 1.5, True, b"k", None])
def test_unsupported_dict_keys_name_the_dict(key: Any) -> None:
    with pytest.raises(UnsupportedLeafError, match=r"'opt\.state': dict key .* of type"):
        flatten_tree({"opt": {"state": {key: 1}}})


def test_unsupported_tensors() -> None:
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(UnsupportedLeafError, match=r"'w': tensor layout torch.sparse_coo"):
        flatten_tree({"w": sparse})
    for dtype in (torch.bits8, getattr(torch, "uint4", torch.bits16)):
        with pytest.raises(
            UnsupportedLeafError, match=rf"'w': torch dtype {dtype} is not supported"
        ):
            describe_leaf("w", torch.empty(2, dtype=dtype))


def test_allow_pickle_accepts_what_pickle_can_store() -> None:
    flat = flatten_tree({"o": Opaque(), "r": range(3), "s": {3, 1}}, allow_pickle=True)
    assert all(isinstance(flat.records[k], PickleLeaf) for k in ("o", "r"))
    assert isinstance(flat.records["s"], ValueLeaf)  # typed values are never pickled
    # ... unless they hold something only pickle can store (and the caller allows it)
    assert isinstance(
        flatten_tree({"s": {1, Opaque()}}, allow_pickle=True).records["s"], PickleLeaf
    )
    assert isinstance(
        flatten_tree({"t": torch.ones(1)}, allow_pickle=True).records["t"], TensorLeaf
    )
    with pytest.raises(UnsupportedLeafError, match=r"'f': cannot pickle function"):
        flatten_tree({"f": lambda: 0}, allow_pickle=True)
    # Keys are structure, not leaves: pickling does not make a tuple key storable.
    with pytest.raises(UnsupportedLeafError, match="dict key"):
        flatten_tree({"d": {(1, 2): 3}}, allow_pickle=True)


# ------------------------------------------------------------------ Statefuls


class Counter:
    """A user Stateful with int keys, a nested list and a float."""

    def __init__(self) -> None:
        self.count = 0
        self.history: list[float] = []

    def state_dict(self) -> dict[str | int, Any]:
        return {"count": self.count, "history": list(self.history), 7: "seven"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.history = list(state["history"])


def _training_state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(4, 2)).sum().backward()
    opt.step()
    counter = Counter()
    counter.count, counter.history = 3, [0.5, math.nan]
    return {"run": {"model": model, "optim": opt}, "extras": [counter, {"step": 10}]}


def test_statefuls_are_expanded_at_depth_and_recorded() -> None:
    state = _training_state()
    flat = flatten_tree(state)
    assert [s.path for s in flat.statefuls] == [("run", "model"), ("run", "optim"), ("extras", 0)]
    assert [s.fqn for s in flat.statefuls] == ["run.model", "run.optim", "extras.0"]
    assert flat.statefuls[0].obj is state["run"]["model"]
    for ref in flat.statefuls:
        node = find_subtree(flat.structure, ref.path)
        assert node is not None and node.get("stateful") is True
    assert "run.model.0.weight" in flat.leaves
    weight = state["run"]["model"][0].weight
    assert flat.leaves["run.model.0.weight"].data_ptr() == weight.data_ptr()  # not copied
    assert "run.optim.state.0.exp_avg" in flat.leaves
    assert flat.leaves["run.optim.param_groups.0.lr"] == 0.01
    assert flat.leaves["extras.0.7"] == "seven"
    assert find_subtree(flat.structure, ("extras", 1, "step")) == {"leaf": "extras.1.step"}
    assert find_subtree(flat.structure, ("extras", 5)) is None
    assert find_subtree(flat.structure, ("run", "nope")) is None
    assert find_subtree(flat.structure, ("extras", 1, "step", "deeper")) is None


def test_stateful_state_dicts_rebuild_and_load_without_a_template() -> None:
    state = _training_state()
    flat = flatten_tree(state)
    rebuilt = _rebuild(flat)
    fresh_model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=0.5)
    fresh_model.load_state_dict(rebuilt["run"]["model"])
    fresh_opt.load_state_dict(rebuilt["run"]["optim"])
    assert fresh_opt.param_groups[0]["lr"] == 0.01
    assert_same_tree(fresh_opt.state_dict(), state["run"]["optim"].state_dict())
    fresh_counter = Counter()
    fresh_counter.load_state_dict(rebuilt["extras"][0])
    assert fresh_counter.count == 3 and math.isnan(fresh_counter.history[1])


def test_map_tree_hands_statefuls_to_the_callback_without_traversing() -> None:
    state = _training_state()
    refs: list[StatefulRef] = []
    leaves: list[str] = []

    def on_stateful(ref: StatefulRef) -> Any:
        refs.append(ref)
        return "replaced"

    def on_leaf(fqn: str, obj: Any) -> Any:
        leaves.append(fqn)
        return obj

    out = map_tree(state, on_leaf, on_stateful)
    assert [r.fqn for r in refs] == ["run.model", "run.optim", "extras.0"]
    assert out == {
        "run": {"model": "replaced", "optim": "replaced"},
        "extras": ["replaced", {"step": 10}],
    }
    assert leaves == ["extras.1.step"]


def test_tensors_and_classes_are_not_statefuls() -> None:
    class WithMethods(torch.Tensor):
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, s: Any) -> None:
            pass

    t = torch.ones(2).as_subclass(WithMethods)
    flat = flatten_tree({"t": t, "cls": None})
    assert flat.statefuls == ()
    with pytest.raises(UnsupportedLeafError, match="'c'"):
        flatten_tree({"c": torch.nn.Linear})  # a class with those methods is not Stateful


# ------------------------------------------------------------------ malformed structure records


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": "x"}
    for _ in range(depth):
        node = {"type": "list", "children": [node]}
    return node


GOOD_NT = {"type": "namedtuple", "name": "P", "fields": ["a"], "children": [{"leaf": "a"}]}


@pytest.mark.parametrize(
    "node",
    [
        pytest.param([], id="not-an-object"),
        pytest.param({"leaf": 3}, id="leaf-not-str"),
        pytest.param({"type": "set", "children": []}, id="unknown-type"),
        pytest.param({"type": "module", "children": []}, id="class-path-like-type"),
        pytest.param({"type": ["dict"], "children": []}, id="unhashable-type"),
        pytest.param({"type": "list"}, id="no-children"),
        pytest.param({"type": "list", "children": {}}, id="children-not-list"),
        pytest.param({"type": "list", "children": [5]}, id="child-not-object"),
        pytest.param({"type": "dict", "children": [{"leaf": "a"}]}, id="no-keys"),
        pytest.param(
            {"type": "dict", "keys": ["a", "b"], "children": [{"leaf": "a"}]}, id="key-count"
        ),
        pytest.param({"type": "dict", "keys": [1], "children": [{"leaf": "a"}]}, id="raw-int-key"),
        pytest.param(
            {"type": "dict", "keys": [{"int": 1}], "children": [{"leaf": "a"}]},
            id="int-key-not-str",
        ),
        pytest.param(
            {"type": "dict", "keys": [{"int": "1e3"}], "children": [{"leaf": "a"}]},
            id="int-key-not-digits",
        ),
        pytest.param(
            {"type": "dict", "keys": [{"int": "1" * 5000}], "children": [{"leaf": "a"}]},
            id="int-key-huge",
        ),
        pytest.param(
            {"type": "dict", "keys": [{"int": "1", "x": 2}], "children": [{"leaf": "a"}]},
            id="int-key-extra",
        ),
        pytest.param({"type": "dict", "keys": [None], "children": [{"leaf": "a"}]}, id="key-null"),
        pytest.param(
            {"type": "dict", "keys": ["a", "a"], "children": [{"leaf": "a"}, {"leaf": "b"}]},
            id="repeated-key",
        ),
        pytest.param(
            {
                "type": "odict",
                "keys": [{"int": "1"}, {"int": "01"}],
                "children": [{"leaf": "a"}, {"leaf": "b"}],
            },
            id="repeated-int-key",
        ),
        pytest.param(
            {"type": "ddict", "factory": "os.system", "keys": [], "children": []}, id="factory-name"
        ),
        pytest.param(
            {"type": "ddict", "factory": ["list"], "keys": [], "children": []},
            id="factory-unhashable",
        ),
        pytest.param(
            {"type": "ddict", "factory": None, "keys": [], "children": []}, id="factory-null"
        ),
        pytest.param({"type": "deque", "maxlen": -1, "children": []}, id="deque-negative"),
        pytest.param({"type": "deque", "maxlen": True, "children": []}, id="deque-bool"),
        pytest.param({"type": "deque", "maxlen": "2", "children": []}, id="deque-str"),
        pytest.param(
            {"type": "deque", "maxlen": 1, "children": [{"leaf": "a"}, {"leaf": "b"}]},
            id="deque-overfull",
        ),
        pytest.param({**GOOD_NT, "fields": ["a b"]}, id="field-space"),
        pytest.param({**GOOD_NT, "fields": ["1a"]}, id="field-digit"),
        pytest.param({**GOOD_NT, "fields": ["class"]}, id="field-keyword"),
        pytest.param({**GOOD_NT, "fields": ["__class__"]}, id="field-dunder"),
        pytest.param({**GOOD_NT, "fields": ["_a"]}, id="namedtuple-field-underscore"),
        pytest.param({**GOOD_NT, "fields": [3]}, id="field-not-str"),
        pytest.param({**GOOD_NT, "fields": "a"}, id="fields-not-list"),
        pytest.param({**GOOD_NT, "fields": ["a", "b"]}, id="field-count"),
        pytest.param({**GOOD_NT, "name": "os.path"}, id="name-dotted"),
        pytest.param({**GOOD_NT, "name": "__builtins__"}, id="name-dunder"),
        pytest.param({**GOOD_NT, "name": None}, id="name-null"),
        pytest.param(
            {**GOOD_NT, "fields": ["a", "a"], "children": [{"leaf": "a"}, {"leaf": "b"}]},
            id="field-repeated",
        ),
        pytest.param(
            {**GOOD_NT, "type": "dataclass", "fields": ["__init__"]}, id="dataclass-dunder"
        ),
        pytest.param({**GOOD_NT, "type": "dataclass", "fields": ["def"]}, id="dataclass-keyword"),
        pytest.param(_nested(201), id="too-deep"),
    ],
)
def test_build_tree_rejects_malformed_records(node: Any) -> None:
    with pytest.raises(ManifestError):
        build_tree(node, lambda fqn: fqn)


def test_build_tree_depth_limit_is_the_flatten_limit() -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    flat = flatten_tree(deep)
    assert _rebuild(flat) == deep
    with pytest.raises(UnsupportedLeafError, match="deeper than 200"):
        flatten_tree([deep])
    assert build_tree(_nested(200), lambda fqn: fqn) is not None


def test_build_tree_makes_dataclasses_with_private_fields() -> None:
    node = {**GOOD_NT, "type": "dataclass", "name": "D", "fields": ["_a"]}
    out: Any = build_tree(node, lambda fqn: fqn)
    assert out._a == "a"
    assert dataclasses.is_dataclass(out)
    assert [f.name for f in dataclasses.fields(out)] == ["_a"]


def test_defaultdict_factories() -> None:
    factories: tuple[Any, ...] = (list, dict, int, set)
    for factory in factories:
        tree = collections.defaultdict(factory, {"k": 1})
        rebuilt = _rebuild(flatten_tree(tree))
        assert rebuilt.default_factory is factory
    assert _rebuild(flatten_tree(collections.defaultdict(None, {"k": 1}))).default_factory is None


class Factory:
    def __call__(self) -> int:
        return 0


def _user_factory() -> int:
    return 0


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: 0, "<lambda>"),
        (_user_factory, "_user_factory"),
        (Factory, "Factory"),
        (Factory(), "Factory"),
        (collections.Counter, "Counter"),
    ],
)
def test_defaultdict_factories_outside_the_list_are_refused(factory: Any, name: str) -> None:
    tree = {"opt": {"state": collections.defaultdict(factory, {"k": 1})}}
    with pytest.raises(
        UnsupportedLeafError,
        match=rf"^'opt\.state': the factory {re.escape(name)} of a defaultdict cannot be stored "
        r"\(only list, dict, set, int, float, str, bool, tuple or None can\)",
    ):
        flatten_tree(tree)
    # allow_pickle=True also flattens load templates: the refusal waits for the manifest.
    flat = flatten_tree(tree, allow_pickle=True)
    assert isinstance(flat.structure["children"][0]["children"][0]["factory"], UnstorableFactory)
    assert (
        map_tree(tree, lambda f, o: o, lambda r: r.obj)["opt"]["state"].default_factory is factory
    )


# A JSON-shaped fuzzer: whatever a manifest holds, build_tree returns a tree or raises ManifestError.
_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from(["a", "_a", "a b", "class", "list", "1"]),
)


def _json_nodes(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    key = st.one_of(
        _JSON_SCALARS, st.fixed_dictionaries({"int": st.sampled_from(["1", "-2", "x", "01"])})
    )
    return st.one_of(
        st.lists(children, max_size=3),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(
                    [
                        "dict",
                        "odict",
                        "ddict",
                        "list",
                        "tuple",
                        "deque",
                        "namedtuple",
                        "dataclass",
                        "x",
                    ]
                ),
                "children": st.lists(children, max_size=3),
            },
            optional={
                "keys": st.lists(key, max_size=3),
                "factory": _JSON_SCALARS,
                "maxlen": _JSON_SCALARS,
                "name": _JSON_SCALARS,
                "fields": st.lists(_JSON_SCALARS, max_size=3),
                "stateful": _JSON_SCALARS,
            },
        ),
    )


@given(
    st.recursive(
        st.one_of(_JSON_SCALARS, st.builds(lambda s: {"leaf": s}, _JSON_SCALARS)),
        _json_nodes,
        max_leaves=12,
    )
)
@example({"type": "namedtuple", "name": "P", "fields": ["_a"], "children": [{"leaf": "a"}]})
@example({"type": "ddict", "factory": [], "keys": [], "children": []})
def test_build_tree_never_fails_with_another_error(node: Any) -> None:
    with contextlib.suppress(ManifestError):
        build_tree(node, lambda fqn: fqn)


class _NT(NamedTuple):
    a: int


def test_namedtuple_renamed_fields_cannot_be_rebuilt_without_their_class() -> None:
    """namedtuple(rename=True) makes fields like `_1`; the record is refused on build, not crashed."""
    renamed = collections.namedtuple("renamed", ["a", "def"], rename=True)
    flat = flatten_tree({"r": renamed(1, 2)})
    assert list(flat.leaves) == ["r.a", "r._1"]
    with pytest.raises(ManifestError, match="bad name or fields"):
        _rebuild(flat)
    # With its class at hand (restore into a template) it maps fine.
    out = map_tree({"r": renamed(1, 2)}, lambda f, o: o, lambda r: r.obj)
    assert type(out["r"]) is renamed
    assert optree.is_namedtuple_instance(_NT(1))
    assert _rebuild(flatten_tree(_NT(1)))._fields == ("a",)


def test_dataclass_is_flattened_field_by_field_and_mapped_back_into_its_class() -> None:
    flat = flatten_tree({"s": ExampleState(step=3, payload=torch.ones(2))})
    assert list(flat.leaves) == ["s.step", "s.payload"]
    node = flat.structure["children"][0]
    assert (node["type"], node["fields"]) == ("dataclass", ["step", "payload"])
    out = map_tree({"s": ExampleState(step=3, payload=4)}, lambda f, o: (f, o), lambda r: r.obj)
    assert out["s"] == ExampleState(step=("s.step", 3), payload=("s.payload", 4))


def test_stateful_whose_state_dict_returns_a_stateful_is_refused() -> None:
    class Loop:
        def state_dict(self) -> Loop:
            return self

        def load_state_dict(self, sd: object) -> None:
            pass

    with pytest.raises(
        UnsupportedLeafError, match=r"'x': state_dict\(\) of .*Loop returned another Stateful"
    ):
        flatten_tree({"x": Loop()})


def test_flatten_is_thread_safe_with_mixed_key_order() -> None:
    import threading

    tree = {f"k{i}": {"b": 1, "a": 2, 3: 4} for i in range(200)}
    expected = flatten_tree(tree).structure
    results: list[object] = []

    def work() -> None:
        for _ in range(20):
            results.append(flatten_tree(tree).structure)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 80 and all(r == expected for r in results)


def test_namespace_nodes_round_trip_and_are_validated() -> None:
    import argparse

    ns = argparse.Namespace(lr=0.1, **{"odd-name": 2}, sub=argparse.Namespace(w=torch.ones(1)))
    rebuilt = _rebuild(flatten_tree({"args": ns}))["args"]
    assert type(rebuilt) is argparse.Namespace and type(rebuilt.sub) is argparse.Namespace
    assert list(vars(rebuilt)) == ["lr", "odd-name", "sub"]
    node = {"type": "namespace", "keys": ["a"], "children": [{"leaf": "a"}]}
    assert vars(build_tree(node, lambda fqn: 1)) == {"a": 1}
    for bad, match in [
        ({**node, "keys": [{"int": "1"}]}, "namespace node has a non-string key"),
        ({**node, "keys": ["a", "a"], "children": [{"leaf": "a"}, {"leaf": "b"}]}, "repeated"),
        ({**node, "keys": []}, "bad keys"),
    ]:
        with pytest.raises(ManifestError, match=match):
            build_tree(bad, lambda fqn: 1)
    assert find_subtree({"type": "dict", "keys": ["args"], "children": [node]}, ("args", "a")) == {
        "leaf": "a"
    }

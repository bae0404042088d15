"""core/values.py: typed plain values, their records, hostile records, enums, templates."""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import enum
import json
import math
import pathlib
import struct
import zoneinfo
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treeckpt.core.leaves import ValueLeaf
from treeckpt.core.tree import describe_leaf, flatten_tree
from treeckpt.core.values import (
    MAX_DEPTH,
    MAX_ENUM_MEMBERS,
    VALUE_KINDS,
    EnumTypes,
    adopt_value,
    canonical,
    decode_value,
    encode_value,
)
from treeckpt.errors import LoadMismatchError, ManifestError, UnsupportedLeafError


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.IntFlag):
    R = 4
    W = 2


class Color(enum.Enum):
    RED = (255, 0, 0)
    BLUE = (0, 0, 255)


def _nan(bits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(bits))[0]


def values() -> dict[str, Any]:
    """One value of every kind (and the awkward corners of each)."""
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    return {
        "complex": complex(_nan("7ff8000000000abc"), -0.0),
        "complex_inf": complex(math.inf, 1e-310),
        "set": {1, "a", (2, b"x"), -0.0, None},
        "frozenset": frozenset({frozenset({1}), 2.5}),
        "empty_set": set(),
        "counter": collections.Counter({30: 1, 80: 2, "x": -1}),
        "counter_tuple_keys": collections.Counter({(1, 2): 3}),
        "dtype": torch.bfloat16,
        "dtype_f8": torch.float8_e4m3fn,
        "size": torch.Size([2, 0, 3]),
        "size_empty": torch.Size([]),
        "device": torch.device("cuda", 1),
        "device_cpu": torch.device("cpu"),
        "device_meta": torch.device("meta"),
        "pure_posix": pathlib.PurePosixPath("/a//b/../c"),
        "pure_windows": pathlib.PureWindowsPath("C:/Users/x y"),
        "posix": pathlib.PosixPath("rel/path"),
        "datetime": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
        "datetime_utc": dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc),
        "datetime_offset": dt.datetime(
            1999, 12, 31, 23, 59, tzinfo=dt.timezone(dt.timedelta(hours=-3, seconds=1), "X")
        ),
        "datetime_zone": dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=paris),
        "date": dt.date(2020, 2, 29),
        "time": dt.time(23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(minutes=330))),
        "time_naive": dt.time(1, 2),
        "timedelta": dt.timedelta(days=-3, microseconds=7),
        "enum": Mode.TRAIN,
        "int_enum": Level.HIGH,
        "int_flag": Perm.W,
        "enum_tuple_value": Color.BLUE,
        "enum_set": {Mode.TRAIN, Mode.EVAL},
        "np_str": np.str_("h\u00e9 \u2603"),
        "np_bytes": np.bytes_(b"\x00ab"),
        "np_datetime": np.datetime64("2020-01-01T00:00", "10m"),
        "np_datetime_nat": np.datetime64("NaT"),
        "np_timedelta": np.timedelta64(-5, "ns"),
        "np_timedelta_generic": np.timedelta64(3),
    }


def _same(a: Any, b: Any) -> bool:
    """Same type (enums: same class name and member) and same bits, at any depth."""
    if isinstance(a, enum.Enum):
        return (
            isinstance(b, enum.Enum)
            and type(a).__name__ == type(b).__name__
            and a.name == b.name
            and _same(a.value, b.value)
        )
    if type(a) is not type(b):
        return False
    return canonical(encode_value(a)) == canonical(encode_value(b))


@pytest.mark.parametrize(("name", "value"), list(values().items()), ids=list(values()))
def test_record_round_trip_is_exact(name: str, value: Any) -> None:
    rec = encode_value(value, name)
    text = json.dumps(rec, allow_nan=False)
    back = decode_value(json.loads(text), "here")
    assert _same(value, back), (value, back)
    assert canonical(encode_value(back)) == canonical(rec)
    assert describe_leaf(name, value) == ValueLeaf(value=value)


def test_records_spell_the_format() -> None:
    """The records as docs/format.md specifies them."""
    assert encode_value(1 + 2j) == {"kind": "complex", "value": "3ff" + "0" * 13 + "4" + "0" * 15}
    assert encode_value({2, 1}) == {
        "kind": "set",
        "items": [{"kind": "int", "value": "1"}, {"kind": "int", "value": "2"}],
    }
    assert encode_value(collections.Counter({30: 1})) == {
        "kind": "counter",
        "items": [[{"kind": "int", "value": "30"}, {"kind": "int", "value": "1"}]],
    }
    assert encode_value(torch.bfloat16) == {"kind": "torch-dtype", "value": "bfloat16"}
    assert encode_value(torch.Size([2, 3])) == {"kind": "torch-size", "value": [2, 3]}
    assert encode_value(torch.device("cuda:1")) == {
        "kind": "torch-device",
        "type": "cuda",
        "index": 1,
    }
    assert encode_value(pathlib.PureWindowsPath("c:/x")) == {
        "kind": "path",
        "class": "PureWindowsPath",
        "value": "c:\\x",
    }
    assert encode_value(dt.datetime(2024, 1, 2, tzinfo=zoneinfo.ZoneInfo("UTC"))) == {
        "kind": "datetime",
        "value": [2024, 1, 2, 0, 0, 0, 0],
        "fold": 0,
        "tz": {"zone": "UTC"},
    }
    assert encode_value(dt.time(1, tzinfo=dt.timezone(dt.timedelta(hours=1), "CET"))) == {
        "kind": "time",
        "value": [1, 0, 0, 0],
        "fold": 0,
        "tz": {"offset": 3600000000, "name": "CET"},
    }
    assert encode_value(dt.timedelta(days=-1)) == {"kind": "timedelta", "value": [-1, 0, 0]}
    assert encode_value(dt.date(2020, 1, 2)) == {"kind": "date", "value": [2020, 1, 2]}
    assert encode_value(Level.HIGH) == {
        "kind": "enum",
        "class": "Level",
        "base": "IntEnum",
        "member": "HIGH",
        "value": {"kind": "int", "value": "2"},
    }
    assert encode_value(np.str_("a")) == {"kind": "numpy-str", "value": "a"}
    assert encode_value(np.bytes_(b"a")) == {"kind": "numpy-bytes", "value": "YQ=="}
    assert encode_value(np.datetime64(3, "10s")) == {
        "kind": "numpy-datetime64",
        "unit": "s",
        "step": 10,
        "value": "3",
    }
    assert encode_value(np.timedelta64("NaT")) == {
        "kind": "numpy-timedelta64",
        "unit": "generic",
        "step": 1,
        "value": str(-(2**63)),
    }


def test_set_order_is_deterministic() -> None:
    a = {"b", "a", 3, (1, 2), b"z"}
    b = set(reversed(sorted(a, key=repr)))
    assert canonical(encode_value(a)) == canonical(encode_value(b))
    items = [canonical(r) for r in encode_value(a)["items"]]
    assert items == sorted(items)


# ------------------------------------------------------------------ refusals


class Opaque:
    pass


class OtherZone(dt.tzinfo):
    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({1, Opaque()}, r"^'cfg': cannot store a .*Opaque: the elements of a set, Counter, tuple"),
        (collections.Counter({"a": [1]}), r"^'cfg': cannot store a builtins\.list: the elements"),
        (frozenset({(1, torch.ones(1))}), r"^'cfg': cannot store a torch\.Tensor: the elements"),
        ({(1, Mode)}, r"^'cfg': cannot store a enum\.Enum(Meta|Type): the elements"),
        (
            dt.datetime(2024, 1, 1, tzinfo=OtherZone()),
            r"^'cfg': cannot store a datetime\.datetime: time zone .*OtherZone is not a "
            r"datetime\.timezone or zoneinfo\.ZoneInfo",
        ),
        (Perm.R | Perm.W, r"^'cfg': cannot store a .*Perm: enum member .* has no name"),
        (torch.device, r"^'cfg': cannot store a builtins\.type without pickle"),
    ],
)
def test_values_it_cannot_store_exactly_are_refused(value: Any, match: str) -> None:
    with pytest.raises(UnsupportedLeafError, match=match):
        flatten_tree({"cfg": value})


def test_keyless_zones_and_subclasses_are_refused() -> None:
    utc_file = next(
        (pathlib.Path(p) / "UTC" for p in zoneinfo.TZPATH if (pathlib.Path(p) / "UTC").is_file()),
        None,
    )
    if utc_file is not None:
        with open(utc_file, "rb") as f:
            keyless = zoneinfo.ZoneInfo.from_file(f)
        with pytest.raises(UnsupportedLeafError, match=r"^'t': .*not made from a key"):
            describe_leaf("t", dt.datetime(2024, 1, 1, tzinfo=keyless))

    class Stamp(dt.datetime):
        pass

    class Counts(collections.Counter[str]):
        pass

    class MyPath(pathlib.PurePosixPath):
        pass

    for sub in (Stamp(2024, 1, 1), Counts(a=1), MyPath("a")):
        with pytest.raises(
            UnsupportedLeafError, match=rf"^'x': cannot store a .*{type(sub).__name__} without"
        ):
            describe_leaf("x", sub)


def test_nesting_is_bounded() -> None:
    v: Any = 1
    for _ in range(MAX_DEPTH + 2):
        v = frozenset({v})
    with pytest.raises(UnsupportedLeafError, match=rf"'x': .* nest deeper than {MAX_DEPTH}"):
        describe_leaf("x", v)


def test_equal_nans_in_a_set_are_refused() -> None:
    nan = float("nan")
    other = struct.unpack(">d", struct.pack(">d", nan))[0]
    with pytest.raises(UnsupportedLeafError, match="two elements have the same record"):
        encode_value({nan, other}, "x")


# ------------------------------------------------------------ hostile records


def _dec(raw: Any) -> Any:
    return decode_value(raw, "leaf 'x'")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"kind": "complex", "value": "00"}, r"bad complex record \(value\)"),
        ({"kind": "complex", "value": "0" * 31 + "G"}, r"bad complex record"),
        ({"kind": "tuple", "items": []}, r"bad leaf record of kind 'tuple'"),  # not at top level
        ({"kind": "set", "items": "ab"}, r"bad set record \(items\)"),
        (
            {
                "kind": "set",
                "items": [{"kind": "int", "value": "2"}, {"kind": "int", "value": "1"}],
            },
            "not in canonical order",
        ),
        ({"kind": "set", "items": [{"kind": "int", "value": "1"}] * 2}, "not in canonical order"),
        (
            {
                "kind": "set",
                "items": [{"kind": "bool", "value": True}, {"kind": "int", "value": "1"}],
            },
            "holds equal elements",
        ),
        ({"kind": "set", "items": [{"kind": "set", "items": []}]}, r"bad set value"),
        ({"kind": "frozenset", "items": [{"kind": "module", "value": "os"}]}, "kind 'module'"),
        ({"kind": "counter", "items": [[{"kind": "none"}]]}, r"bad counter record \(items\)"),
        ({"kind": "counter", "items": [[{"kind": "none"}, {"kind": "none"}]] * 2}, "key twice"),
        ({"kind": "counter", "items": {"a": 1}}, r"bad counter record \(items\)"),
        ({"kind": "torch-dtype", "value": "float"}, "torch dtype 'float' is not in the table"),
        ({"kind": "torch-dtype", "value": "torch.float32"}, "not in the table"),
        ({"kind": "torch-size", "value": [1, -(2**63) - 1]}, r"bad torch-size record"),
        ({"kind": "torch-size", "value": [1.5]}, r"bad torch-size record"),
        ({"kind": "torch-size", "value": "[1]"}, r"bad torch-size record"),
        ({"kind": "torch-device", "type": "CUDA", "index": 0}, r"bad torch-device record \(type\)"),
        ({"kind": "torch-device", "type": "nosuch", "index": None}, r"bad torch-device \("),
        ({"kind": "torch-device", "type": "cuda", "index": -1}, r"bad torch-device record \(index"),
        ({"kind": "torch-device", "type": "cuda", "index": True}, r"\(index\)"),
        ({"kind": "path", "class": "Path", "value": "/"}, r"bad path record \(class\)"),
        ({"kind": "path", "class": "os.PathLike", "value": "/"}, r"\(class\)"),
        ({"kind": "path", "class": "PurePosixPath", "value": 1}, r"bad path record \(value\)"),
        ({"kind": "path", "class": "WindowsPath", "value": "c:/"}, "cannot be made on this system"),
        (
            {"kind": "datetime", "value": [2024, 13, 1, 0, 0, 0, 0], "fold": 0},
            r"bad datetime value",
        ),
        ({"kind": "datetime", "value": [2024, 1, 1, 0, 0, 0], "fold": 0}, r"bad datetime record"),
        ({"kind": "datetime", "value": [2024, 1, 1, 0, 0, 0, 0], "fold": 2}, r"\(fold\)"),
        ({"kind": "datetime", "value": [2024, 1, 1, 0, 0, 0, 0]}, r"\(fold\)"),
        ({"kind": "datetime", "value": [2024, 1, 1, 0, 0, 0, 0.5], "fold": 0}, r"bad datetime rec"),
        ({"kind": "datetime", "value": [2024, 1, 1, 0, 0, 0, 0], "fold": 0, "tz": {}}, r"\(tz\)"),
        (
            {"kind": "time", "value": [1, 0, 0, 0], "fold": 0, "tz": {"offset": 86400 * 10**6}},
            r"bad time record \(tz offset\)",
        ),
        (
            {"kind": "time", "value": [1, 0, 0, 0], "fold": 0, "tz": {"offset": 0, "name": 3}},
            r"\(tz name\)",
        ),
        (
            {"kind": "time", "value": [1, 0, 0, 0], "fold": 0, "tz": {"zone": "../../etc/passwd"}},
            r"\(tz zone\)",
        ),
        (
            {"kind": "time", "value": [1, 0, 0, 0], "fold": 0, "tz": {"zone": "/etc/localtime"}},
            r"\(tz zone\)",
        ),
        (
            {"kind": "time", "value": [1, 0, 0, 0], "fold": 0, "tz": {"zone": "No/Such_Zone"}},
            "time zone 'No/Such_Zone' is not known",
        ),
        (
            {"kind": "time", "value": [1, 0, 0, 0], "fold": 0, "tz": {"zone": "UTC", "x": 1}},
            r"\(tz\)",
        ),
        ({"kind": "date", "value": [2021, 2, 29]}, "bad date value"),
        ({"kind": "timedelta", "value": [0, 86400, 0]}, r"bad timedelta record"),  # not canonical
        ({"kind": "timedelta", "value": [10**9, 0, 0]}, r"bad timedelta value"),
        (
            {
                "kind": "enum",
                "class": "os.system",
                "base": "Enum",
                "member": "A",
                "value": {"kind": "none"},
            },
            r"bad enum record \(class\)",
        ),
        (
            {
                "kind": "enum",
                "class": "E",
                "base": "object",
                "member": "A",
                "value": {"kind": "none"},
            },
            r"bad enum record \(base\)",
        ),
        (
            {
                "kind": "enum",
                "class": "E",
                "base": "Enum",
                "member": "__init__",
                "value": {"kind": "none"},
            },
            r"bad enum record \(member\)",
        ),
        (
            {
                "kind": "enum",
                "class": "E",
                "base": "Enum",
                "member": "A b",
                "value": {"kind": "none"},
            },
            r"bad enum record \(member\)",
        ),
        (
            {
                "kind": "enum",
                "class": "E",
                "base": "IntEnum",
                "member": "A",
                "value": {"kind": "str", "value": "1"},
            },
            "enum E \\(IntEnum\\) has a value of the wrong",
        ),
        (
            {
                "kind": "enum",
                "class": "E",
                "base": "Enum",
                "member": "A",
                "value": {
                    "kind": "enum",
                    "class": "F",
                    "base": "Enum",
                    "member": "B",
                    "value": {"kind": "none"},
                },
            },
            r"bad enum record \(value holds an enum\)",
        ),
        ({"kind": "enum", "class": "E", "base": "Enum", "member": "A"}, "value record is not"),
        ({"kind": "numpy-str", "value": 1}, r"bad str record"),
        ({"kind": "numpy-bytes", "value": "!!"}, r"bad numpy-bytes value"),
        ({"kind": "numpy-datetime64", "unit": "days", "step": 1, "value": "1"}, r"\(unit\)"),
        ({"kind": "numpy-datetime64", "unit": "s", "step": 0, "value": "1"}, r"\(step\)"),
        ({"kind": "numpy-datetime64", "unit": "generic", "step": 2, "value": "1"}, r"\(step\)"),
        (
            {"kind": "numpy-timedelta64", "unit": "s", "step": 1, "value": str(2**63)},
            r"bad numpy-timedelta64 record \(value\)",
        ),
        ({"kind": "numpy-timedelta64", "unit": "s", "step": 1, "value": 5}, r"\(value\)"),
    ],
)
def test_hostile_value_records_are_rejected(raw: Any, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as info:
        _dec(raw)
    assert str(info.value).startswith("leaf 'x': ")


def test_hostile_nesting_and_sizes_are_bounded() -> None:
    raw: Any = {"kind": "int", "value": "1"}
    for _ in range(MAX_DEPTH + 2):
        raw = {"kind": "frozenset", "items": [raw]}
    with pytest.raises(ManifestError, match=f"nest deeper than {MAX_DEPTH}"):
        _dec(raw)


# ---------------------------------------------------------------------- enums


def _enum_rec(cls: str, member: str, value: int, base: str = "Enum") -> dict[str, Any]:
    return {
        "kind": "enum",
        "class": cls,
        "base": base,
        "member": member,
        "value": {"kind": "int", "value": str(value)},
    }


def test_enum_types_are_made_per_class_over_the_whole_manifest() -> None:
    enums = EnumTypes()
    raws = [
        _enum_rec("Mode", "A", 1),
        _enum_rec("Mode", "B", 2),
        _enum_rec("Mode", "A", 1),
        _enum_rec("Mode", "A", 3),  # another class called Mode: a name with two values
        _enum_rec("Level", "LOW", 1, "IntEnum"),
    ]
    for r in raws:
        decode_value(r, "w", enums)
    enums.build("w")
    a, b, a2, other, low = (decode_value(r, "w", enums) for r in raws)
    assert type(a) is type(b) and a is a2 and a is not b
    assert type(a).__name__ == "Mode" and [m.name for m in type(a)] == ["A", "B"]
    assert type(other) is not type(a) and other.value == 3 and type(other).__name__ == "Mode"
    assert isinstance(low, enum.IntEnum) and low == 1


def test_enum_members_per_manifest_are_bounded() -> None:
    enums = EnumTypes()
    for i in range(MAX_ENUM_MEMBERS):
        decode_value(_enum_rec("E", f"M{i}", i), "w", enums)
    with pytest.raises(ManifestError, match=f"^w: more than {MAX_ENUM_MEMBERS} enum members"):
        decode_value(_enum_rec("E", "LAST", -1), "w", enums)
    enums.build("w")  # one type of 4096 members: linear, not quadratic
    assert len(type(decode_value(_enum_rec("E", "M7", 7), "w", enums))) == MAX_ENUM_MEMBERS


def test_adopt_value_gives_the_templates_members() -> None:
    restored = decode_value(encode_value(Mode.EVAL), "w")
    assert type(restored) is not Mode and type(restored).__name__ == "Mode"
    assert adopt_value("m", restored, Mode.TRAIN) is Mode.EVAL
    assert adopt_value("m", restored, None) is restored
    restored_set = decode_value(encode_value({Mode.EVAL, Mode.TRAIN, 3}), "w")
    got = adopt_value("s", restored_set, {Mode.TRAIN})
    assert got == {Mode.EVAL, Mode.TRAIN, 3} and got is not restored_set
    counter = decode_value(encode_value(collections.Counter({Level.LOW: 2})), "w")
    assert adopt_value("c", counter, collections.Counter({Level.HIGH: 1})) == {Level.LOW: 2}


def test_adopt_value_refuses_a_template_enum_that_differs() -> None:
    class Mode2(enum.Enum):
        TRAIN = "train"
        EVAL = "EVAL"

    class Small(enum.Enum):
        TRAIN = "train"

    restored = decode_value(encode_value(Mode.EVAL), "w")
    with pytest.raises(
        LoadMismatchError, match=r"cfg\.mode \(template enum .*Small has no member 'EVAL'\)"
    ):
        adopt_value("cfg.mode", restored, Small.TRAIN)
    with pytest.raises(
        LoadMismatchError,
        match=r"cfg\.mode \(template .*Mode2\.EVAL = 'EVAL', checkpoint Mode\.EVAL = 'eval'\)",
    ):
        adopt_value("cfg.mode", restored, Mode2.TRAIN)


def test_copies_are_fresh() -> None:
    s = {1, 2}
    c = collections.Counter({"a": frozenset({1})})
    leaf = describe_leaf("s", s)
    assert isinstance(leaf, ValueLeaf) and leaf.value == s and leaf.value is not s
    assert adopt_value("c", c) == c and adopt_value("c", c) is not c


# -------------------------------------------------------------- namespaces


def test_namespace_is_a_container() -> None:
    ns = argparse.Namespace(lr=0.1, w=torch.ones(2), sub=argparse.Namespace(k="v"))
    flat = flatten_tree({"args": ns})
    assert list(flat.records) == ["args.lr", "args.w", "args.sub.k"]
    assert flat.structure["children"][0]["type"] == "namespace"


# ------------------------------------------------------------------ property

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.complex_numbers(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.sampled_from([Mode.TRAIN, Level.LOW, Perm.R, torch.float16, torch.device("cpu")]),
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.timedeltas(),
)
_HASHABLE = st.recursive(
    _SCALARS,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=8,
)
_VALUES = (
    _HASHABLE.map(lambda v: frozenset({v}) if type(v) is tuple else v)  # tuples: containers
    | st.sets(_HASHABLE, max_size=4)
    | st.dictionaries(_HASHABLE, _HASHABLE, max_size=4).map(collections.Counter)
)


@settings(max_examples=60, deadline=None)
@given(_VALUES)
def test_nested_values_round_trip(value: Any) -> None:
    rec = encode_value(value, "v")
    back = decode_value(json.loads(json.dumps(rec)), "w")
    assert canonical(encode_value(back)) == canonical(rec)


# A JSON-shaped fuzzer: whatever a record holds, decode_value returns a value or raises
# ManifestError (never another exception, never a crash).
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.text(max_size=8)
    | st.sampled_from(["", "0" * 16, "f" * 32, "s", "us", "generic", "UTC", "cuda", "A", "Enum"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    ["value", "items", "class", "base", "member", "type", "index", "unit", "step", "fold", "tz"]
)


@st.composite
def _records(draw: st.DrawFn, depth: int = 0) -> Any:
    rec: dict[str, Any] = {"kind": draw(st.sampled_from(sorted(VALUE_KINDS)))}
    for f in draw(st.lists(_FIELDS, max_size=4, unique=True)):
        rec[f] = draw(_JSON)
    if depth < 2 and draw(st.booleans()):
        rec[draw(st.sampled_from(["value", "items"]))] = draw(
            st.lists(_records(depth + 1), max_size=3)
            if draw(st.booleans())
            else _records(depth + 1)
        )
    return rec


@settings(max_examples=300, deadline=None)
@given(_records())
def test_decoding_any_record_returns_or_raises_manifest_error(raw: Any) -> None:
    with contextlib.suppress(ManifestError):
        decode_value(raw, "w")

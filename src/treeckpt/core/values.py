"""Typed plain values: which Python values a value leaf may hold, and their records.

A value leaf is stored as typed data in the manifest, never pickled. Each
type has one closed ``kind`` and a record of plain JSON (integers, strings,
lists, objects); :func:`encode_value` writes it and :func:`decode_value` reads
it back, validating every field (the manifest is untrusted input: bounded
sizes and depths, exact patterns, nothing imported by name). The types, all
matched exactly (a subclass is refused, since it would come back as its
base):

- ``None``, ``bool``, ``int`` (up to 4300 digits), ``float`` and ``complex``
  (bit-exact), ``str``, ``bytes``;
- ``set``, ``frozenset``, ``collections.Counter``, and ``tuple`` inside them
  (a tuple in the tree itself is a container, not a value); their elements
  must be plain values too, recursively (no tensors, lists or dicts), up to
  :data:`MAX_DEPTH` levels. A set's elements are written sorted by their
  canonical record text, so the same set always gives the same manifest;
- ``torch.dtype``, ``torch.Size``, ``torch.device``;
- the four ``pathlib`` classes ``PurePosixPath``, ``PureWindowsPath``,
  ``PosixPath``, ``WindowsPath`` (the class is recorded and comes back);
- ``datetime.datetime``, ``date``, ``time``, ``timedelta``; a time zone is a
  fixed-offset ``datetime.timezone`` (offset and name exact) or a
  ``zoneinfo.ZoneInfo`` made from a key (rebuilt with ``ZoneInfo(key)``);
- ``Enum`` members: class name, base (``Enum``, ``IntEnum``, ``StrEnum``,
  ``Flag``, ``IntFlag``), member name and value. Nothing is imported: a
  restore without template gives members of enum types made on the fly (one
  type per class name, holding the members this checkpoint records), and a
  load into a template gives the template's own members (:func:`adopt_value`);
- numpy scalars of kinds that are not numbers: ``numpy.str_``,
  ``numpy.bytes_``, ``numpy.datetime64`` and ``numpy.timedelta64`` (unit and
  step recorded).

Everything else is refused with :class:`~treeckpt.errors.UnsupportedLeafError`
naming the FQN and the type.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import enum
import itertools
import json
import keyword
import pathlib
import re
import struct
import zoneinfo
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from treeckpt.errors import LoadMismatchError, ManifestError, UnsupportedLeafError

__all__ = [
    "MAX_DEPTH",
    "MAX_ENUM_MEMBERS",
    "NUMPY_VALUE_TYPES",
    "VALUE_KINDS",
    "EnumTypes",
    "adopt_value",
    "canonical",
    "copy_value",
    "decode_value",
    "encode_value",
    "is_plain_value",
]

MAX_DEPTH = 32
MAX_ITEMS = 1 << 20  # elements of one set, Counter or tuple
MAX_ENUM_MEMBERS = 1 << 12  # distinct enum members one manifest may make types for
_MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**_MAX_INT_DIGITS
_I64 = 1 << 63

# torch dtypes a value may name (a closed table: the canonical names).
_TORCH_DTYPE_NAMES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "complex128",
    "complex64",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
]
_TORCH_DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n)
    for n in _TORCH_DTYPE_NAMES
    if isinstance(getattr(torch, n, None), torch.dtype)
}
_TORCH_DTYPE_NAME = {d: n for n, d in _TORCH_DTYPES.items()}

_PATHS: dict[str, type[pathlib.PurePath]] = {
    "PurePosixPath": pathlib.PurePosixPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
    "PosixPath": pathlib.PosixPath,
    "WindowsPath": pathlib.WindowsPath,
}
_PATH_NAME = {c: n for n, c in _PATHS.items()}

# Most specific first: the first base a member's class derives from is recorded.
# (StrEnum is new in Python 3.11; before, a StrEnum record is rebuilt as a str-mixin Enum.)
_STR_ENUM: Any = getattr(enum, "StrEnum", None)
_ENUM_BASES: dict[str, Any] = {
    "IntFlag": enum.IntFlag,
    "Flag": enum.Flag,
    "IntEnum": enum.IntEnum,
    "StrEnum": _STR_ENUM,
    "Enum": enum.Enum,
}

_NP_UNITS = ("Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as", "generic")
_ZONE_KEY = re.compile(r"[A-Za-z0-9_+\-]{1,64}(/[A-Za-z0-9_+\-]{1,64}){0,4}")
_DEVICE_TYPE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_INT_TEXT = re.compile(rf"-?[0-9]{{1,{_MAX_INT_DIGITS}}}")

_SCALARS = (type(None), bool, int, float, str, bytes)


def canonical(record: Any) -> str:
    """The canonical text of a record (the manifest's serialisation rules)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def is_plain_value(obj: Any) -> bool:
    """Whether ``obj``'s type is one a value leaf may hold (its elements are not checked)."""
    t = type(obj)
    return (
        t in _SCALARS
        or t in _VALUE_TYPES
        or isinstance(obj, enum.Enum)
        or t in _PATH_NAME
        or t in _NP_KINDS
    )


# ------------------------------------------------------------------ encoding


def _refuse(fqn: str, obj: Any, why: str) -> UnsupportedLeafError:
    t = type(obj)
    return UnsupportedLeafError(f"{fqn!r}: cannot store a {t.__module__}.{t.__qualname__}: {why}")


def encode_value(
    obj: Any, fqn: str = "", *, _depth: int = 0, _nested: bool = False
) -> dict[str, Any]:
    """The record of a plain value.

    Raises:
        UnsupportedLeafError: ``obj`` (or an element of it) is not a plain
            value; the message names ``fqn`` and the type.
    """
    if _depth > MAX_DEPTH:
        raise _refuse(fqn, obj, f"values nest deeper than {MAX_DEPTH} levels")
    t = type(obj)
    if obj is None:
        return {"kind": "none"}
    if t is bool:
        return {"kind": "bool", "value": obj}
    if t is int:
        if abs(obj) >= _INT_LIMIT:
            raise _refuse(
                fqn,
                obj,
                f"an int of more than {_MAX_INT_DIGITS} digits; store it as bytes or a str",
            )
        return {"kind": "int", "value": str(obj)}
    if t is float:
        return {"kind": "float", "value": struct.pack(">d", obj).hex()}
    if t is str:
        return {"kind": "str", "value": obj}
    if t is bytes:
        return {"kind": "bytes", "value": base64.b64encode(obj).decode()}
    if t is complex:
        return {"kind": "complex", "value": struct.pack(">dd", obj.real, obj.imag).hex()}
    enc = _ENCODERS.get(t)
    if enc is not None:
        return enc(obj, fqn, _depth, _nested)
    if isinstance(obj, enum.Enum):
        return _encode_enum(obj, fqn, _depth)
    if t in _PATH_NAME:
        text = str(obj)
        if t(text) != obj:
            raise _refuse(fqn, obj, "the path does not survive str()")
        return {"kind": "path", "class": _PATH_NAME[t], "value": text}
    if t in _NP_KINDS:
        return _encode_numpy(obj, fqn)
    if _nested:
        raise _refuse(
            fqn, obj, "the elements of a set, Counter, tuple or enum value must be plain values"
        )
    raise _refuse(fqn, obj, "it is not a plain value")


def _items(obj: Any, fqn: str, depth: int) -> list[dict[str, Any]]:
    if len(obj) > MAX_ITEMS:
        raise _refuse(fqn, obj, f"more than {MAX_ITEMS} elements")
    return [encode_value(x, fqn, _depth=depth + 1, _nested=True) for x in obj]


def _encode_tuple(obj: Any, fqn: str, depth: int, nested: bool) -> dict[str, Any]:
    return {"kind": "tuple", "items": _items(obj, fqn, depth)}


def _encode_set(obj: Any, fqn: str, depth: int, nested: bool) -> dict[str, Any]:
    keyed = sorted((canonical(r), r) for r in _items(obj, fqn, depth))
    texts = [k for k, _ in keyed]
    if len(set(texts)) != len(texts):
        raise _refuse(fqn, obj, "two elements have the same record (NaNs of equal bits?)")
    return {"kind": "set" if type(obj) is set else "frozenset", "items": [r for _, r in keyed]}


def _encode_counter(obj: Any, fqn: str, depth: int, nested: bool) -> dict[str, Any]:
    if len(obj) > MAX_ITEMS:
        raise _refuse(fqn, obj, f"more than {MAX_ITEMS} elements")
    items = [
        [
            encode_value(k, fqn, _depth=depth + 1, _nested=True),
            encode_value(v, fqn, _depth=depth + 1, _nested=True),
        ]
        for k, v in obj.items()
    ]
    return {"kind": "counter", "items": items}


def _encode_dtype(obj: Any, fqn: str, depth: int, nested: bool) -> dict[str, Any]:
    name = _TORCH_DTYPE_NAME.get(obj)
    if name is None:
        raise _refuse(fqn, obj, f"torch dtype {obj} is not in the table of storable dtypes")
    return {"kind": "torch-dtype", "value": name}


def _encode_size(obj: Any, fqn: str, depth: int, nested: bool) -> dict[str, Any]:
    if len(obj) > MAX_ITEMS:
        raise _refuse(fqn, obj, f"more than {MAX_ITEMS} dimensions")
    return {"kind": "torch-size", "value": [int(d) for d in obj]}


def _encode_device(obj: Any, fqn: str, depth: int, nested: bool) -> dict[str, Any]:
    return {"kind": "torch-device", "type": obj.type, "index": obj.index}


def _encode_tz(tz: Any, fqn: str, obj: Any) -> dict[str, Any]:
    if type(tz) is dt.timezone:
        args = tz.__getinitargs__()  # type: ignore[attr-defined]
        off = args[0]
        rec: dict[str, Any] = {
            "offset": (off.days * 86400 + off.seconds) * 10**6 + off.microseconds
        }
        if len(args) > 1:
            rec["name"] = args[1]
        return rec
    if type(tz) is zoneinfo.ZoneInfo:
        key = tz.key
        if not (isinstance(key, str) and _ZONE_KEY.fullmatch(key) and ".." not in key):
            raise _refuse(fqn, obj, "its ZoneInfo was not made from a key (ZoneInfo(key))")
        return {"zone": key}
    raise _refuse(
        fqn,
        obj,
        f"time zone {type(tz).__module__}.{type(tz).__qualname__} is not a datetime.timezone "
        "or zoneinfo.ZoneInfo",
    )


def _encode_datetime(obj: Any, fqn: str, depth: int, nested: bool) -> dict[str, Any]:
    if type(obj) is dt.date:
        return {"kind": "date", "value": [obj.year, obj.month, obj.day]}
    if type(obj) is dt.timedelta:
        return {"kind": "timedelta", "value": [obj.days, obj.seconds, obj.microseconds]}
    clock = [obj.hour, obj.minute, obj.second, obj.microsecond]
    if type(obj) is dt.datetime:
        rec: dict[str, Any] = {"kind": "datetime", "value": [obj.year, obj.month, obj.day, *clock]}
    else:
        rec = {"kind": "time", "value": clock}
    rec["fold"] = obj.fold
    if obj.tzinfo is not None:
        rec["tz"] = _encode_tz(obj.tzinfo, fqn, obj)
    return rec


def _encode_enum(obj: enum.Enum, fqn: str, depth: int) -> dict[str, Any]:
    cls = type(obj)
    base = next(n for n, b in _ENUM_BASES.items() if b is not None and issubclass(cls, b))
    name = obj.name
    if not (isinstance(name, str) and _is_member_name(name) and cls.__members__.get(name) is obj):
        raise _refuse(fqn, obj, f"enum member {name!r} has no name of its own (a combined Flag?)")
    if not _is_class_name(cls.__name__):
        raise _refuse(fqn, obj, f"enum class name {cls.__name__!r} is not an identifier")
    value = encode_value(obj.value, fqn, _depth=depth + 1, _nested=True)
    if _has_enum(value):
        raise _refuse(fqn, obj, "an enum member whose value holds an enum member")
    return {"kind": "enum", "class": cls.__name__, "base": base, "member": name, "value": value}


def _encode_numpy(obj: Any, fqn: str) -> dict[str, Any]:
    if type(obj) is np.str_:
        return {"kind": "numpy-str", "value": str(obj)}
    if type(obj) is np.bytes_:
        return {"kind": "numpy-bytes", "value": base64.b64encode(bytes(obj)).decode()}
    unit, step = np.datetime_data(obj.dtype)
    kind = "numpy-datetime64" if type(obj) is np.datetime64 else "numpy-timedelta64"
    return {"kind": kind, "unit": unit, "step": int(step), "value": str(int(obj.view(np.int64)))}


_ENCODERS: dict[type, Callable[[Any, str, int, bool], dict[str, Any]]] = {
    tuple: _encode_tuple,
    set: _encode_set,
    frozenset: _encode_set,
    collections.Counter: _encode_counter,
    torch.dtype: _encode_dtype,
    torch.Size: _encode_size,
    torch.device: _encode_device,
    dt.datetime: _encode_datetime,
    dt.date: _encode_datetime,
    dt.time: _encode_datetime,
    dt.timedelta: _encode_datetime,
}
_VALUE_TYPES = frozenset(t for t in _ENCODERS if t is not tuple) | {complex}
_NP_KINDS: frozenset[type] = frozenset({np.str_, np.bytes_, np.datetime64, np.timedelta64})
NUMPY_VALUE_TYPES = _NP_KINDS


def _has_enum(rec: Any) -> bool:
    """Whether a record (trusted or not, any JSON) holds an enum record."""
    stack = [rec]
    while stack:
        r = stack.pop()
        if isinstance(r, dict):
            if r.get("kind") == "enum":
                return True
            stack.extend(r.values())
        elif isinstance(r, list):
            stack.extend(r)
    return False


def _is_member_name(name: str) -> bool:
    return 0 < len(name) <= 200 and name.isidentifier() and not name.startswith("_")


def _is_class_name(name: str) -> bool:
    return 0 < len(name) <= 200 and name.isidentifier() and not keyword.iskeyword(name)


# ------------------------------------------------------------------ decoding


class EnumTypes:
    """The enum types made on the fly for one manifest (nothing is imported).

    Members are first collected over every record of the manifest
    (:meth:`collect` mode), then one type per recorded class name and base is
    made holding all the members recorded for it, so equal members of two
    leaves are the same object and members of one class share one type. Two
    classes that share a name but whose members clash (a name with two
    values, or two names with equal values) get one type each.
    """

    def __init__(self) -> None:
        self.collecting = True
        self.met = 0
        self._groups: dict[tuple[str, str], list[_Group]] = {}
        self._where: dict[tuple[str, str, str, str], int] = {}
        self._members: dict[tuple[str, str, str, str], enum.Enum] = {}

    def member(self, cls: str, base: str, name: str, canon: str, value: Any, where: str) -> Any:
        key = (cls, base, name, canon)
        self.met += 1
        if not self.collecting:
            return self._members[key]
        if key not in self._where:
            if len(self._where) >= MAX_ENUM_MEMBERS:
                raise ManifestError(f"{where}: more than {MAX_ENUM_MEMBERS} enum members")
            groups = self._groups.setdefault((cls, base), [])
            n = next((i for i, g in enumerate(groups) if g.admits(name, value)), len(groups))
            if n == len(groups):
                groups.append(_Group())
            groups[n].add(name, value)
            self._where[key] = n
        return object()  # a placeholder, unique (the real member comes in the second pass)

    def build(self, where: str) -> None:
        """Make the types of every collected member, and leave collect mode."""
        types: dict[tuple[str, str, int], type[enum.Enum]] = {}
        for (cls, base), groups in self._groups.items():
            for n, group in enumerate(groups):
                g = group.members
                b = _ENUM_BASES[base]
                want = {"IntFlag": int, "Flag": int, "IntEnum": int, "StrEnum": str}.get(base)
                if want is not None and not all(type(v) is want for v in g.values()):
                    raise ManifestError(
                        f"{where}: enum {cls} ({base}) has a value of the wrong type"
                    )
                extra: dict[str, Any] = {"module": __name__}
                if b is None:  # StrEnum on Python 3.10
                    b, extra["type"] = enum.Enum, str
                try:
                    types[(cls, base, n)] = b(cls, list(g.items()), **extra)
                except Exception as exc:
                    raise ManifestError(
                        f"{where}: cannot make enum {cls}: {str(exc)[:80]}"
                    ) from None
        for key, n in self._where.items():
            cls, base, name, canon = key
            t = types[(cls, base, n)]
            m = t.__members__.get(name)
            if m is None or m.name != name or canonical(encode_value(m.value)) != canon:
                raise ManifestError(f"{where}: enum {cls} member {name} cannot be made exactly")
            self._members[key] = m
        self.collecting = False


class _Group:
    """The members of one enum type to make: no name twice, no two equal values.

    Equal values are found through a hash table (linear only among unhashable
    values), so collecting stays linear in the number of members.
    """

    __slots__ = ("by_value", "members", "unhashable")

    def __init__(self) -> None:
        self.members: dict[str, Any] = {}
        self.by_value: dict[Any, str] = {}
        self.unhashable: list[Any] = []

    def admits(self, name: str, value: Any) -> bool:
        if name in self.members:
            return False
        try:
            return value not in self.by_value and not any(_same(value, u) for u in self.unhashable)
        except TypeError:  # unhashable: compare with every value
            return not any(_same(value, v) for v in self.members.values())

    def add(self, name: str, value: Any) -> None:
        self.members[name] = value
        try:
            self.by_value[value] = name
        except TypeError:
            self.unhashable.append(value)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def decode_value(raw: Any, where: str, enums: EnumTypes | None = None) -> Any:
    """The value of a record written by :func:`encode_value`.

    ``enums`` holds the enum types of the whole manifest (see
    :class:`EnumTypes`); without it, types are made for this record alone.

    Raises:
        ManifestError: the record is malformed; the message starts with ``where``.
    """
    if enums is None:
        enums = EnumTypes()
        value = _decode(raw, where, 0, False, enums)
        if not enums.met:
            return value
        enums.build(where)
        return _decode(raw, where, 0, False, enums)
    return _decode(raw, where, 0, False, enums)


def _decode(raw: Any, where: str, depth: int, nested: bool, enums: EnumTypes) -> Any:
    if depth > MAX_DEPTH:
        raise ManifestError(f"{where}: values nest deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: value record is not an object")
    kind = raw.get("kind")
    value = raw.get("value")
    dec = _DECODERS.get(kind) if isinstance(kind, str) else None
    if dec is None or (kind == "tuple" and not nested):
        raise ManifestError(f"{where}: bad leaf record of kind {str(kind)[:40]!r}")
    try:
        return dec(raw, value, where, depth, enums)
    except ManifestError:
        raise
    except (ValueError, TypeError, OverflowError, KeyError) as exc:
        raise ManifestError(f"{where}: bad {kind} value ({str(exc)[:60]})") from None


def _bad(where: str, kind: str, field: str = "value") -> ManifestError:
    return ManifestError(f"{where}: bad {kind} record ({field})")


def _d_none(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    return None


def _d_bool(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if type(value) is not bool:
        raise _bad(where, "bool")
    return value


def _d_int(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if not (isinstance(value, str) and _INT_TEXT.fullmatch(value)):
        raise _bad(where, "int")
    return int(value)


def _d_float(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{16}", value)):
        raise _bad(where, "float")
    return struct.unpack(">d", bytes.fromhex(value))[0]


def _d_complex(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value)):
        raise _bad(where, "complex")
    return complex(*struct.unpack(">dd", bytes.fromhex(value)))


def _d_str(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if not isinstance(value, str):
        raise _bad(where, "str")
    return value


def _d_bytes(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if not isinstance(value, str):
        raise _bad(where, "bytes")
    return base64.b64decode(value, validate=True)


def _list(raw: Any, where: str, kind: str) -> list[Any]:
    items = raw.get("items")
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise _bad(where, kind, "items")
    return items


def _d_tuple(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    return tuple(_decode(x, where, depth + 1, True, enums) for x in _list(raw, where, "tuple"))


def _d_set(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    kind = raw["kind"]
    items = _list(raw, where, kind)
    texts = [canonical(x) for x in items]
    if any(a >= b for a, b in itertools.pairwise(texts)):
        raise ManifestError(f"{where}: {kind} elements are not in canonical order (or repeat)")
    elems = [_decode(x, where, depth + 1, True, enums) for x in items]
    out = set(elems) if kind == "set" else frozenset(elems)
    if len(out) != len(elems):
        raise ManifestError(f"{where}: {kind} holds equal elements")
    return out


def _d_counter(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    out: collections.Counter[Any] = collections.Counter()
    items = _list(raw, where, "counter")
    for pair in items:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _bad(where, "counter", "items")
        k = _decode(pair[0], where, depth + 1, True, enums)
        if k in out:
            raise ManifestError(f"{where}: counter holds a key twice")
        out[k] = _decode(pair[1], where, depth + 1, True, enums)
    return out


def _d_dtype(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if not (isinstance(value, str) and value in _TORCH_DTYPES):
        raise ManifestError(f"{where}: torch dtype {str(value)[:40]!r} is not in the table")
    return _TORCH_DTYPES[value]


def _d_size(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    if not (
        isinstance(value, list)
        and len(value) <= MAX_ITEMS
        and all(type(d) is int and -_I64 <= d < _I64 for d in value)
    ):
        raise _bad(where, "torch-size")
    return torch.Size(value)


def _d_device(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    typ, index = raw.get("type"), raw.get("index")
    if not (isinstance(typ, str) and _DEVICE_TYPE.fullmatch(typ)):
        raise _bad(where, "torch-device", "type")
    if index is not None and not (type(index) is int and 0 <= index < 1 << 31):
        raise _bad(where, "torch-device", "index")
    try:
        return torch.device(typ) if index is None else torch.device(typ, index)
    except RuntimeError as exc:
        raise ManifestError(f"{where}: bad torch-device ({str(exc)[:60]})") from None


def _d_path(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    cls = _PATHS.get(raw.get("class")) if isinstance(raw.get("class"), str) else None
    if cls is None:
        raise _bad(where, "path", "class")
    if not isinstance(value, str):
        raise _bad(where, "path")
    try:
        return cls(value)
    except NotImplementedError:
        raise ManifestError(
            f"{where}: a {raw['class']} cannot be made on this system (saved on another "
            "operating system)"
        ) from None


def _ints(value: Any, n: int, where: str, kind: str) -> list[int]:
    if not (isinstance(value, list) and len(value) == n and all(type(v) is int for v in value)):
        raise _bad(where, kind)
    return value


def _tz(raw: Any, where: str, kind: str) -> dt.tzinfo | None:
    if "tz" not in raw:
        return None
    tz = raw["tz"]
    if isinstance(tz, dict) and set(tz) <= {"offset", "name"} and "offset" in tz:
        off, name = tz["offset"], tz.get("name")
        if type(off) is not int or abs(off) >= 86400 * 10**6:
            raise _bad(where, kind, "tz offset")
        delta = dt.timedelta(microseconds=off)
        if "name" not in tz:
            return dt.timezone(delta)
        if not isinstance(name, str):
            raise _bad(where, kind, "tz name")
        return dt.timezone(delta, name)
    if isinstance(tz, dict) and set(tz) == {"zone"}:
        key = tz["zone"]
        if not (isinstance(key, str) and _ZONE_KEY.fullmatch(key) and ".." not in key):
            raise _bad(where, kind, "tz zone")
        try:
            return zoneinfo.ZoneInfo(key)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise ManifestError(f"{where}: time zone {key!r} is not known on this system") from None
    raise _bad(where, kind, "tz")


def _fold(raw: Any, where: str, kind: str) -> int:
    fold = raw.get("fold")
    if fold not in (0, 1) or type(fold) is not int:
        raise _bad(where, kind, "fold")
    return fold


def _d_datetime(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    kind = raw["kind"]
    if kind == "date":
        return dt.date(*_ints(value, 3, where, kind))
    if kind == "timedelta":
        d, s, us = _ints(value, 3, where, kind)
        out = dt.timedelta(days=d, seconds=s, microseconds=us)
        if (out.days, out.seconds, out.microseconds) != (d, s, us):
            raise _bad(where, kind)
        return out
    fold, tz = _fold(raw, where, kind), _tz(raw, where, kind)
    make: Any = dt.datetime if kind == "datetime" else dt.time
    return make(*_ints(value, 7 if kind == "datetime" else 4, where, kind), tzinfo=tz, fold=fold)


def _d_enum(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    cls, base, name = raw.get("class"), raw.get("base"), raw.get("member")
    if not (isinstance(cls, str) and _is_class_name(cls)):
        raise _bad(where, "enum", "class")
    if base not in _ENUM_BASES:
        raise _bad(where, "enum", "base")
    if not (isinstance(name, str) and _is_member_name(name)):
        raise _bad(where, "enum", "member")
    if _has_enum(value):
        raise _bad(where, "enum", "value holds an enum")
    v = _decode(value, where, depth + 1, True, enums)
    return enums.member(cls, base, name, canonical(value), v, where)


def _d_numpy(raw: Any, value: Any, where: str, depth: int, enums: EnumTypes) -> Any:
    kind = raw["kind"]
    if kind == "numpy-str":
        return np.str_(_d_str(raw, value, where, depth, enums))
    if kind == "numpy-bytes":
        return np.bytes_(_d_bytes(raw, value, where, depth, enums))
    unit, step = raw.get("unit"), raw.get("step")
    if unit not in _NP_UNITS:
        raise _bad(where, kind, "unit")
    if type(step) is not int or not 1 <= step < 1 << 31 or (unit == "generic" and step != 1):
        raise _bad(where, kind, "step")
    if not (isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value)):
        raise _bad(where, kind)
    n = int(value)
    if not -_I64 <= n < _I64:
        raise _bad(where, kind)
    code = "M8" if kind == "numpy-datetime64" else "m8"
    spec = code if unit == "generic" else f"{code}[{step}{unit}]"
    return np.array(n, dtype=np.int64).view(np.dtype(spec))[()]


_DECODERS: dict[str, Callable[[Any, Any, str, int, EnumTypes], Any]] = {
    "none": _d_none,
    "bool": _d_bool,
    "int": _d_int,
    "float": _d_float,
    "complex": _d_complex,
    "str": _d_str,
    "bytes": _d_bytes,
    "tuple": _d_tuple,
    "set": _d_set,
    "frozenset": _d_set,
    "counter": _d_counter,
    "torch-dtype": _d_dtype,
    "torch-size": _d_size,
    "torch-device": _d_device,
    "path": _d_path,
    "datetime": _d_datetime,
    "date": _d_datetime,
    "time": _d_datetime,
    "timedelta": _d_datetime,
    "enum": _d_enum,
    "numpy-str": _d_numpy,
    "numpy-bytes": _d_numpy,
    "numpy-datetime64": _d_numpy,
    "numpy-timedelta64": _d_numpy,
}
VALUE_KINDS = frozenset(_DECODERS)


# ------------------------------------------------------------------- loading


def adopt_value(fqn: str, value: Any, template: Any = None) -> Any:
    """A fresh copy of a loaded ``value``, its enum members in the template's enum types.

    Sets and Counters are copied (a loaded tree never shares them with the
    manifest or another load). An enum member loaded where the template holds
    an enum member becomes the member of the template's type with the same
    name; inside a set, Counter or tuple, the template's enum types are found
    by class name among the template value's own members. Members with no
    such type stay in the types made on the fly.

    Raises:
        LoadMismatchError: the template's enum type has no member of that name,
            or that member's value differs from the recorded one.
    """
    types: dict[str, type[enum.Enum]] = {}
    _enum_types(template, types, 0)
    top = type(template) if isinstance(template, enum.Enum) else None
    return _adopt(fqn, value, types, top, 0)


def copy_value(value: Any) -> Any:
    """``value`` with its sets and Counters copied (at any depth), everything else shared."""
    return _adopt("", value, {}, None, 0)


def _enum_types(obj: Any, out: dict[str, type[enum.Enum]], depth: int) -> None:
    if depth > MAX_DEPTH:
        return
    if isinstance(obj, enum.Enum):
        out.setdefault(type(obj).__name__, type(obj))
    elif type(obj) in (set, frozenset, tuple):
        for x in obj:
            _enum_types(x, out, depth + 1)
    elif type(obj) is collections.Counter:
        for k, v in obj.items():
            _enum_types(k, out, depth + 1)
            _enum_types(v, out, depth + 1)


def _adopt(fqn: str, v: Any, types: dict[str, type[enum.Enum]], top: Any, depth: int) -> Any:
    t = type(v)
    if isinstance(v, enum.Enum):
        target = top or types.get(t.__name__)
        return v if target is None else _member_of(fqn, v, target)
    if t is tuple:
        return tuple(_adopt(fqn, x, types, None, depth + 1) for x in v)
    if t is set or t is frozenset:
        return t(_adopt(fqn, x, types, None, depth + 1) for x in v)
    if t is collections.Counter:
        return collections.Counter(
            {
                _adopt(fqn, k, types, None, depth + 1): _adopt(fqn, c, types, None, depth + 1)
                for k, c in v.items()
            }
        )
    return v


def _member_of(fqn: str, v: enum.Enum, target: type[enum.Enum]) -> enum.Enum:
    m = target.__members__.get(v.name)
    if m is None:
        raise LoadMismatchError(
            mismatched=[f"{fqn} (template enum {target.__qualname__} has no member {v.name!r})"]
        )
    if canonical(encode_value(m.value, fqn)) != canonical(encode_value(v.value, fqn)):
        raise LoadMismatchError(
            mismatched=[
                f"{fqn} (template {target.__qualname__}.{v.name} = {m.value!r}, "
                f"checkpoint {type(v).__name__}.{v.name} = {v.value!r})"
            ]
        )
    return m

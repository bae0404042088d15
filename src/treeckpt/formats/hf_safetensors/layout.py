"""The safetensors file format and the Hugging Face folder layout, as pure functions.

A safetensors file is an 8-byte little-endian header length ``n``, ``n``
bytes of JSON (one entry per tensor: ``dtype``, ``shape``, ``data_offsets``
relative to the data section; an optional ``__metadata__`` of string pairs),
then the data section, each tensor's bytes in row-major order. A sharded
model is ``model-0000i-of-0000N.safetensors`` files with a
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``
from tensor name to file name) beside them.

DCP's writer adds, in ``__metadata__``, ``DCP_SHARDING_INFO``: the JSON of
``{name: {"saved_offsets": [...]}}``, where each rank's file holds its own
piece of a tensor (``shard-0000r-model-0000i-of-0000N.safetensors``).

Everything here is a pure function of bytes and numbers: the header is
untrusted input and is checked entry by entry, with errors naming the file
and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from treeckpt.core.box import Box
from treeckpt.errors import ManifestError

__all__ = [
    "DCP_VERSION",
    "DTYPE_CODES",
    "FORMAT_KEY",
    "HEADER_LENGTH_BYTES",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "SHARDED_DIR",
    "SHARDING_INFO_KEY",
    "SUFFIX",
    "VERSION_KEY",
    "Entry",
    "Header",
    "byte_runs",
    "coalesce_runs",
    "dtype_code",
    "encode_header",
    "encode_index",
    "file_name",
    "header_length",
    "parse_header",
    "parse_index",
]

SUFFIX = ".safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Where ``enable_consolidation`` puts the ranks' pieces, below the output folder.
SHARDED_DIR = "sharded"
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
VERSION_KEY = "DCP_VERSION"
DCP_VERSION = "1.0"
FORMAT_KEY = "format"
HEADER_LENGTH_BYTES = 8
#: The safetensors library refuses larger headers too.
MAX_HEADER_BYTES = 100_000_000

_CODES: tuple[tuple[str, str], ...] = (
    ("F64", "float64"),
    ("F32", "float32"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I64", "int64"),
    ("I32", "int32"),
    ("I16", "int16"),
    ("I8", "int8"),
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("U8", "uint8"),
    ("BOOL", "bool"),
    ("C64", "complex64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
)

#: safetensors' dtype names and the torch dtypes they hold (those this torch has).
DTYPE_CODES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in _CODES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_CODE_OF: dict[torch.dtype, str] = {dt: code for code, dt in DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype, fqn: str) -> str:
    """safetensors' name for ``dtype``; an error naming ``fqn`` when it has none."""
    try:
        return _CODE_OF[dtype]
    except KeyError:
        raise ManifestError(f"{fqn}: safetensors cannot store dtype {dtype}") from None


def file_name(index: int, count: int, shard: int | None = None) -> str:
    """``model-0000i-of-0000N.safetensors``, with ``shard-0000r-`` before it for a rank's piece.

    >>> file_name(2, 3), file_name(1, 1, shard=4)
    ('model-00002-of-00003.safetensors', 'shard-00004-model-00001-of-00001.safetensors')
    """
    base = f"model-{index:05d}-of-{count:05d}{SUFFIX}"
    return base if shard is None else f"shard-{shard:05d}-{base}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One tensor of a file: where its bytes are, and where it lies in the whole tensor.

    ``start``/``stop`` are absolute byte positions in the file; ``offsets``
    places this piece in the full tensor (zeros for an ordinary file).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int
    offsets: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def box(self) -> Box:
        return Box(offsets=self.offsets, sizes=self.shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """A checked safetensors header: its entries in file order and its ``__metadata__``."""

    entries: dict[str, Entry]
    metadata: dict[str, str] = field(default_factory=dict)
    #: Header length field plus JSON: where the data section starts.
    data_start: int = 0


def header_length(prefix: bytes, where: str, file_size: int) -> int:
    """The JSON length the first 8 bytes announce, checked against the file's size."""
    if len(prefix) < HEADER_LENGTH_BYTES:
        raise ManifestError(f"{where}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", prefix[:HEADER_LENGTH_BYTES])
    if n > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + n > file_size:
        raise ManifestError(
            f"{where}: not a safetensors file (header length {n}, file size {file_size})"
        )
    return int(n)


def _ints(v: Any, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(type(x) is int and x >= 0 for x in v):
        raise ManifestError(f"{where}: {what} is not a list of non-negative integers: {v!r}")
    return tuple(v)


def parse_header(raw: bytes, where: str, file_size: int) -> Header:
    """Check the JSON header ``raw`` of the file ``where`` (``file_size`` bytes long).

    Every entry's dtype is known, its byte length matches its shape, its
    bytes lie inside the file; DCP's sharding info (when present) gives each
    entry's offsets.
    """
    data_start = HEADER_LENGTH_BYTES + len(raw)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: the safetensors header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ManifestError(f"{where}: __metadata__ is not a map of strings")
    sharding = _sharding_info(meta, where)
    data_size = file_size - data_start
    entries: dict[str, Entry] = {}
    for name, e in doc.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(e, dict):
            raise ManifestError(f"{at}: entry is not a JSON object")
        dtype = DTYPE_CODES.get(e.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise ManifestError(f"{at}: unknown dtype {e.get('dtype')!r}")
        shape = _ints(e.get("shape"), at, "shape")
        span = _ints(e.get("data_offsets"), at, "data_offsets")
        if len(span) != 2 or span[0] > span[1] or span[1] > data_size:
            raise ManifestError(
                f"{at}: data_offsets {list(span)} outside the data section ({data_size} bytes)"
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        if span[1] - span[0] != math.prod(shape) * itemsize:
            raise ManifestError(
                f"{at}: {span[1] - span[0]} bytes for shape {list(shape)} of {dtype}"
            )
        offsets = (0,) * len(shape)
        if sharding is not None:
            info = sharding.get(name)
            if not isinstance(info, dict) or "saved_offsets" not in info:
                raise ManifestError(f"{at}: no saved_offsets in {SHARDING_INFO_KEY}")
            offsets = _ints(info["saved_offsets"], at, "saved_offsets")
            if len(offsets) != len(shape):
                raise ManifestError(f"{at}: saved_offsets {list(offsets)} for shape {list(shape)}")
        entries[name] = Entry(
            name=name,
            dtype=dtype,
            shape=shape,
            start=data_start + span[0],
            stop=data_start + span[1],
            offsets=offsets,
        )
    return Header(entries=entries, metadata=dict(meta), data_start=data_start)


def _sharding_info(meta: Mapping[str, str], where: str) -> dict[str, Any] | None:
    text = meta.get(SHARDING_INFO_KEY)
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ManifestError(f"{where}: {SHARDING_INFO_KEY} is not a JSON object")
    return info


def encode_header(
    tensors: Iterable[tuple[str, torch.dtype, Sequence[int]]],
    metadata: Mapping[str, str] | None,
) -> tuple[bytes, dict[str, Entry]]:
    """The header bytes (length field, JSON padded with spaces to 8 bytes) for ``tensors``,
    written in that order, and their entries (absolute byte positions)."""
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    spans: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
    pos = 0
    for name, dtype, shape in tensors:
        shape_t = tuple(int(s) for s in shape)
        n = math.prod(shape_t) * torch.empty((), dtype=dtype).element_size()
        doc[name] = {
            "dtype": dtype_code(dtype, name),
            "shape": list(shape_t),
            "data_offsets": [pos, pos + n],
        }
        spans.append((name, dtype, shape_t, pos, pos + n))
        pos += n
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = HEADER_LENGTH_BYTES + len(text)
    entries = {
        name: Entry(
            name=name,
            dtype=dtype,
            shape=shape,
            start=start + a,
            stop=start + b,
            offsets=(0,) * len(shape),
        )
        for name, dtype, shape, a, b in spans
    }
    return struct.pack("<Q", len(text)) + text, entries


def encode_index(weight_map: Mapping[str, str], total_size: int) -> bytes:
    """``model.safetensors.index.json``: the total tensor bytes and each tensor's file."""
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(doc, indent=2) + "\n").encode()


def parse_index(raw: bytes, where: str) -> dict[str, str]:
    """The ``weight_map`` of an index file, checked (names of ``.safetensors`` files in the folder)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where}: not JSON ({exc})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise ManifestError(f"{where}: weight_map is not a map of tensor names to file names")
    for k, v in wm.items():
        if "/" in v or "\\" in v or v.startswith(".") or not v.endswith(SUFFIX):
            raise ManifestError(f"{where}: tensor {k!r} maps to {v!r}, not a file of the folder")
    return dict(wm)


def byte_runs(shape: Sequence[int], itemsize: int, box: Box) -> list[tuple[int, int]]:
    """The contiguous byte ranges ``(offset, length)`` of ``box`` in a row-major tensor of ``shape``.

    Offsets are from the tensor's first byte; the ranges are in row-major
    order of the box, adjacent ones merged, so reading them one after the
    other gives the box's elements in row-major order.

    >>> byte_runs((4, 3), 4, Box(offsets=(1, 0), sizes=(2, 3)))
    [(12, 24)]
    >>> byte_runs((4, 3), 4, Box(offsets=(1, 1), sizes=(2, 2)))
    [(16, 8), (28, 8)]
    """
    if box.is_empty():
        return []
    ndim = len(shape)
    if ndim == 0:
        return [(0, itemsize)]
    strides = [itemsize] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    # Innermost dims the box spans wholly merge into one run with the first partial dim.
    k = ndim - 1
    while k > 0 and box.offsets[k] == 0 and box.sizes[k] == shape[k]:
        k -= 1
    run = box.sizes[k] * strides[k]
    base = box.offsets[k] * strides[k]
    runs: list[tuple[int, int]] = []
    for outer in _index_product(box.offsets[:k], box.sizes[:k]):
        start = base + sum(i * s for i, s in zip(outer, strides, strict=False))
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + run)
        else:
            runs.append((start, run))
    return runs


def coalesce_runs(
    runs: Sequence[tuple[int, int]], max_gap: int
) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Group byte ranges (in increasing order) into fewer reads, each bridging gaps of at
    most ``max_gap`` bytes: ``(start, length, [(offset in the read, length), ...])``.

    For stores where a request costs more than the bytes (object stores); with
    ``max_gap=0`` every range is its own read.

    >>> coalesce_runs([(0, 4), (6, 4), (100, 4)], 2)
    [(0, 10, [(0, 4), (6, 4)]), (100, 4, [(0, 4)])]
    """
    reads: list[tuple[int, int, list[tuple[int, int]]]] = []
    for start, n in runs:
        if reads:
            r_start, r_len, parts = reads[-1]
            gap = start - (r_start + r_len)
            if 0 <= gap <= max_gap and max_gap > 0:
                parts.append((start - r_start, n))
                reads[-1] = (r_start, start + n - r_start, parts)
                continue
        reads.append((start, n, [(0, n)]))
    return reads


def _index_product(offsets: Sequence[int], sizes: Sequence[int]) -> Iterable[tuple[int, ...]]:
    if not offsets:
        yield ()
        return
    for i in range(offsets[0], offsets[0] + sizes[0]):
        for rest in _index_product(offsets[1:], sizes[1:]):
            yield (i, *rest)

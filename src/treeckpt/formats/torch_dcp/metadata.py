"""The ``.metadata`` file of a checkpoint torch's DCP wrote, read without running its pickle.

An allow-listed unpickler builds exactly the classes DCP writes into
``.metadata`` and refuses any other global with a
:class:`~treeckpt.ManifestError` naming the file and the class. What it builds
is then checked field by field (dtypes, shapes, chunk tiling, file names,
byte ranges, stream transforms) and turned into plain frozen records.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from torch.distributed.checkpoint import filesystem as _fs
from torch.distributed.checkpoint import metadata as _md

from treeckpt.core.box import Box, check_tiling, full_box
from treeckpt.core.dtypes import torch_dtype_code
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, ManifestError, PlanError
from treeckpt.store.layout import DCP_MARKER_HEAD_BYTES, is_dcp_marker

__all__ = [
    "MAX_METADATA_BYTES",
    "METADATA_NAME",
    "DcpCheckpoint",
    "DcpItem",
    "DcpTensor",
    "fs_and_root",
    "is_dcp_checkpoint",
    "read_dcp_metadata",
]

METADATA_NAME = ".metadata"
MAX_METADATA_BYTES = 1 << 30
"""Largest ``.metadata`` file read (a pickle is held in memory to be checked)."""

_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    (_MD, "Metadata"): _md.Metadata,
    (_MD, "TensorStorageMetadata"): _md.TensorStorageMetadata,
    (_MD, "BytesStorageMetadata"): _md.BytesStorageMetadata,
    (_MD, "ChunkStorageMetadata"): _md.ChunkStorageMetadata,
    (_MD, "TensorProperties"): _md.TensorProperties,
    (_MD, "_MEM_FORMAT_ENCODING"): _md._MEM_FORMAT_ENCODING,
    (_MD, "MetadataIndex"): _md.MetadataIndex,
    (_MD, "StorageMeta"): _md.StorageMeta,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _fs._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): dict,
}
_LAYOUTS = {"torch.strided": torch.strided}
_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _get_layout(name: str) -> torch.layout:
    if name not in _LAYOUTS:
        raise ManifestError(f"unknown tensor layout {name!r}")
    return _LAYOUTS[name]


def _as_str(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes DCP writes into ``.metadata``; any other global is refused."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _get_layout
        if module in ("pathlib", "pathlib._local") and name in _PATHS:
            return _as_str  # storage_meta.checkpoint_id: kept as a string, never a class
        raise ManifestError(
            f"{self.where}: refusing to load {module}.{name}; a DCP .metadata holds only "
            "checkpoint metadata classes (this file would run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ManifestError(f"{self.where}: unexpected persistent id in the metadata pickle")


@dataclass(frozen=True, slots=True, kw_only=True)
class DcpItem:
    """One stored item: ``length`` bytes at ``offset`` of ``file``, then ``transforms``."""

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DcpTensor:
    """A tensor of a DCP checkpoint: global shape and dtype (a treeckpt dtype code), chunks."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[tuple[Box, DcpItem], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DcpCheckpoint:
    """What a DCP checkpoint holds, validated; no tensor or value bytes read yet.

    ``paths`` maps each FQN to its path in the nested state dict that was
    saved (DCP's ``planner_data``), so :func:`restore_dcp` rebuilds the nesting.
    """

    path: str
    version: str | None
    tensors: dict[str, DcpTensor]
    values: dict[str, DcpItem]
    paths: dict[str, tuple[str | int, ...]]

    @property
    def fqns(self) -> list[str]:
        return list(self.paths)


def fs_and_root(path: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/")


def is_dcp_checkpoint(path: Any) -> bool:
    """True when ``path`` holds a ``.metadata`` file torch's DCP wrote.

    treeckpt's own checkpoints hold a ``.metadata`` too, a marker for tools
    that look for the name (``treeckpt.store.layout.DCP_MARKER_BYTES``); it
    is told apart by its first bytes.
    """
    fs, root = fs_and_root(path)
    where = f"{root}/{METADATA_NAME}"
    if not fs.isfile(where):
        return False
    with fs.open(where, "rb") as f:
        return not is_dcp_marker(f.read(DCP_MARKER_HEAD_BYTES))


def read_dcp_metadata(path: Any) -> DcpCheckpoint:
    """Read and check ``path/.metadata`` without running code from it.

    Raises:
        CheckpointNotFoundError: no ``.metadata`` at ``path``.
        ManifestError: a class outside DCP's metadata classes, or malformed
            content (file and FQN named).
    """
    fs, root = fs_and_root(path)
    where = f"{root}/{METADATA_NAME}"
    try:
        size = fs.size(where)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{root}: no DCP checkpoint ({METADATA_NAME} not found)"
        ) from None
    if size is None or size > MAX_METADATA_BYTES:
        raise ManifestError(f"{where}: {size} bytes, more than the {MAX_METADATA_BYTES} allowed")
    with fs.open(where, "rb") as f:
        data = f.read()
    if is_dcp_marker(data):
        raise CheckpointNotFoundError(
            f"{root}: a treeckpt checkpoint ({METADATA_NAME} is its marker), not torch DCP's "
            "format; read it with treeckpt.load"
        )
    try:
        md = _MetadataUnpickler(data, where).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise ManifestError(f"{where}: not a DCP metadata pickle ({str(exc)[:200]})") from None
    sizes = _file_sizes(fs, root)
    return _check_metadata(md, where, str(path).rstrip("/"), sizes)


def _file_sizes(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in fs.find(root, detail=True).values():
        name = str(info["name"]).rstrip("/")
        rel = name[len(root) + 1 :] if name.startswith(root + "/") else name
        out[rel] = int(info.get("size") or 0)
    return out


def _bad(where: str, what: str) -> ManifestError:
    return ManifestError(f"{where}: {what}")


def _ints(v: Any, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple | list) or not all(type(x) is int and x >= 0 for x in v):
        raise _bad(where, f"{what} must be non-negative integers, got {str(v)[:80]}")
    return tuple(v)


def _check_metadata(md: Any, where: str, url: str, sizes: dict[str, int]) -> DcpCheckpoint:
    if not isinstance(md, _md.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise _bad(where, f"expected a Metadata record, got {type(md).__name__}")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise _bad(where, "storage_data is not a dict (not written by FileSystemWriter)")
    items: dict[tuple[str, tuple[int, ...] | None], DcpItem] = {}
    for key, info in storage.items():
        if not isinstance(key, _md.MetadataIndex) or not isinstance(info, _fs._StorageInfo):
            raise _bad(
                where, "storage_data holds something other than MetadataIndex -> _StorageInfo"
            )
        fqn = key.fqn
        if not isinstance(fqn, str):
            raise _bad(where, "an FQN is not a string")
        off = None if key.offset is None else _ints(key.offset, where, f"{fqn!r} chunk offset")
        items[(fqn, off)] = _check_item(info, where, fqn, sizes)
    tensors: dict[str, DcpTensor] = {}
    values: dict[str, DcpItem] = {}
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise _bad(where, "an FQN is not a string")
        if isinstance(entry, _md.BytesStorageMetadata):
            if (fqn, None) not in items:
                raise _bad(where, f"{fqn!r}: value has no storage entry")
            values[fqn] = items[(fqn, None)]
        elif isinstance(entry, _md.TensorStorageMetadata):
            tensors[fqn] = _check_tensor(fqn, entry, items, where)
        else:
            raise _bad(where, f"{fqn!r}: unknown storage type {type(entry).__name__}")
    paths = _check_paths(md.planner_data, list(md.state_dict_metadata), where)
    version = md.version if isinstance(md.version, str) else None
    return DcpCheckpoint(path=url, version=version, tensors=tensors, values=values, paths=paths)


def _check_item(info: Any, where: str, fqn: str, sizes: dict[str, int]) -> DcpItem:
    rel = info.relative_path
    if (
        not isinstance(rel, str)
        or not rel
        or any(p in ("", ".", "..") or not _SAFE_NAME.fullmatch(p) for p in rel.split("/"))
    ):
        raise _bad(where, f"{fqn!r}: data file name {str(rel)[:80]!r} is not a plain relative name")
    offset, length = info.offset, info.length
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise _bad(where, f"{fqn!r}: bad byte range {offset!r}+{length!r} in {rel}")
    if rel not in sizes:
        raise CheckpointError(f"{where}: {fqn!r} is stored in {rel}, which is missing")
    if offset + length > sizes[rel]:
        raise _bad(
            where,
            f"{fqn!r}: bytes {offset}..{offset + length} lie past the end of {rel} "
            f"({sizes[rel]} bytes)",
        )
    transforms = tuple(getattr(info, "transform_descriptors", None) or ())
    for t in transforms:
        if t != "stream.zstd/1":
            raise _bad(where, f"{fqn!r}: unsupported stream transform {str(t)[:60]!r} in {rel}")
    return DcpItem(file=rel, offset=offset, length=length, transforms=transforms)


def _check_tensor(fqn: str, entry: Any, items: Mapping[Any, DcpItem], where: str) -> DcpTensor:
    props = entry.properties
    dtype = getattr(props, "dtype", None)
    code = torch_dtype_code(dtype) if isinstance(dtype, torch.dtype) else None
    if code is None:
        raise _bad(where, f"{fqn!r}: unsupported dtype {dtype!r}")
    shape = _ints(entry.size, where, f"{fqn!r} size")
    whole = full_box(shape)
    chunks = []
    if not isinstance(entry.chunks, list):
        raise _bad(where, f"{fqn!r}: chunks is not a list")
    for c in entry.chunks:
        if not isinstance(c, _md.ChunkStorageMetadata):
            raise _bad(where, f"{fqn!r}: a chunk is a {type(c).__name__}")
        box = Box(
            offsets=_ints(c.offsets, where, f"{fqn!r} chunk offsets"),
            sizes=_ints(c.sizes, where, f"{fqn!r} chunk sizes"),
        )
        if box.ndim != len(shape) or not whole.contains(box):
            raise _bad(where, f"{fqn!r}: chunk {box} lies outside the shape {list(shape)}")
        item = items.get((fqn, box.offsets))
        if item is None:
            raise _bad(where, f"{fqn!r}: chunk at {list(box.offsets)} has no storage entry")
        chunks.append((box, item))
    try:
        check_tiling(shape, sorted({b for b, _ in chunks}, key=lambda b: b.offsets), what=fqn)
    except PlanError as exc:
        raise _bad(where, str(exc)) from None
    return DcpTensor(fqn=fqn, dtype=code, shape=shape, chunks=tuple(chunks))


def _check_paths(
    planner_data: Any, fqns: list[str], where: str
) -> dict[str, tuple[str | int, ...]]:
    """FQN -> nested path, in the saved order; a flat path where DCP recorded none
    (``flatten_state_dict=False``)."""
    paths: dict[str, tuple[str | int, ...]] = {}
    pd = planner_data if isinstance(planner_data, dict) else {}
    known = set(fqns)
    ordered = [f for f in pd if isinstance(f, str) and f in known]
    for fqn in ordered + [f for f in fqns if f not in pd]:
        p = pd.get(fqn)
        if p is None:
            paths[fqn] = (fqn,)
            continue
        if (
            not isinstance(p, tuple | list)
            or not p
            or not all(type(k) is str or (type(k) is int and 0 <= k < len(fqns)) for k in p)
        ):
            raise _bad(where, f"{fqn!r}: malformed path {str(p)[:80]} in planner_data")
        paths[fqn] = tuple(p)
    return paths

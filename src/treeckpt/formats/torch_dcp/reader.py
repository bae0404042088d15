"""Checkpoints written by torch's own DCP: read them without running their pickles.

A DCP checkpoint is a directory with a pickled ``.metadata`` and data files
(``__<rank>_<n>.distcp``) holding one ``torch.save`` blob per tensor chunk or
per non-tensor value, each optionally passed through a stream transform
(torch's ``stream.zstd`` extension). Reading it with torch runs
``pickle.load`` on ``.metadata`` and ``torch.load(weights_only=False)`` on
values, so a hostile checkpoint runs code. Here:

- ``.metadata`` goes through an allow-listed unpickler that builds exactly
  the classes DCP writes (``Metadata``, ``TensorStorageMetadata``,
  ``ChunkStorageMetadata``, ``MetadataIndex``, ``_StorageInfo``, ...) and
  refuses any other global with a :class:`~treeckpt.ManifestError` naming the
  file and the class; what it builds is then checked field by field;
- tensor chunks and values are read with ``torch.load(weights_only=True)``;
- file names are checked to stay inside the checkpoint, byte ranges against
  the file sizes, and decompression stops at a bound derived from the
  declared chunk size.

:class:`TorchDcpReader` is the ``StorageReader`` over these functions that
``treeckpt.dcp.FileSystemReader`` (and so ``treeckpt.dcp.load``) uses for
such a directory: planners see DCP's ``Metadata`` rebuilt from the checked
records, and every read goes through the functions below.

The functional API (:func:`read_dcp_metadata`, :func:`read_dcp_tensor`,
:func:`read_dcp_value`, :func:`restore_dcp`, :func:`load_dcp`) reads only the
items a request needs; a request is a :class:`~treeckpt.Box` of the global
tensor, and resharding is box intersection with the stored chunks.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from treeckpt.core.box import Box, full_box
from treeckpt.core.dtypes import dtype_info, torch_dtype, torch_dtype_code
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.tree import map_tree
from treeckpt.errors import (
    CheckpointError,
    CorruptChunkError,
    LeafNotFoundError,
    LoadMismatchError,
    ManifestError,
    PlanError,
)
from treeckpt.formats.torch_dcp.metadata import (
    DcpCheckpoint,
    DcpItem,
    DcpTensor,
    fs_and_root,
    is_dcp_checkpoint,
    read_dcp_metadata,
)
from treeckpt.formats.torch_dcp.protocol import commit_read, done, encode_bytes, stored_box
from treeckpt.shell.tensors import local_shards

__all__ = [
    "MAX_VALUE_BYTES",
    "TorchDcpReader",
    "dcp_flatten",
    "dcp_metadata",
    "load_dcp",
    "nest",
    "read_dcp_tensor",
    "read_dcp_value",
    "restore_dcp",
    "unpickling_reason",
]

MAX_VALUE_BYTES = 1 << 28
"""Largest decoded non-tensor value (a bound on what a zstd stream may expand to)."""
_ITEM_OVERHEAD = 1 << 20  # torch.save's zip framing around a tensor's bytes


# ---------------------------------------------------------------------------------------------
# Reading items


def _read_item(ckpt: DcpCheckpoint, item: DcpItem, fqn: str, limit: int) -> bytes:
    fs, root = fs_and_root(ckpt.path)
    where = f"{ckpt.path}/{item.file}"
    with fs.open(f"{root}/{item.file}", "rb") as f:
        f.seek(item.offset)
        data = f.read(item.length)
    if len(data) != item.length:
        raise CorruptChunkError(
            f"{where}: {fqn!r} is truncated ({len(data)} of {item.length} bytes)"
        )
    for _ in item.transforms:  # only stream.zstd/1 passes the metadata check
        data = _unzstd(data, limit, where, fqn)
    return data


def _unzstd(data: bytes, limit: int, where: str, fqn: str) -> bytes:
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            out = r.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise CorruptChunkError(f"{where}: {fqn!r} does not decompress ({exc})") from None
    if len(out) > limit:
        raise CorruptChunkError(f"{where}: {fqn!r} decompresses to more than {limit} bytes")
    return out


def unpickling_reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that names the class."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Unsupported" in ln or "global" in ln.lower()]
    return (named or lines or [""])[0][:200]


def _safe_load(data: bytes, where: str, fqn: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{where}: {fqn!r} holds an object that needs pickle to load; it is refused "
            f"(only tensors and plain values are read): {unpickling_reason(exc)}"
        ) from None
    except Exception as exc:
        raise CorruptChunkError(f"{where}: {fqn!r} cannot be read: {str(exc)[:200]}") from None


def _chunk_tensor(ckpt: DcpCheckpoint, t: DcpTensor, box: Box, item: DcpItem) -> torch.Tensor:
    where = f"{ckpt.path}/{item.file}"
    limit = box.volume * dtype_info(t.dtype).itemsize + _ITEM_OVERHEAD
    got = _safe_load(_read_item(ckpt, item, t.fqn, limit), where, t.fqn)
    if not isinstance(got, torch.Tensor) or type(got) is not torch.Tensor:
        raise CorruptChunkError(f"{where}: {t.fqn!r} chunk is a {type(got).__name__}, not a tensor")
    if tuple(got.shape) != box.sizes or torch_dtype_code(got.dtype) != t.dtype:
        raise CorruptChunkError(
            f"{where}: {t.fqn!r} chunk is {got.dtype}{list(got.shape)}, the metadata says "
            f"{t.dtype}{list(box.sizes)}"
        )
    return got


def _tensor(ckpt: DcpCheckpoint, fqn: str) -> DcpTensor:
    t = ckpt.tensors.get(fqn)
    if t is None:
        raise LeafNotFoundError(f"{fqn!r} is not a tensor of the DCP checkpoint at {ckpt.path}")
    return t


def read_dcp_tensor(
    ckpt: DcpCheckpoint, fqn: str, box: Box | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The region ``box`` (default: all) of tensor ``fqn``, reading only the chunks it meets.

    ``out`` (a tensor of ``box``'s sizes and the stored dtype) is filled in
    place when given. The chunks were checked to tile the tensor when the
    metadata was read, so every element of ``box`` comes from one of them.
    Raises :class:`~treeckpt.PlanError` when ``box`` lies outside the shape.
    """
    t = _tensor(ckpt, fqn)
    box = box or full_box(t.shape)
    if box.ndim != len(t.shape) or not full_box(t.shape).contains(box):
        raise PlanError(f"{fqn!r}: region {box} lies outside the shape {list(t.shape)}")
    parts = [(b, item, b.intersect(box)) for b, item in t.chunks]  # chunks tile the tensor
    if out is None:
        out = torch.empty(box.sizes, dtype=torch_dtype(t.dtype))
    if box.ndim == 0:
        if not t.chunks:
            raise PlanError(f"{fqn!r}: a 0-d tensor with no stored chunk")
        b, item = t.chunks[0]
        out.copy_(_chunk_tensor(ckpt, t, b, item))
        return out
    done: set[tuple[int, ...]] = set()
    for b, item, common in parts:
        if common is None or common.offsets in done:
            continue  # replicas of one chunk are read once
        done.add(common.offsets)
        src = _chunk_tensor(ckpt, t, b, item)[common.relative_to(b).slices()]
        out[common.relative_to(box).slices()].copy_(src)
    return out


def read_dcp_value(ckpt: DcpCheckpoint, fqn: str) -> Any:
    """A non-tensor value, loaded with ``torch.load(weights_only=True)`` (no code runs)."""
    item = ckpt.values.get(fqn)
    if item is None:
        raise LeafNotFoundError(f"{fqn!r} is not a value of the DCP checkpoint at {ckpt.path}")
    where = f"{ckpt.path}/{item.file}"
    return _safe_load(_read_item(ckpt, item, fqn, MAX_VALUE_BYTES), where, fqn)


def nest(flat: Mapping[str, Any], paths: Mapping[str, tuple[str | int, ...]]) -> dict[str, Any]:
    """The nested state dict DCP flattened: dicts for str keys, lists for int keys."""
    root: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = paths.get(fqn, (fqn,))
        cur: Any = root
        for key, nxt in itertools.pairwise(path):
            cur = _child(cur, key, {} if type(nxt) is str else [], fqn)
        _put(cur, path[-1], value, fqn)
    return root


def _child(cur: Any, key: str | int, default: Any, fqn: str) -> Any:
    if isinstance(cur, dict):
        got = cur.setdefault(key, default)
    else:
        _put(cur, key, None, fqn, keep=True)
        assert isinstance(key, int)
        if cur[key] is None:
            cur[key] = default
        got = cur[key]
    if not isinstance(got, dict | list):
        raise ManifestError(f"{fqn!r}: its path runs through a value")
    return got


def _put(cur: Any, key: str | int, value: Any, fqn: str, keep: bool = False) -> None:
    if isinstance(cur, dict):
        cur[key] = value
        return
    if type(key) is not int:
        raise ManifestError(f"{fqn!r}: a string key inside a list")
    while len(cur) <= key:
        cur.append(None)
    if not keep:
        cur[key] = value


def restore_dcp(path: Any) -> dict[str, Any]:
    """The whole nested state dict of a DCP checkpoint, tensors on CPU."""
    ckpt = read_dcp_metadata(path)
    flat = {
        fqn: read_dcp_tensor(ckpt, fqn) if fqn in ckpt.tensors else read_dcp_value(ckpt, fqn)
        for fqn in ckpt.paths
    }
    return nest(flat, ckpt.paths)


def dcp_flatten(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """DCP's flattening: into dicts, and into lists that hold tensors or containers."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from dcp_flatten(v, (*prefix, k))
    elif isinstance(tree, list | tuple) and any(
        isinstance(v, dict | list | tuple | torch.Tensor) or hasattr(v, "shape") for v in tree
    ):
        for i, v in enumerate(tree):
            yield from dcp_flatten(v, (*prefix, i))
    else:
        yield prefix, tree


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
    cur = root
    for key in path[:-1]:
        cur = cur[key]
    if isinstance(cur, tuple):
        raise CheckpointError(f"{'.'.join(map(str, path))!r}: cannot load a value into a tuple")
    cur[path[-1]] = value


def load_dcp(tree: Any, path: Any, *, strict: bool = True) -> Any:
    """Load a DCP checkpoint into a template ``tree`` in place; returns the loaded tree.

    Like :func:`treeckpt.load`: tensors of the template (plain, DTensor,
    ShardedTensor; any sharding, any world size) are filled in place, each
    rank reading only the chunks its shards meet; values come from the
    checkpoint; ``Stateful`` objects get ``load_state_dict``. Keys are DCP's
    (a list of plain values is one value). Missing and unexpected keys (with
    ``strict``) and shape or dtype mismatches are all reported together
    before anything changes. No collective is needed.
    """
    ckpt = read_dcp_metadata(path)
    statefuls: list[Any] = []

    def to_state(ref: Any) -> Any:
        statefuls.append(ref)
        return ref.obj.state_dict()

    plain = map_tree(tree, lambda fqn, obj: obj, to_state)
    entries = {".".join(map(str, p)): (p, obj) for p, obj in dcp_flatten(plain) if p}
    missing = [f for f in entries if f not in ckpt.paths]
    unexpected = [f for f in ckpt.paths if f not in entries]
    mismatched = []
    for fqn, (_, obj) in entries.items():
        t = ckpt.tensors.get(fqn)
        if fqn not in ckpt.paths or (t is None and not isinstance(obj, torch.Tensor)):
            continue
        if t is None or not isinstance(obj, torch.Tensor):
            what = ("value", "tensor") if t is not None else ("tensor", "value")
            mismatched.append(f"{fqn} (template {what[0]}, checkpoint {what[1]})")
            continue
        code = torch_dtype_code(obj.dtype)
        if (code, tuple(obj.shape)) != (t.dtype, t.shape):
            mismatched.append(
                f"{fqn} (template {code}{list(obj.shape)}, checkpoint {t.dtype}{list(t.shape)})"
            )
    if mismatched or (strict and (missing or unexpected)):
        raise LoadMismatchError(
            missing=missing if strict else (),
            unexpected=unexpected if strict else (),
            mismatched=mismatched,
        )
    for fqn, (p, obj) in entries.items():
        if fqn in ckpt.tensors:
            rec = TensorLeaf(lib="torch", dtype=ckpt.tensors[fqn].dtype, shape=tuple(obj.shape))
            _, pairs = local_shards(fqn, obj, rec)
            for box, local in pairs:
                if box.ndim and box.is_empty():
                    continue
                with torch.no_grad():
                    local.copy_(read_dcp_tensor(ckpt, fqn, box).view(local.shape))
        elif fqn in ckpt.values:
            _set(plain, p, read_dcp_value(ckpt, fqn))
    for ref in statefuls:
        sub = plain
        for key in ref.path:
            sub = sub[key]
        ref.obj.load_state_dict(sub)
        if ref.path:
            _set(plain, tuple(ref.path), ref.obj)
        else:
            plain = ref.obj
    return plain


# ---------------------------------------------------------------------------------------------
# DCP's storage-reader protocol over the functions above


def dcp_metadata(ckpt: DcpCheckpoint) -> Metadata:
    """DCP's ``Metadata`` for a checked checkpoint, rebuilt from its records (``storage_data``
    is the :class:`DcpCheckpoint`)."""
    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn in ckpt.paths:
        t = ckpt.tensors.get(fqn)
        if t is None:
            entries[fqn] = BytesStorageMetadata()
            continue
        boxes = {b.offsets: b for b, _ in t.chunks}  # a replica is one chunk
        entries[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=torch_dtype(t.dtype)),
            size=torch.Size(t.shape),
            chunks=[
                ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes))
                for b in boxes.values()
            ],
        )
    return Metadata(
        state_dict_metadata=entries,
        planner_data=dict(ckpt.paths),
        storage_data=ckpt,
        storage_meta=StorageMeta(checkpoint_id=ckpt.path),
        version=ckpt.version,
    )


class TorchDcpReader(StorageReader):
    """A ``StorageReader`` for a directory torch's DCP wrote, reading it without pickle.

    ``read_metadata`` checks ``.metadata`` (:func:`read_dcp_metadata`); tensor
    items are regions read with :func:`read_dcp_tensor` (only the chunks they
    meet, so any planner's resharding works); values are read with
    :func:`read_dcp_value` and handed to the planner as ``torch.save`` bytes
    of the checked value. Nothing is cast: a dtype the destination does not
    have is a :class:`~treeckpt.LoadMismatchError`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.ckpt: DcpCheckpoint | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.ckpt = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.ckpt = read_dcp_metadata(self.path)
        return dcp_metadata(self.ckpt)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(metadata.storage_data, DcpCheckpoint):
            self.ckpt = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.ckpt is None:
            self.ckpt = read_dcp_metadata(self.path)
        ckpt = self.ckpt
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, encode_bytes(fqn, read_dcp_value(ckpt, fqn)))
                continue
            commit_read(planner, item, read_dcp_tensor(ckpt, fqn, stored_box(item)))
        return done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_dcp_checkpoint(checkpoint_id)

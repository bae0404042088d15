"""Writing torch's formats a tensor at a time: ``torch.save`` files and DCP checkpoints.

A conversion opens its source as a *lazy tree*: the saved nesting with a
:class:`LazyTensor` (fqn, dtype, shape) where each tensor was and the plain
values inline, plus a ``fetch(fqn)`` that reads one tensor. The writers walk
that tree and fetch, write and drop one tensor at a time, so memory holds the
largest tensor, not the whole state.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem as _fs
from torch.distributed.checkpoint import metadata as _md

from treeckpt.core.box import full_box
from treeckpt.core.dtypes import torch_dtype
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.options import LoadOptions
from treeckpt.core.tree import build_tree
from treeckpt.errors import CheckpointError
from treeckpt.formats.torch_dcp.metadata import is_dcp_checkpoint, read_dcp_metadata
from treeckpt.formats.torch_dcp.reader import (
    dcp_flatten,
    nest,
    read_dcp_tensor,
    read_dcp_value,
)
from treeckpt.shell.load import read_regions, read_stored, value_of
from treeckpt.shell.tensors import allocate
from treeckpt.store.backends import open_backend
from treeckpt.store.reader import read_manifest

__all__ = ["LazyTensor", "open_lazy", "write_dcp", "write_torch_save"]

Fetch = Callable[[str], torch.Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class LazyTensor:
    """Where a tensor stands in a lazy tree; ``fetch(fqn)`` reads it."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]


@contextmanager
def open_lazy(path: Any) -> Iterator[tuple[Any, Fetch]]:
    """The lazy tree and fetch function of a checkpoint in treeckpt's or torch DCP's format."""
    if is_dcp_checkpoint(path):
        ckpt = read_dcp_metadata(path)
        flat = {
            fqn: LazyTensor(fqn=fqn, dtype=ckpt.tensors[fqn].dtype, shape=ckpt.tensors[fqn].shape)
            if fqn in ckpt.tensors
            else read_dcp_value(ckpt, fqn)
            for fqn in ckpt.paths
        }
        yield nest(flat, ckpt.paths), lambda fqn: read_dcp_tensor(ckpt, fqn)
        return
    backend = open_backend(str(path))
    try:
        manifest = read_manifest(backend)
        stored = read_stored(backend, manifest)

        def leaf(fqn: str) -> Any:
            rec = manifest.records[fqn]
            if isinstance(rec, TensorLeaf):
                return LazyTensor(fqn=fqn, dtype=rec.dtype, shape=rec.shape)
            return value_of(fqn, rec, allow_pickle=False)

        def fetch(fqn: str) -> torch.Tensor:
            rec = manifest.records[fqn]
            assert isinstance(rec, TensorLeaf)
            out = allocate(TensorLeaf(lib="torch", dtype=rec.dtype, shape=rec.shape), fqn)
            read_regions(
                backend, manifest, stored, {fqn: [(full_box(rec.shape), out)]}, LoadOptions()
            )
            assert isinstance(out, torch.Tensor)
            return out

        yield _plain(build_tree(manifest.structure, leaf)), fetch
    finally:
        backend.close()


def _plain(obj: Any) -> Any:
    """Containers torch can pickle without our classes: namedtuples become tuples, dataclasses dicts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type | LazyTensor):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj


# ---------------------------------------------------------------------------------------------
# torch.save, streamed


class _StorageRef:
    """A storage to be written later: its record key, dtype, element count and source."""

    __slots__ = ("dtype", "key", "lazy", "numel", "tensor")

    def __init__(
        self, key: str, dtype: torch.dtype, numel: int, lazy: LazyTensor | None, tensor: Any
    ) -> None:
        self.key, self.dtype, self.numel, self.lazy, self.tensor = key, dtype, numel, lazy, tensor


class _Pickler(pickle.Pickler):
    """Pickles a lazy tree as ``torch.save`` would pickle the real one, recording storages.

    Dtypes with a typed storage class (float32, bfloat16, ...) go through
    ``_rebuild_tensor_v2``; the others (float8, uint16/32/64, complex32) as
    an untyped storage through ``_rebuild_tensor_v3``, as ``torch.save`` does.
    """

    def __init__(self, buf: io.BytesIO) -> None:
        super().__init__(buf, protocol=2)
        self.storages: list[_StorageRef] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, LazyTensor):
            dtype, shape, lazy, tensor = torch_dtype(obj.dtype), obj.shape, obj, None
        elif type(obj) is torch.Tensor:
            tensor = obj.detach()
            dtype, shape, lazy = tensor.dtype, tuple(tensor.shape), None
        else:
            return NotImplemented
        ref = _StorageRef(str(len(self.storages)), dtype, math.prod(shape), lazy, tensor)
        self.storages.append(ref)
        stride = torch.empty(shape, dtype=dtype, device="meta").stride()
        args: tuple[Any, ...] = (
            ref,
            0,
            torch.Size(shape),
            stride,
            False,
            collections.OrderedDict(),
        )
        if dtype in torch.storage._dtype_to_storage_type_map():
            return (torch._utils._rebuild_tensor_v2, args)
        return (torch._utils._rebuild_tensor_v3, (*args, dtype))

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, _StorageRef):
            return None
        names = torch.storage._dtype_to_storage_type_map()
        if obj.dtype in names:
            return ("storage", getattr(torch, names[obj.dtype]), obj.key, "cpu", obj.numel)
        nbytes = obj.numel * torch.empty((), dtype=obj.dtype).element_size()
        return ("storage", torch.UntypedStorage, obj.key, "cpu", nbytes)


def write_torch_save(tree: Any, fetch: Fetch, path: Any) -> None:
    """Write ``tree`` as a ``torch.save`` file, fetching one tensor at a time.

    The file is the one ``torch.save`` writes (same records, in the same
    order: ``data.pkl``, format records, then one storage per tensor), so
    ``torch.load`` reads it, with ``weights_only=True`` and ``mmap=True``.
    It is written to a temporary name, fsynced and renamed into place.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(tree)
    data = buf.getvalue()
    dst = Path(path)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with torch.serialization._open_zipfile_writer(str(tmp)) as opened:  # as torch.save
            zf = opened
            zf.write_record("data.pkl", data, len(data))
            zf.write_record(".format_version", "1", 1)
            align = str(torch.serialization._get_storage_alignment())
            zf.write_record(".storage_alignment", align, len(align))
            zf.write_record("byteorder", sys.byteorder, len(sys.byteorder))
            for ref in pickler.storages:
                t = fetch(ref.lazy.fqn) if ref.lazy else ref.tensor
                assert t is not None
                t = t.detach().cpu().contiguous()
                storage = t.untyped_storage()
                if t.storage_offset() or storage.nbytes() != t.numel() * t.element_size():
                    t = t.clone()
                    storage = t.untyped_storage()
                zf.write_record(f"data/{ref.key}", storage, storage.nbytes())
                del t, storage
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        _sync_dir(dst.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# torch DCP format


def write_dcp(tree: Any, fetch: Fetch, path: Any) -> None:
    """Write a checkpoint in torch DCP's own format (``.metadata`` + ``__0_0.distcp``).

    What ``torch.distributed.checkpoint.load`` (and ``FileSystemReader``)
    reads: each tensor one chunk, stored with ``torch.save``; each value a
    bytes item. Tuples become lists (DCP's nesting has dicts and lists only).
    ``.metadata`` is written last, by an atomic rename, after the data is
    fsynced. Local paths only.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if (root / ".metadata").exists():
        raise CheckpointError(
            f"{root}: a DCP checkpoint already exists there; pick an empty directory"
        )
    data_name = "__0_0.distcp"
    sd_md: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    planner: dict[str, tuple[Any, ...]] = {}
    with open(root / data_name, "wb") as f:
        for key_path, obj in dcp_flatten(tree):
            fqn = ".".join(str(k) for k in key_path)
            if fqn in planner:
                raise CheckpointError(f"{fqn!r}: two paths give this DCP key")
            planner[fqn] = key_path
            buf = io.BytesIO()
            if isinstance(obj, LazyTensor | torch.Tensor):
                t = (
                    (fetch(obj.fqn) if isinstance(obj, LazyTensor) else obj)
                    .detach()
                    .cpu()
                    .contiguous()
                )
                if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    t = t.clone()
                torch.save(t, buf)
                offsets = torch.Size([0] * t.dim())
                sd_md[fqn] = _md.TensorStorageMetadata(
                    properties=_md.TensorProperties(dtype=t.dtype),
                    size=t.size(),
                    chunks=[_md.ChunkStorageMetadata(offsets=offsets, sizes=t.size())],
                )
                index = _md.MetadataIndex(fqn=fqn, offset=offsets, index=0)
                del t
            else:
                torch.save(obj, buf)
                sd_md[fqn] = _md.BytesStorageMetadata()
                index = _md.MetadataIndex(fqn=fqn)
            storage[index] = _fs._StorageInfo(
                relative_path=data_name, offset=f.tell(), length=buf.getbuffer().nbytes
            )
            f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    md = _md.Metadata(
        state_dict_metadata=sd_md,
        planner_data=planner,
        storage_data=storage,
        storage_meta=_md.StorageMeta(save_id=uuid.uuid4().hex),
        version="1.0.0",
    )
    tmp = root / f".metadata.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        pickle.dump(md, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / ".metadata")
    _sync_dir(root)

"""Consolidate a sharded checkpoint into one ``torch.load``-able file, streaming.

The output is written in torch's own zip format in two passes: first
``torch.save`` of the whole tree with every tensor a ``FakeTensor`` of the
right shape and dtype under ``torch.serialization.skip_data`` (the pickle,
the zip headers and a hole for each tensor's bytes; no tensor memory), then
each hole is filled with ``pwrite`` from slabs read from the checkpoint. A
slab is a run of whole leading-dimension rows of one tensor (contiguous in the
output) of at most ``max_memory`` bytes, so the memory held is the budget
(plus one stored chunk being decoded), not the checkpoint size.

Sources: treeckpt checkpoints (any writer count) and checkpoints in torch's
DCP format (what plain Lightning writes with ``ModelParallelStrategy`` or
``FSDPStrategy(state_dict_type="sharded")``). A Lightning checkpoint comes
out in Lightning's layout: ``state_dict`` with the module's FQNs,
``optimizer_states`` (a list) and the other keys of the checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from treeckpt.core.box import Box
from treeckpt.core.dtypes import dtype_info, torch_dtype
from treeckpt.core.leaves import PickleLeaf, TensorLeaf
from treeckpt.core.options import LoadOptions
from treeckpt.core.tree import build_tree
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, OptionsError
from treeckpt.shell.load import read_regions, read_stored, value_of
from treeckpt.store.backends import open_backend
from treeckpt.store.layout import MANIFEST
from treeckpt.store.reader import read_manifest

__all__ = ["DEFAULT_MAX_MEMORY", "ConsolidateReport", "consolidate"]

DEFAULT_MAX_MEMORY = 1 << 30
"""Default budget for tensor data held at once: 1 GiB."""

_ALIGN = 64  # slabs in the buffer start at this alignment (any dtype can view them)
_LIGHTNING_META = "meta.pt"  # what Lightning writes beside a DCP checkpoint
_DCP_METADATA = ".metadata"

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, called as tensor bytes are written."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsolidateReport:
    """What one consolidation did."""

    src: str
    dst: str
    source_format: str  # "treeckpt" or "dcp"
    tensors: int
    tensor_bytes: int  # bytes of tensor data written
    bytes_written: int  # size of the output file
    max_memory: int
    largest_read: int  # largest slab (or, for DCP, batch of tensors) held at once
    seconds: float


# ------------------------------------------------------------------ sources


class _Source(Protocol):
    """A checkpoint to consolidate: its tree, and its tensors read region by region."""

    format: str

    def skeleton(self) -> tuple[Any, dict[str, TensorLeaf]]:
        """The tree with each tensor replaced by a ``_Hole(fqn)``, and each tensor's record."""
        ...

    def read(self, requests: list[tuple[str, Box, torch.Tensor]]) -> None:
        """Fill each ``out`` tensor with the region ``box`` of tensor ``fqn``."""
        ...

    def whole_tensors_only(self) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Hole:
    fqn: str


class _TreeckptSource:
    format = "treeckpt"

    def __init__(self, path: str) -> None:
        self.backend = open_backend(path)
        try:
            self.manifest = read_manifest(self.backend)
            self.stored = read_stored(self.backend, self.manifest)
        except BaseException:
            self.backend.close()
            raise

    def skeleton(self) -> tuple[Any, dict[str, TensorLeaf]]:
        records: dict[str, TensorLeaf] = {}

        def leaf(fqn: str) -> Any:
            rec = self.manifest.records[fqn]
            if isinstance(rec, TensorLeaf):
                records[fqn] = rec
                return _Hole(fqn)
            if isinstance(rec, PickleLeaf):
                raise CheckpointError(
                    f"{fqn!r} was saved with pickle; a consolidated file is loaded with "
                    "torch.load(weights_only=True) and cannot hold it"
                )
            return value_of(fqn, rec, allow_pickle=False)

        return build_tree(self.manifest.structure, leaf), records

    def read(self, requests: list[tuple[str, Box, torch.Tensor]]) -> None:
        regions: dict[str, list[tuple[Box, Any]]] = {}
        for fqn, box, out in requests:
            regions.setdefault(fqn, []).append((box, out))
        read_regions(self.backend, self.manifest, self.stored, regions, LoadOptions())

    def whole_tensors_only(self) -> bool:
        return False

    def close(self) -> None:
        self.backend.close()


def open_dcp_source(path: str) -> _Source:
    """The reader for a checkpoint in torch's DCP format: treeckpt's pickle-free one.

    ``.metadata`` is read by an allow-listed unpickler that accepts only the
    classes DCP writes, and stored values with ``torch.load(weights_only=True)``,
    so nothing in the checkpoint runs code. Tensors are read region by region
    (only the stored chunks a region meets), like a treeckpt checkpoint's.
    """
    return _TorchDcpSource(path)


class _TorchDcpSource:
    format = "dcp"

    def __init__(self, path: str) -> None:
        from treeckpt.formats.torch_dcp import read_dcp_metadata

        self.ckpt = read_dcp_metadata(path)

    def skeleton(self) -> tuple[Any, dict[str, TensorLeaf]]:
        from treeckpt.formats.torch_dcp import nest, read_dcp_value

        records: dict[str, TensorLeaf] = {}
        flat: dict[str, Any] = {}
        for fqn in self.ckpt.fqns:
            t = self.ckpt.tensors.get(fqn)
            if t is None:
                flat[fqn] = read_dcp_value(self.ckpt, fqn)
            else:
                records[fqn] = TensorLeaf(lib="torch", dtype=t.dtype, shape=t.shape)
                flat[fqn] = _Hole(fqn)
        return nest(flat, self.ckpt.paths), records

    def read(self, requests: list[tuple[str, Box, torch.Tensor]]) -> None:
        from treeckpt.formats.torch_dcp import read_dcp_tensor

        for fqn, box, out in requests:
            read_dcp_tensor(self.ckpt, fqn, box, out=out)

    def whole_tensors_only(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _open_source(src: str) -> _Source:
    local = "://" not in src or src.startswith("file://")
    path = src[len("file://") :] if src.startswith("file://") else src
    backend = open_backend(src)
    try:
        has_manifest = backend.size(MANIFEST) is not None
        has_dcp = backend.size(_DCP_METADATA) is not None
        listing = backend.size("") is not None or bool(backend.listdir())
    finally:
        backend.close()
    if has_manifest:
        return _TreeckptSource(src)
    if has_dcp:
        if not local:
            raise OptionsError(f"{src}: DCP-format checkpoints are read from local paths only")
        return open_dcp_source(path)
    if not listing:
        raise CheckpointNotFoundError(f"{src}: no checkpoint there")
    return _TreeckptSource(src)  # raises the precise error (incomplete, not found)


# ------------------------------------------------------------------ layout


def _lightning_layout(tree: Any, meta: dict[str, Any] | None) -> Any:
    """Lightning's checkpoint layout from a DCP checkpoint Lightning wrote.

    Lightning's strategies save ``model`` (FSDP) or ``state_dict``
    (ModelParallel) and ``optimizer_0``, ``optimizer_1``... with DCP, and the
    other keys with ``torch.save`` into ``meta.pt``; the loaded checkpoint
    has ``state_dict`` and an ``optimizer_states`` list.
    """
    if meta is None or not isinstance(tree, dict):
        return tree
    out: dict[str, Any] = dict(meta)
    out["state_dict"] = tree.get("state_dict", tree.get("model", {}))
    opt_keys = sorted(
        (k for k in tree if isinstance(k, str) and re.fullmatch(r"optimizer_[0-9]+", k)),
        key=lambda k: int(k.split("_")[1]),
    )
    if opt_keys:
        out["optimizer_states"] = [tree[k] for k in opt_keys]
    for k, v in tree.items():
        if k not in ("state_dict", "model") and k not in opt_keys:
            out[k] = v
    return out


def _plain(obj: Any) -> Any:
    """Containers ``torch.load(weights_only=True)`` accepts: namedtuples become
    tuples, dataclasses dicts, defaultdicts dicts, deques lists."""
    if isinstance(obj, _Hole):
        return obj
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, (list, collections.deque)):
        return [_plain(v) for v in obj]
    return obj


def _fill_fakes(tree: Any, records: dict[str, TensorLeaf]) -> Any:
    """Replace each hole by a FakeTensor of the stored shape and dtype (no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fakes = {
            fqn: torch.empty(rec.shape, dtype=torch_dtype(rec.dtype))
            for fqn, rec in records.items()
        }
    return _map_holes(tree, lambda h: fakes[h.fqn])


def _map_holes(obj: Any, fn: Callable[[_Hole], Any]) -> Any:
    if isinstance(obj, _Hole):
        return fn(obj)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _map_holes(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _map_holes(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_holes(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_holes(v, fn) for v in obj]
    return obj


def _holes_with_tensors(skeleton: Any, loaded: Any) -> Iterator[tuple[str, Any]]:
    """(fqn, loaded fake tensor) pairs, walking the skeleton and torch.load's tree together."""
    if isinstance(skeleton, _Hole):
        yield skeleton.fqn, loaded
    elif isinstance(skeleton, dict):
        for k, v in skeleton.items():
            yield from _holes_with_tensors(v, loaded[k])
    elif isinstance(skeleton, (list, tuple)):
        for v, w in zip(skeleton, loaded, strict=True):
            yield from _holes_with_tensors(v, w)


# ------------------------------------------------------------------ slabs


def _slabs(shape: tuple[int, ...], itemsize: int, budget: int) -> Iterator[tuple[Box, int]]:
    """Boxes covering ``shape`` in row-major order, each contiguous in memory and
    at most ``budget`` bytes (one element at least), with their byte offset."""
    ndim = len(shape)
    if ndim == 0 or math.prod(shape) == 0:
        yield Box(offsets=(0,) * ndim, sizes=shape), 0
        return
    strides = [itemsize * math.prod(shape[d + 1 :]) for d in range(ndim)]

    def rec(prefix: tuple[int, ...]) -> Iterator[tuple[Box, int]]:
        d = len(prefix)
        row = strides[d]  # bytes of one index along dim d, with the rest full
        base = sum(i * s for i, s in zip(prefix, strides, strict=False))
        if row <= budget or d == ndim - 1:
            step = max(1, budget // row)
            for start in range(0, shape[d], step):
                n = min(step, shape[d] - start)
                yield (
                    Box(
                        offsets=(*prefix, start) + (0,) * (ndim - d - 1),
                        sizes=(1,) * d + (n,) + shape[d + 1 :],
                    ),
                    base + start * row,
                )
        else:
            for i in range(shape[d]):
                yield from rec((*prefix, i))

    yield from rec(())


# ------------------------------------------------------------------ consolidate


def consolidate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    max_memory: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConsolidateReport:
    """Write the checkpoint at ``src`` as one file that ``torch.load`` reads, on CPU.

    Args:
        src: a treeckpt checkpoint (path or fsspec URL), or a local folder in
            torch's DCP format (as plain Lightning writes it).
        dst: the output file; default ``src`` with ``.consolidated`` appended
            (Lightning's name). Written to a temporary name beside it, fsynced,
            then moved into place: a failed run leaves no partial output.
        max_memory: bytes of tensor data held at once (default 1 GiB). Tensors
            larger than this are copied in slabs of whole rows; DCP-format
            sources are read a whole tensor at a time.
        overwrite: replace an existing ``dst`` (refused by default).
        progress: called with ``(done_bytes, total_bytes)`` as data is written.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
        CheckpointError: ``src`` is not a readable checkpoint, or holds a pickled leaf.
    """
    t0 = time.perf_counter()
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if type(budget) is not int or budget < 1:
        raise OptionsError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    src_s = os.fspath(src)
    if dst is None:
        if "://" in src_s and not src_s.startswith("file://"):
            raise OptionsError(f"{src_s}: give the output file for a remote checkpoint")
        dst_s = src_s.removeprefix("file://").rstrip("/") + ".consolidated"
    else:
        dst_s = os.fspath(dst)
    if os.path.lexists(dst_s) and not overwrite:
        raise FileExistsError(
            f"{dst_s} exists; choose another output file or pass overwrite=True (--overwrite)"
        )
    parent = os.path.dirname(os.path.abspath(dst_s))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{dst_s}: the output's folder {parent} does not exist")
    source = _open_source(src_s)
    tmp = str(Path(dst_s).with_name(f".{Path(dst_s).name}.tmp-{uuid.uuid4().hex[:8]}"))
    try:
        skeleton, records = source.skeleton()
        meta = _read_lightning_meta(src_s) if source.format == "dcp" else None
        skeleton = _plain(_lightning_layout(skeleton, meta))
        tensor_bytes, largest = _write(source, skeleton, records, tmp, budget, progress)
        if overwrite:
            os.replace(tmp, dst_s)
        else:
            try:
                os.link(tmp, dst_s)  # fails if dst appeared meanwhile: never clobbered
            except FileExistsError:
                raise FileExistsError(
                    f"{dst_s} appeared while consolidating; not replaced"
                ) from None
            os.unlink(tmp)
        _sync_dir(dst_s)
    finally:
        source.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ConsolidateReport(
        src=src_s,
        dst=dst_s,
        source_format=source.format,
        tensors=len(records),
        tensor_bytes=tensor_bytes,
        bytes_written=os.path.getsize(dst_s),
        max_memory=budget,
        largest_read=largest,
        seconds=time.perf_counter() - t0,
    )


def _read_lightning_meta(src: str) -> dict[str, Any] | None:
    path = Path(src) / _LIGHTNING_META
    if not path.is_file():
        return None
    try:
        meta = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read Lightning's metadata with torch.load(weights_only=True): {exc}"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: Lightning's metadata is not a dict")
    return meta


def _write(
    source: _Source,
    skeleton: Any,
    records: dict[str, TensorLeaf],
    tmp: str,
    budget: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Pass 1: the file with holes; pass 2: fill them. Returns (tensor bytes, largest read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(_fill_fakes(skeleton, records), tmp)
    with FakeTensorMode():
        back = torch.load(tmp, weights_only=True, map_location="cpu")
    offsets = {
        fqn: int(t.untyped_storage()._checkpoint_offset)
        for fqn, t in _holes_with_tensors(skeleton, back)
    }
    total = sum(_nbytes(rec) for rec in records.values())
    done = largest = 0
    batch: list[tuple[str, Box, torch.Tensor, int]] = []
    batch_bytes = 0
    arena = torch.empty(min(budget, total), dtype=torch.uint8)
    fd = os.open(tmp, os.O_WRONLY)
    try:

        def flush() -> None:
            nonlocal batch, batch_bytes, done, largest
            if not batch:
                return
            largest = max(largest, batch_bytes)
            source.read([(f, b, t) for f, b, t, _ in batch])
            for _, _, t, pos in batch:
                data = t.reshape(-1).view(torch.uint8).numpy()
                view = memoryview(data.data)
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
                done += data.nbytes
            batch, batch_bytes = [], 0
            if progress is not None:
                progress(done, total)

        for fqn, rec in records.items():
            itemsize = dtype_info(rec.dtype).itemsize
            dtype = torch_dtype(rec.dtype)
            slabs = (
                [(Box(offsets=(0,) * len(rec.shape), sizes=rec.shape), 0)]
                if source.whole_tensors_only()
                else _slabs(rec.shape, itemsize, budget)
            )
            for box, rel in slabs:
                n = math.prod(box.sizes) * itemsize
                start = -(-batch_bytes // _ALIGN) * _ALIGN
                if start + n > arena.numel():
                    flush()
                    start = 0
                if n <= arena.numel():
                    # A view of the one buffer: no allocation per slab, so the
                    # allocator cannot pile up freed blocks beyond the budget.
                    buf = arena[start : start + n].view(dtype).reshape(box.sizes)
                else:  # one element, or one whole DCP tensor, larger than the budget
                    buf = torch.empty(box.sizes, dtype=dtype)
                batch.append((fqn, box, buf, offsets[fqn] + rel))
                batch_bytes = start + n
        flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    return done, largest


def _nbytes(rec: TensorLeaf) -> int:
    return math.prod(rec.shape) * dtype_info(rec.dtype).itemsize


def _sync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Tensor leaves to shard specs, byte sources and byte destinations.

This is where torch tensors and numpy arrays meet the byte-level store: a
chunk's raw bytes are a zero-copy uint8 view of the tensor's memory whenever
the chunk is a contiguous run of a contiguous CPU tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from treeckpt.core.box import Box, full_box
from treeckpt.core.dtypes import dtype_info, numpy_dtype_code, torch_dtype, torch_dtype_code
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.specs import ShardSpec
from treeckpt.errors import CheckpointError, UnsupportedLeafError
from treeckpt.shell.sharded import adapter_of
from treeckpt.shell.transfer import DeviceChunk, Uploads, device_for

__all__ = [
    "Converter",
    "Destination",
    "allocate",
    "chunk_source",
    "destination",
    "dtype_code",
    "local_shards",
    "on_meta",
]

Bytes1D = npt.NDArray[np.uint8]


def local_shards(fqn: str, obj: Any, rec: TensorLeaf) -> tuple[ShardSpec, list[tuple[Box, Any]]]:
    """The spec of what this rank holds of ``obj``, and (global box, local tensor) pairs.

    The tensor's adapter (``shell/sharded.py``) gives the pairs: a plain
    tensor is held whole, a DTensor's local shard is placed by
    ``__create_chunk_list__``, a ShardedTensor lists its local shards; a
    numpy array is held whole. The local tensors share memory with ``obj``,
    so a load fills them in place.

    Raises:
        UnsupportedLeafError: the shards cannot be described, or a local tensor
            is on the meta device (the FQN is named).
    """
    adapter = adapter_of(obj)
    if adapter is None:
        pairs: list[tuple[Box, Any]] = [(full_box(rec.shape), obj)]
    else:
        try:
            pairs = adapter.local_shards(fqn, obj)
        except UnsupportedLeafError:
            raise
        except Exception as exc:
            raise UnsupportedLeafError(f"{fqn!r}: cannot describe its shards: {exc}") from exc
    if _any_meta(pairs):
        raise UnsupportedLeafError(
            f"{fqn!r}: a tensor on the meta device holds no data to save; materialise it "
            "first (e.g. module.to_empty(device=...) and initialise it)"
        )
    spec = ShardSpec(fqn=fqn, dtype=rec.dtype, shape=rec.shape, boxes=tuple(b for b, _ in pairs))
    return spec, pairs


def _any_meta(pairs: list[tuple[Box, Any]]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_meta for _, t in pairs)


def on_meta(obj: Any) -> bool:
    """True when a local tensor of ``obj`` is on the meta device (no memory to load into).

    The same adapters as :func:`local_shards` find the local tensors; an
    object they cannot describe is left for :func:`local_shards` to refuse.
    """
    adapter = adapter_of(obj)
    if adapter is None:
        return False
    try:
        return _any_meta(adapter.local_shards("", obj))
    except Exception:
        return False


def _as_bytes(t: torch.Tensor) -> Bytes1D:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def chunk_source(data: Any, shard: Box, chunk: Box) -> Callable[[], Bytes1D]:
    """A function giving the raw bytes of region ``chunk`` of the local ``data`` (region ``shard``).

    For a tensor on a device it is a :class:`~treeckpt.shell.transfer.DeviceChunk`,
    which a writer lane copies through its reused host buffers.
    """
    slices = chunk.relative_to(shard).slices()
    if isinstance(data, torch.Tensor) and (device := device_for(data)) is not None:
        return DeviceChunk(device, data[slices] if slices else data, device.point(data))

    def source() -> Bytes1D:
        if isinstance(data, torch.Tensor):
            return _as_bytes(data[slices] if slices else data)
        arr = np.asarray(data)
        sub = np.ascontiguousarray(arr[slices] if slices else arr)
        return sub.reshape(-1).view(np.uint8)

    return source


class Destination:
    """Where a tensor's bytes land, as a uint8 array of shape ``(*shape, itemsize)``.

    A contiguous CPU tensor or array is written in place. Any other (a CUDA
    tensor, a non-contiguous view) is filled through a host staging buffer
    that is allocated on the first read into it, copied into the real
    destination by :meth:`finish` as soon as its last chunk has landed (so a
    host-to-device copy overlaps with reading the rest), and dropped then: a
    load holds staging memory only for the tensors it is filling at the time,
    not for the whole state.
    """

    __slots__ = ("_alloc", "_array", "_byte_shape", "_copy", "_lock")

    def __init__(
        self,
        byte_shape: tuple[int, ...],
        array: npt.NDArray[np.uint8] | None = None,
        copy: Callable[[npt.NDArray[np.uint8]], None] | None = None,
        alloc: Callable[[], npt.NDArray[np.uint8]] | None = None,
    ) -> None:
        self._byte_shape = byte_shape
        self._array = array
        self._copy = copy
        self._alloc = alloc  # the staging buffer's allocation (default: a fresh array)
        self._lock = threading.Lock()

    @property
    def staged(self) -> bool:
        return self._copy is not None

    def array(self) -> npt.NDArray[np.uint8]:
        """The bytes to write into (allocating the staging buffer on first use)."""
        arr = self._array
        if arr is not None:
            return arr
        with self._lock:
            if self._array is None:
                self._array = (
                    np.empty(self._byte_shape, dtype=np.uint8)
                    if self._alloc is None
                    else self._alloc()
                )
            return self._array

    def finish(self) -> None:
        """Copy staged bytes into the real destination and drop the staging buffer."""
        if self._copy is None:
            return
        with self._lock:
            arr, self._array = self._array, None
        if arr is not None:
            self._copy(arr)


def destination(
    obj: Any, dtype: str, shape: tuple[int, ...], uploads: Uploads | None = None
) -> Destination:
    """Byte view of a local tensor or array to load into, in place when possible.

    With ``uploads``, a tensor on a device is staged in a pooled host buffer
    (pinned for CUDA) and copied to the device without waiting
    (:class:`~treeckpt.shell.transfer.Uploads`; the load waits for it).
    """
    itemsize = dtype_info(dtype).itemsize
    byte_shape = (*shape, itemsize)
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        device = device_for(t)
        if (
            device is None
            and t.device.type == "cpu"
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        ):
            return Destination(
                byte_shape, array=t.reshape(-1).view(torch.uint8).numpy().reshape(byte_shape)
            )
        if device is not None and uploads is not None:
            alloc, upload = uploads.parts(device, t, byte_shape)
            return Destination(byte_shape, copy=upload, alloc=alloc)

        def copy_tensor(staged: npt.NDArray[np.uint8]) -> None:
            src = torch.from_numpy(staged).view(t.dtype).view(t.shape)
            with torch.no_grad():
                t.copy_(src)

        return Destination(byte_shape, copy=copy_tensor)
    assert isinstance(obj, np.ndarray)
    if obj.flags.c_contiguous and obj.flags.writeable:
        return Destination(byte_shape, array=obj.reshape(-1).view(np.uint8).reshape(byte_shape))

    def copy_array(staged: npt.NDArray[np.uint8]) -> None:
        np.copyto(obj, staged.reshape(-1).view(obj.dtype).reshape(obj.shape))

    return Destination(byte_shape, copy=copy_array)


def dtype_code(obj: Any) -> str | None:
    """The format's code of the dtype of a local tensor or array (``None``: not in the table)."""
    if isinstance(obj, torch.Tensor):
        return torch_dtype_code(obj.dtype)
    if isinstance(obj, np.ndarray):
        return numpy_dtype_code(obj.dtype)
    return None


class Converter:
    """A destination of another dtype than the stored one: each region is converted as it lands.

    The stored bytes of a region are viewed in their own dtype and copied
    into the matching region of the local tensor by torch's ``copy_``, which
    converts (for the exact conversions of ``core/widening.py`` every value
    is kept; for a lossy one allowed by name it rounds to nearest even,
    truncates floats toward zero into integers and wraps integers). No
    buffer of the whole tensor is allocated: only the decoded chunk exists
    in the stored dtype. Works for CPU and device tensors, contiguous or not.
    """

    __slots__ = ("_src_dtype", "_target")

    staged = False

    def __init__(self, obj: Any, stored_dtype: str) -> None:
        self._src_dtype = torch_dtype(stored_dtype)
        if isinstance(obj, torch.Tensor):
            self._target = obj.detach()
        else:
            assert isinstance(obj, np.ndarray)
            self._target = torch.from_numpy(obj)

    def write_region(self, dst: Box, piece: npt.NDArray[np.uint8]) -> None:
        if not piece.flags.writeable:  # torch.from_numpy warns about read-only arrays
            piece = piece.copy()
        src = torch.from_numpy(piece).view(self._src_dtype).squeeze(-1)
        region = self._target[dst.slices()] if dst.ndim else self._target
        with torch.no_grad():
            region.copy_(src)

    def finish(self) -> None:
        """Nothing to do: every region was converted as it landed."""


def allocate(rec: TensorLeaf, fqn: str = "") -> Any:
    """A fresh, uninitialised leaf for ``rec`` (torch tensor, numpy array or numpy scalar).

    A torch tensor is made an ``nn.Parameter`` and given ``requires_grad`` as
    recorded (it is filled through a detached view, so autograd never sees
    the load).

    Raises CheckpointError (not a bare RuntimeError or MemoryError) when the
    declared shape cannot be allocated: shapes come from the manifest.
    """
    try:
        if rec.lib == "torch":
            t = torch.empty(rec.shape, dtype=torch_dtype(rec.dtype))
            if rec.parameter:
                return torch.nn.Parameter(t, requires_grad=rec.requires_grad)
            return t.requires_grad_(True) if rec.requires_grad else t
        np_name = dtype_info(rec.dtype).numpy
        assert np_name is not None
        return np.empty(rec.shape, dtype=np.dtype(np_name))
    except (RuntimeError, MemoryError, ValueError) as exc:
        raise CheckpointError(
            f"{fqn!r}: cannot allocate a {rec.dtype} tensor of shape {list(rec.shape)[:8]}: "
            f"{str(exc)[:120]}"
        ) from None


def finish_leaf(obj: Any, rec: TensorLeaf) -> Any:
    """What stands in the loaded tree for a filled leaf (numpy scalars are rebuilt)."""
    if rec.lib == "numpy-scalar":
        return np.asarray(obj)[()]
    return obj

"""The pieces of torch DCP's storage-plugin protocol every ``StorageReader`` here shares.

A ``StorageReader`` hands each ``ReadItem`` to the planner: a value as
``torch.save`` bytes (read back with ``torch.load(weights_only=True)``, so no
code runs from them), a tensor region copied into the planner's tensor
(converted only when the conversion is exact or the planner allows it by
name), and the region it reads is given in the stored chunk's
coordinates. Both the reader of torch-written checkpoints
(:class:`~treeckpt.formats.torch_dcp.TorchDcpReader`) and
``treeckpt.dcp.FileSystemReader`` go through these functions, so the two
behave alike on every planner.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.futures import Future

from treeckpt.core.box import Box
from treeckpt.core.dtypes import torch_dtype_code
from treeckpt.core.widening import cast_refusal
from treeckpt.errors import LoadMismatchError, UnsupportedLeafError

__all__ = [
    "commit_read",
    "decode_bytes",
    "done",
    "encode_bytes",
    "stored_box",
    "torch_cast_refusal",
]


def encode_bytes(fqn: str, obj: Any) -> io.BytesIO:
    """A non-tensor item as ``torch.save`` bytes (what DCP storage plugins expect)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def decode_bytes(fqn: str, value: io.BytesIO) -> Any:
    """Read an item written by :func:`encode_bytes` (or by DCP), executing no code."""
    try:
        return torch.load(value, weights_only=True)
    except Exception as exc:
        raise UnsupportedLeafError(
            f"{fqn!r}: the stored value is not plain data loadable with weights_only=True "
            f"(treeckpt never unpickles arbitrary objects): {str(exc).splitlines()[0][:200]}"
        ) from None


def commit_read(planner: Any, item: Any, src: torch.Tensor) -> None:
    """Copy ``src`` (what storage holds for a ``ReadItem``) into the planner's tensor.

    A destination of another dtype is filled by ``copy_`` when the conversion
    is exact (``core/widening.py``) or the planner allows it by name (its
    ``allows_lossy_cast(fqn)``, as ``DefaultLoadPlanner(allow_lossy_cast=...)``
    has). Any other dtype difference, and any shape difference, is a
    :class:`~treeckpt.LoadMismatchError` naming the FQN and both sides.
    """
    target = planner.resolve_tensor(item).detach()
    fqn = item.dest_index.fqn
    why = None
    if tuple(target.shape) != tuple(src.shape):
        why = "nothing is cast"
    elif target.dtype != src.dtype:
        why = torch_cast_refusal(fqn, src.dtype, target.dtype, planner)
    if why is not None:
        raise LoadMismatchError(
            mismatched=[
                f"{fqn} (checkpoint {src.dtype}{list(src.shape)}, destination "
                f"{target.dtype}{list(target.shape)}; {why})"
            ]
        )
    with torch.no_grad():
        target.copy_(src)
    planner.commit_tensor(item, target)


def torch_cast_refusal(fqn: str, src: torch.dtype, dst: torch.dtype, planner: Any) -> str | None:
    """Why ``fqn`` may not be converted from ``src`` to ``dst`` under ``planner`` (``None``: it may).

    The planner's consent to a lossy conversion is its ``allows_lossy_cast(fqn)``
    method, when it has one (a planner without it consents to none).
    """
    src_code, dst_code = torch_dtype_code(src), torch_dtype_code(dst)
    if src_code is None or dst_code is None:
        return f"{src if src_code is None else dst} is not a dtype treeckpt converts"
    allows = getattr(planner, "allows_lossy_cast", None)
    return cast_refusal(fqn, src_code, dst_code, allows if callable(allows) else None)


def done(value: Any) -> Future[Any]:
    """A future that has ``value`` already (storage plugins' ``read_data`` return one)."""
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def stored_box(item: Any) -> Box:
    """The region of the stored tensor a ``ReadItem`` reads, in global coordinates.

    ``storage_offsets`` are relative to the stored chunk, which starts at
    ``storage_index.offset`` (the origin when the index names no chunk).
    """
    base = tuple(int(o) for o in (item.storage_index.offset or ())) or (0,) * len(item.lengths)
    return Box(
        offsets=tuple(b + int(o) for b, o in zip(base, item.storage_offsets, strict=True)),
        sizes=tuple(int(s) for s in item.lengths),
    )

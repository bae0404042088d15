"""The closed table of dtypes the format stores.

A manifest names dtypes only by the codes in this table; anything else is
refused on save and rejected on load. Codes are torch's own dtype names, so a
person reading a manifest recognises them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DTYPES",
    "DTypeInfo",
    "dtype_info",
    "numpy_dtype_code",
    "torch_dtype",
    "torch_dtype_code",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class DTypeInfo:
    """One row of the dtype table.

    ``numpy`` is the numpy dtype name for dtypes numpy has (``None`` for
    bfloat16, float8 and complex32, which are stored as raw bytes and viewed as
    torch tensors only). ``floating`` marks the floating and complex types, the
    only ones autograd tracks: the manifest validator accepts
    ``requires_grad`` and ``parameter`` only for them (``store/manifest.py``).
    """

    code: str
    itemsize: int
    numpy: str | None
    floating: bool


_ROWS: tuple[tuple[str, int, str | None, bool], ...] = (
    ("float64", 8, "float64", True),
    ("float32", 4, "float32", True),
    ("float16", 2, "float16", True),
    ("bfloat16", 2, None, True),
    ("complex128", 16, "complex128", True),
    ("complex64", 8, "complex64", True),
    ("complex32", 4, None, True),
    ("int64", 8, "int64", False),
    ("int32", 4, "int32", False),
    ("int16", 2, "int16", False),
    ("int8", 1, "int8", False),
    ("uint64", 8, "uint64", False),
    ("uint32", 4, "uint32", False),
    ("uint16", 2, "uint16", False),
    ("uint8", 1, "uint8", False),
    ("bool", 1, "bool", False),
    ("float8_e4m3fn", 1, None, True),
    ("float8_e4m3fnuz", 1, None, True),
    ("float8_e5m2", 1, None, True),
    ("float8_e5m2fnuz", 1, None, True),
    ("float8_e8m0fnu", 1, None, True),
)

DTYPES: dict[str, DTypeInfo] = {
    code: DTypeInfo(code=code, itemsize=size, numpy=npname, floating=flt)
    for code, size, npname, flt in _ROWS
}

_TORCH_BY_CODE: dict[str, torch.dtype] = {
    code: getattr(torch, code)
    for code in DTYPES
    if isinstance(getattr(torch, code, None), torch.dtype)
}
_CODE_BY_TORCH: dict[torch.dtype, str] = {dt: code for code, dt in _TORCH_BY_CODE.items()}
_CODE_BY_NUMPY: dict[str, str] = {info.numpy: code for code, info in DTYPES.items() if info.numpy}


def dtype_info(code: str) -> DTypeInfo:
    """The table row for ``code``; ``KeyError`` for a code outside the table."""
    return DTYPES[code]


def torch_dtype_code(dtype: torch.dtype) -> str | None:
    """The format code of a torch dtype, or ``None`` when the format cannot store it."""
    return _CODE_BY_TORCH.get(dtype)


def numpy_dtype_code(dtype: np.dtype) -> str | None:
    """The format code of a numpy dtype (native byte order only), or ``None``."""
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not _little_endian()):
        return None
    return _CODE_BY_NUMPY.get(dtype.name)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a format code; ``KeyError`` if this torch lacks it."""
    return _TORCH_BY_CODE[code]


def _little_endian() -> bool:
    return bool(np.little_endian)

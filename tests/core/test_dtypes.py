"""core/dtypes.py: the closed dtype table and its torch / numpy adapters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from treeckpt.core.dtypes import (
    DTYPES,
    dtype_info,
    numpy_dtype_code,
    torch_dtype,
    torch_dtype_code,
)
from treeckpt.core.tree import describe_leaf
from treeckpt.errors import UnsupportedLeafError

ALL_TORCH_DTYPES = sorted(
    {d for name in dir(torch) if isinstance(d := getattr(torch, name), torch.dtype)}, key=str
)


def test_table_rows_are_consistent() -> None:
    for code, info in DTYPES.items():
        assert info.code == code
        assert info.itemsize in (1, 2, 4, 8, 16)
        assert dtype_info(code) is info
    with pytest.raises(KeyError):
        dtype_info("float128")


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_code_maps_to_torch_and_back(code: str) -> None:
    if not isinstance(getattr(torch, code, None), torch.dtype):
        pytest.skip(f"this torch has no {code}")
    dt = torch_dtype(code)
    assert dt is getattr(torch, code)
    assert torch_dtype_code(dt) == code
    info = DTYPES[code]
    assert dt.itemsize == info.itemsize
    assert info.floating == (dt.is_floating_point or dt.is_complex)
    # A tensor of that dtype describes itself with the code.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
        tensor = torch.empty(2, 3, dtype=dt)
    leaf = describe_leaf("t", tensor)
    assert (leaf.dtype, leaf.shape) == (code, (2, 3))  # type: ignore[union-attr]


@pytest.mark.parametrize("code", sorted(c for c, i in DTYPES.items() if i.numpy))
def test_numpy_codes_map_and_back(code: str) -> None:
    info = DTYPES[code]
    assert info.numpy is not None
    np_dt = np.dtype(info.numpy)
    assert np_dt.itemsize == info.itemsize
    assert numpy_dtype_code(np_dt) == code
    assert numpy_dtype_code(np_dt.newbyteorder("<")) == code
    # torch and numpy agree on what the code means.
    assert torch.from_numpy(np.zeros(1, dtype=np_dt)).dtype == torch_dtype(code)


def test_dtypes_without_numpy_are_marked() -> None:
    no_numpy = {c for c, i in DTYPES.items() if i.numpy is None}
    assert {"bfloat16", "complex32", "float8_e4m3fn", "float8_e5m2"} <= no_numpy


def test_torch_dtypes_outside_the_table_have_no_code() -> None:
    table = {getattr(torch, c) for c in DTYPES if isinstance(getattr(torch, c, None), torch.dtype)}
    outside = [d for d in ALL_TORCH_DTYPES if d not in table]
    assert torch.quint8 in outside and torch.bits8 in outside
    for dt in outside:
        assert torch_dtype_code(dt) is None, dt
    # Aliases resolve to the same code.
    assert torch_dtype_code(torch.float) == "float32"
    assert torch_dtype_code(torch.half) == "float16"
    assert torch_dtype_code(torch.long) == "int64"
    assert torch_dtype_code(torch.cfloat) == "complex64"
    with pytest.raises(KeyError):
        torch_dtype("float128")


@pytest.mark.parametrize("name", [">f4", ">f8", ">i2", ">i8", ">u4", ">c16", ">f2"])
def test_big_endian_numpy_dtypes_are_refused(name: str) -> None:
    dt = np.dtype(name)
    assert numpy_dtype_code(dt) is None
    with pytest.raises(UnsupportedLeafError, match=r"'opt\.x': numpy dtype >"):
        describe_leaf("opt.x", np.zeros(3, dtype=dt))


@pytest.mark.parametrize(("name", "code"), [("|u1", "uint8"), ("|i1", "int8"), ("|b1", "bool")])
def test_single_byte_dtypes_have_no_byte_order(name: str, code: str) -> None:
    assert numpy_dtype_code(np.dtype(name)) == code


@pytest.mark.parametrize(
    "name", ["O", "U3", "S2", "V4", "M8[s]", "m8[s]", "f16" if hasattr(np, "float128") else "O"]
)
def test_other_numpy_dtypes_are_refused(name: str) -> None:
    assert numpy_dtype_code(np.dtype(name)) is None


def test_numpy_scalars_describe_as_numpy_scalar() -> None:
    leaf = describe_leaf("s", np.float32(1.5))
    assert (leaf.lib, leaf.dtype, leaf.shape) == ("numpy-scalar", "float32", ())  # type: ignore[union-attr]
    arr = describe_leaf("a", np.zeros((2, 0), dtype=np.int16))
    assert (arr.lib, arr.dtype, arr.shape) == ("numpy", "int16", (2, 0))  # type: ignore[union-attr]

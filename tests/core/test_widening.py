"""The dtype conversion table of ``core/widening.py``, proven by converting real values.

For every pair of the format's dtypes, torch converts a set of values of the
source dtype (every bit pattern of the 8- and 16-bit dtypes; for the wider
ones their extremes, subnormals, infinities, both zeros, NaNs with several
payloads, integer boundaries ``2**k +- 1`` and a few thousand random bit
patterns) and the result is decoded independently of torch (numpy for the
IEEE dtypes and integers, bit fields for bfloat16 and float8). A pair the
table calls exact must keep every value (NaN as NaN, the sign of zero) and
give the same bits back on the way home; a pair it calls lossy must have a
witness value that changes; a pair it calls impossible is complex into real.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from treeckpt.core.box import Box
from treeckpt.core.dtypes import DTYPES, torch_dtype
from treeckpt.core.manifest import ChunkRef
from treeckpt.core.options import LoadOptions
from treeckpt.core.plan import StoredTensor, plan_load
from treeckpt.core.specs import ShardSpec
from treeckpt.core.widening import cast_refusal, exact_targets, widening
from treeckpt.errors import OptionsError, PlanError

CODES = list(DTYPES)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_PART = {"complex128": "float64", "complex64": "float32", "complex32": "float16"}
_RNG_SEED = 20261205


# ----------------------------------------------------------- the source values


def _bits_tensor(bits: npt.NDArray[Any], code: str) -> torch.Tensor:
    """A 1-d tensor of dtype ``code`` holding the given bit patterns."""
    size = DTYPES[code].itemsize
    raw = np.ascontiguousarray(bits.astype(_UINT[size])).view(np.uint8)
    return torch.from_numpy(raw.copy()).view(torch_dtype(code))


def _float_specials(code: str) -> npt.NDArray[Any]:
    """Bit patterns of the extremes of float32 or float64, plus random ones."""
    if code == "float32":
        u, frac, exp_mask, sign = np.uint32, 23, 0x7F800000, 0x80000000
    else:
        u, frac, exp_mask, sign = np.uint64, 52, 0x7FF0000000000000, 0x8000000000000000
    one = {23: 0x3F800000, 52: 0x3FF0000000000000}[frac]
    top_frac = (1 << frac) - 1
    base = [
        0,
        1,  # smallest subnormal
        top_frac,  # largest subnormal
        1 << frac,  # smallest normal
        exp_mask - 1,  # largest finite
        exp_mask,  # infinity
        exp_mask | (1 << (frac - 1)),  # quiet NaN
        exp_mask | 1,  # signalling NaN
        exp_mask | top_frac,  # NaN, all payload bits
        one,
        one + 1,  # 1 + ulp: not a bfloat16 or float16
        one | (1 << (frac - 8)),  # 1 + 2**-8: not a bfloat16
        one | (1 << (frac - 11)),  # 1 + 2**-11: not a float16
    ]
    # Powers of two around the narrower formats' ranges (2**-150 .. 2**130).
    bias = {23: 127, 52: 1023}[frac]
    for e in range(-160, 140):
        if -bias + 1 <= e <= bias:
            base.append((e + bias) << frac)
            base.append(((e + bias) << frac) | 1)
    pats = np.asarray(base, dtype=u)
    rnd = np.random.default_rng(_RNG_SEED).integers(0, np.iinfo(u).max, 4096, dtype=u)
    return np.concatenate([pats, pats | u(sign), rnd])


def _int_specials(code: str) -> npt.NDArray[Any]:
    info = np.iinfo(np.dtype(code))
    vals = {0, 1, int(info.min), int(info.max)}
    for k in range(info.bits):
        for d in (-1, 0, 1):
            for v in ((1 << k) + d, -(1 << k) + d):
                if info.min <= v <= info.max:
                    vals.add(v)
    arr = np.asarray(sorted(vals), dtype=np.dtype(code))
    rnd = np.random.default_rng(_RNG_SEED).integers(
        info.min, info.max, 4096, dtype=np.dtype(code), endpoint=True
    )
    return np.concatenate([arr, rnd])


def source_values(code: str) -> torch.Tensor:
    """Every value of an 8- or 16-bit dtype; the extremes and a sample of a wider one."""
    size = DTYPES[code].itemsize
    if code == "bool":
        return torch.tensor([False, True])
    if code in _PART:
        part = _PART[code]
        re = source_values(part)
        n = re.numel()
        im = source_values(part)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
        zeros = torch.zeros(n, dtype=re.dtype)
        ones = torch.ones(n, dtype=re.dtype)
        # (x, 0), (1, x), (x, y): every part value in each role.
        pairs_re = torch.cat([re, ones, re])
        pairs_im = torch.cat([zeros, re, im])
        return torch.stack([pairs_re, pairs_im], dim=1).reshape(-1).view(torch_dtype(code))
    if size <= 2:
        return _bits_tensor(np.arange(1 << (8 * size), dtype=np.uint64), code)
    if code in ("float32", "float64"):
        return _bits_tensor(_float_specials(code), code)
    return torch.from_numpy(_int_specials(code))


# ------------------------------------------------ decoding without torch's casts


def _fp8(bits: npt.NDArray[np.uint8], code: str) -> tuple[Any, Any, Any]:
    """(nan, value, negative) of float8 bit patterns, from their bit fields."""
    ebits, mbits, bias = {
        "float8_e4m3fn": (4, 3, 7),
        "float8_e4m3fnuz": (4, 3, 8),
        "float8_e5m2": (5, 2, 15),
        "float8_e5m2fnuz": (5, 2, 16),
    }[code]
    b = bits.astype(np.int64)
    s = b >> 7
    e = (b >> mbits) & ((1 << ebits) - 1)
    m = b & ((1 << mbits) - 1)
    mag = np.where(
        e == 0,
        m * 2.0 ** (1 - bias - mbits),
        (1 + m / 2.0**mbits) * 2.0 ** (e - bias),
    )
    if code.endswith("fnuz"):
        nan = b == 0x80
    elif code == "float8_e4m3fn":
        nan = (e == 15) & (m == 7)
    else:  # e5m2: IEEE-like
        nan = (e == 31) & (m != 0)
        mag = np.where((e == 31) & (m == 0), np.inf, mag)
    return nan, np.where(s == 1, -mag, mag), s == 1


def _real_ref(t: torch.Tensor, code: str) -> tuple[Any, Any, Any]:
    """(nan mask, exact values, sign bits) of a 1-d real tensor, decoded from its bits."""
    size = DTYPES[code].itemsize
    bits = t.contiguous().view(torch_dtype(f"uint{8 * size}") if size > 1 else torch.uint8)
    raw = bits.numpy().view(_UINT[size])
    if code == "bool":
        v = raw.astype(np.int64)
        return np.zeros(v.shape, bool), v, np.zeros(v.shape, bool)
    if code.startswith(("int", "uint")):
        arr = raw.view(np.dtype(code))
        v = np.asarray(arr.tolist(), dtype=object) if size == 8 else arr.astype(np.int64)
        return np.zeros(arr.shape, bool), v, arr < 0
    if code in ("float16", "float32", "float64"):
        with np.errstate(invalid="ignore"):  # a signalling NaN stays a NaN
            f = raw.view(np.dtype(code)).astype(np.float64)
    elif code == "bfloat16":
        with np.errstate(invalid="ignore"):
            f = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    elif code == "float8_e8m0fnu":
        nan = raw == 255
        v = np.where(nan, 1.0, 2.0 ** (raw.astype(np.float64) - 127))
        return nan, v, np.zeros(raw.shape, bool)
    else:
        nan, v, neg = _fp8(raw, code)
        return nan, np.where(nan, 0.0, v), neg & ~nan
    nan = np.isnan(f)
    return nan, np.where(nan, 0.0, f), np.signbit(f) & ~nan


def _parts(t: torch.Tensor, code: str) -> list[tuple[Any, Any, Any]]:
    """The decoded parts of a tensor: one for a real dtype, real and imaginary for a complex one."""
    if code not in _PART:
        return [_real_ref(t, code)]
    pairs = t.view(torch_dtype(_PART[code])).reshape(-1, 2)
    return [_real_ref(pairs[:, 0], _PART[code]), _real_ref(pairs[:, 1], _PART[code])]


def _same(a: tuple[Any, Any, Any], b: tuple[Any, Any, Any]) -> npt.NDArray[np.bool_]:
    """Elementwise: the same value (NaN as NaN; zeros with their sign)."""
    nan_a, v_a, s_a = a
    nan_b, v_b, s_b = b
    return np.asarray((nan_a == nan_b) & ((v_a == v_b) & (s_a == s_b) | nan_a), dtype=bool)


def _zero_part(n: int) -> tuple[Any, Any, Any]:
    return np.zeros(n, bool), np.zeros(n), np.zeros(n, bool)


def _convert(x: torch.Tensor, code: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex into real: torch warns, we only observe
        return x.to(torch_dtype(code))


def kept(src: str, dst: str, x: torch.Tensor) -> npt.NDArray[np.bool_]:
    """Per value of ``x``: whether converting it to ``dst`` keeps it exactly."""
    y = _convert(x, dst)
    a, b = _parts(x, src), _parts(y, dst)
    n = x.numel()
    if len(a) < len(b):
        a = [*a, _zero_part(n)]  # a real value is a complex one with imaginary part +0
    if len(b) < len(a):
        b = [*b, _zero_part(n)]  # a real destination keeps only values with no imaginary part
    ok = np.ones(n, dtype=bool)
    for pa, pb in zip(a, b, strict=True):
        ok &= _same(pa, pb)
    return ok


# ------------------------------------------------------------------ the proofs


@pytest.mark.parametrize("src", CODES)
def test_table_matches_the_conversion_of_every_value(src: str) -> None:
    x = source_values(src)
    n_exhaustive = 1 << (8 * DTYPES[src].itemsize)
    if DTYPES[src].itemsize <= 2 and src != "bool":
        assert x.numel() == n_exhaustive  # every bit pattern
    for dst in CODES:
        verdict = widening(src, dst)
        ok = kept(src, dst, x)
        if verdict == "exact":
            bad = np.flatnonzero(~ok)[:3]
            assert ok.all(), f"{src} -> {dst}: values changed at {bad.tolist()}"
            back = _convert(_convert(x, dst), src)
            nan = np.zeros(x.numel(), bool)
            for p in _parts(x, src):
                nan |= p[0]
            size = DTYPES[src].itemsize
            xb = x.view(torch.uint8).reshape(-1, size).numpy()
            bb = back.view(torch.uint8).reshape(-1, size).numpy()
            assert (xb[~nan] == bb[~nan]).all(), f"{src} -> {dst} -> {src}: bits changed"
            back_nan = np.zeros(x.numel(), bool)
            for p in _parts(back, src):
                back_nan |= p[0]
            assert (back_nan == nan).all(), f"{src} -> {dst} -> {src}: NaN lost"
        else:
            assert not ok.all(), f"{src} -> {dst} is called {verdict} but kept every value"
            if verdict == "impossible":
                assert src in _PART and dst not in _PART


def test_table_is_what_the_docs_promise() -> None:
    assert exact_targets("bfloat16") == ("float64", "float32", "complex128", "complex64")
    assert exact_targets("float16") == (
        "float64",
        "float32",
        "complex128",
        "complex64",
        "complex32",
    )
    assert exact_targets("float32") == ("float64", "complex128", "complex64")
    assert exact_targets("float8_e4m3fn") == (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "complex128",
        "complex64",
        "complex32",
    )
    assert exact_targets("float8_e8m0fnu") == (
        "float64",
        "float32",
        "bfloat16",
        "complex128",
        "complex64",
    )
    assert exact_targets("int8") == (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "complex128",
        "complex64",
        "complex32",
    )
    assert exact_targets("uint8")[:4] == ("float64", "float32", "float16", "bfloat16")
    assert exact_targets("int32") == ("float64", "int64", "complex128")
    assert exact_targets("uint32") == ("float64", "int64", "uint64", "complex128")
    assert exact_targets("int64") == ()
    assert exact_targets("uint64") == ()
    assert exact_targets("float64") == ("complex128",)
    # bool: 0 and 1 exist in every dtype but float8_e8m0fnu (powers of two only).
    assert set(exact_targets("bool")) == set(CODES) - {"bool", "float8_e8m0fnu"}
    assert widening("bool", "float8_e8m0fnu") == "lossy"
    assert widening("float32", "float32") == "exact"
    assert widening("complex64", "float32") == "impossible"
    assert widening("float32", "int64") == "lossy"
    assert widening("int64", "float64") == "lossy"
    assert widening("uint8", "int8") == widening("int8", "uint8") == "lossy"
    assert widening("float8_e4m3fn", "float8_e4m3fnuz") == "lossy"  # -0 and 448


def test_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^unknown dtype code 'float128'$"):
        widening("float128", "float32")
    with pytest.raises(ValueError, match=r"^unknown dtype code 'half'$"):
        widening("float32", "half")


def test_cast_refusal_messages() -> None:
    assert cast_refusal("w", "bfloat16", "float32", None) is None
    assert (
        cast_refusal("m.w", "float32", "bfloat16", None)
        == "converting float32 to bfloat16 can lose bits; allow it by name: "
        "allow_lossy_cast={'m.w'}"
    )
    assert cast_refusal("m.w", "float32", "bfloat16", lambda f: f == "m.w") is None
    assert cast_refusal("m.v", "float32", "bfloat16", lambda f: f == "m.w") is not None
    assert (
        cast_refusal("z", "complex64", "float64", lambda f: True)
        == "complex64 cannot be converted to float64 (the imaginary part would be dropped)"
    )


# ------------------------------------------------------------------ the option


def test_allow_lossy_cast_by_name_pattern_and_function() -> None:
    assert LoadOptions().allow_lossy_cast == ()
    assert not LoadOptions().allows_lossy_cast("a")
    named = LoadOptions(allow_lossy_cast={"model.b", "model.a"})
    assert named.allow_lossy_cast == ("model.a", "model.b")
    assert named.allows_lossy_cast("model.a") and not named.allows_lossy_cast("model.c")
    one = LoadOptions(allow_lossy_cast="model.a")  # one name, not its characters
    assert one.allow_lossy_cast == ("model.a",) and not one.allows_lossy_cast("m")
    glob = LoadOptions(allow_lossy_cast=["model.*.weight"])
    assert glob.allows_lossy_cast("model.0.weight")
    assert not glob.allows_lossy_cast("model.0.bias")
    fn = LoadOptions(allow_lossy_cast=lambda f: f.endswith(".bias"))
    assert fn.allows_lossy_cast("x.bias") and not fn.allows_lossy_cast("x.weight")
    assert hash(named) == hash(LoadOptions(allow_lossy_cast=("model.a", "model.b")))


@pytest.mark.parametrize("bad", [True, 3, None])
def test_allow_lossy_cast_refuses_a_wholesale_or_odd_value(bad: Any) -> None:
    with pytest.raises(OptionsError, match=r"^allow_lossy_cast must be FQNs or fnmatch patterns"):
        LoadOptions(allow_lossy_cast=bad)


def test_allow_lossy_cast_refuses_non_string_names() -> None:
    with pytest.raises(OptionsError, match=r"^allow_lossy_cast holds non-string entries: \[3\]$"):
        LoadOptions(allow_lossy_cast=["a", 3])  # type: ignore[list-item]


def test_the_docs_table_is_the_table() -> None:
    """docs/differences.md lists, per stored dtype, exactly what ``widening`` calls exact."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "differences.md").read_text()
    for src in CODES:
        targets = exact_targets(src)
        cell = ", ".join(f"`{d}`" for d in targets) if targets else "no other dtype"
        assert f"| `{src}` | {cell} |" in text, src


# ------------------------------------------------------- the planner's decision


def _stored_bf16() -> dict[str, StoredTensor]:
    refs = tuple(
        ChunkRef(
            fqn="w",
            box=Box(offsets=(r, 0), sizes=(2, 3)),
            file="f",
            offset=r * 12,
            length=12,
            codec="raw",
            raw_length=12,
            checksum="",
        )
        for r in (0, 2)
    )
    return {"w": StoredTensor(fqn="w", dtype="bfloat16", shape=(4, 3), chunks=refs)}


def _request(dtype: str) -> list[ShardSpec]:
    return [
        ShardSpec(fqn="w", dtype=dtype, shape=(4, 3), boxes=(Box(offsets=(1, 0), sizes=(2, 3)),))
    ]


def test_plan_load_widens_with_the_same_reads_and_lists_it() -> None:
    stored = _stored_bf16()
    same = plan_load(stored, _request("bfloat16"))
    wide = plan_load(stored, _request("float32"))
    assert wide.items == same.items and wide.files == same.files
    assert same.converted == {} and same.lossy == ()
    assert wide.converted == {"w": ("bfloat16", "float32")} and wide.lossy == ()
    assert same.needed_bytes == wide.needed_bytes == 2 * 3 * 2  # counted in the stored dtype
    assert wide.report() == same.report() + "; converts 1 tensor: 1 bfloat16 -> float32"


def test_plan_load_needs_consent_for_a_lossy_dtype() -> None:
    stored = _stored_bf16()
    with pytest.raises(
        PlanError,
        match=r"^w: checkpoint has dtype bfloat16 shape \[4, 3\], request has dtype int8 shape "
        r"\[4, 3\] \(converting bfloat16 to int8 can lose bits; allow it by name: "
        r"allow_lossy_cast=\{'w'\}\)$",
    ):
        plan_load(stored, _request("int8"))
    plan = plan_load(stored, _request("int8"), allow_lossy_cast=lambda f: f == "w")
    assert plan.converted == {"w": ("bfloat16", "int8")} and plan.lossy == ("w",)
    assert plan.conversions() == "converts 1 tensor: 1 bfloat16 -> int8 (lossy, allowed by name: w)"
    with pytest.raises(PlanError, match=r"request has dtype bfloat16 shape \[3, 4\]$"):
        plan_load(
            stored,
            [ShardSpec(fqn="w", dtype="bfloat16", shape=(3, 4), boxes=())],
        )

"""Which dtype conversions a load may make: exact, lossy or impossible.

A checkpoint saved in one dtype is often loaded into a model of another
(a bfloat16 export started as a float32 model). A conversion is **exact**
when every value the source dtype can hold (every finite value, both zeros
with their signs, the infinities and NaN) comes out as the same value in the
destination dtype, so nothing is lost and the conversion needs no consent.
It is **lossy** when some value cannot be represented (rounding, overflow,
a lost sign of zero, a fraction or NaN in an integer). It is **impossible**
when a value has no counterpart at all: a complex number into a real dtype
would drop its imaginary part, which is not a cast but a different quantity.

The answer is derived from each dtype's value set, not listed by hand: a
dtype is described by its sign, its special values, its largest magnitudes
and, per binade ``[2**e, 2**(e+1))``, the spacing of its values there
(integers: spacing 1 in binades 0 up to their width; floating types: ``2**(max(e, emin) -
mantissa_bits)``, subnormals included). A source converts exactly when the
destination has every special value the source has, reaches at least as far,
and is at least as fine in every binade the source uses.
``tests/core/test_widening.py`` checks the resulting table against the real
conversion of every bit pattern of the 8- and 16-bit dtypes and of the
extremes of the wider ones.

Pure: no torch, no numpy; codes are those of ``core/dtypes.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Widening", "cast_refusal", "exact_targets", "widening"]

Widening = Literal["exact", "lossy", "impossible"]


@dataclass(frozen=True, slots=True)
class _Values:
    """The value set of a real dtype.

    ``lo``..``hi`` are the binades holding its nonzero finite values;
    ``emin`` and ``mant`` give the spacing in binade ``e``:
    ``2**(max(e, emin) - mant)``. ``max_pos`` and ``max_neg`` are the largest
    finite magnitudes (``max_neg`` 0 for a dtype with no negative values).
    """

    lo: int
    hi: int
    emin: int
    mant: int
    max_pos: int
    max_neg: int
    zero: bool
    neg_zero: bool
    inf: bool
    nan: bool

    def spacing_exp(self, e: int) -> int:
        return max(e, self.emin) - self.mant


def _int(bits: int, signed: bool) -> _Values:
    n = bits - 1 if signed else bits  # magnitude bits
    return _Values(
        lo=0,
        hi=n - 1,
        emin=n - 1,  # spacing 2**(max(e, n - 1) - (n - 1)) = 1 in every binade it uses
        mant=n - 1,
        max_pos=(1 << n) - 1,
        max_neg=(1 << n) if signed else 0,
        zero=True,
        neg_zero=False,
        inf=False,
        nan=False,
    )


def _float(
    mant: int,
    emin: int,
    emax: int,
    max_finite: int,
    *,
    inf: bool = True,
    neg_zero: bool = True,
    subnormals: bool = True,
    signed: bool = True,
    zero: bool = True,
) -> _Values:
    return _Values(
        lo=emin - mant if subnormals else emin,
        hi=emax,
        emin=emin,
        mant=mant,
        max_pos=max_finite,
        max_neg=max_finite if signed else 0,
        zero=zero,
        neg_zero=neg_zero,
        inf=inf,
        nan=True,
    )


def _top(mant: int, emax: int, missing: int = 0) -> int:
    """The largest finite value with ``mant`` mantissa bits in binade ``emax``, as an integer.

    ``missing`` counts the top mantissa patterns of that binade that encode NaN instead.
    """
    return ((1 << (mant + 1)) - 1 - missing) << (emax - mant)


_REAL: dict[str, _Values] = {
    "float64": _float(52, -1022, 1023, int(sys.float_info.max)),
    "float32": _float(23, -126, 127, _top(23, 127)),
    "float16": _float(10, -14, 15, _top(10, 15)),
    "bfloat16": _float(7, -126, 127, _top(7, 127)),
    # float8: the OCP formats and the "fnuz" variants (no -0, no inf, one NaN).
    "float8_e4m3fn": _float(3, -6, 8, _top(3, 8, missing=1), inf=False),
    "float8_e4m3fnuz": _float(3, -7, 7, _top(3, 7), inf=False, neg_zero=False),
    "float8_e5m2": _float(2, -14, 15, _top(2, 15)),
    "float8_e5m2fnuz": _float(2, -15, 15, _top(2, 15), inf=False, neg_zero=False),
    # Powers of two 2**-127 .. 2**127 and NaN: no zero, no sign, no infinity.
    "float8_e8m0fnu": _float(
        0,
        -127,
        127,
        1 << 127,
        inf=False,
        neg_zero=False,
        subnormals=False,
        signed=False,
        zero=False,
    ),
    "int64": _int(64, True),
    "int32": _int(32, True),
    "int16": _int(16, True),
    "int8": _int(8, True),
    "uint64": _int(64, False),
    "uint32": _int(32, False),
    "uint16": _int(16, False),
    "uint8": _int(8, False),
    "bool": _int(1, False),
}

#: complex dtypes and the real dtype of each of their two parts
_COMPLEX_PART: dict[str, str] = {
    "complex128": "float64",
    "complex64": "float32",
    "complex32": "float16",
}


def _holds(dst: _Values, src: _Values) -> bool:
    """Every value of ``src`` is a value of ``dst``."""
    if (src.zero and not dst.zero) or (src.neg_zero and not dst.neg_zero):
        return False
    if (src.inf and not dst.inf) or (src.nan and not dst.nan):
        return False
    if src.max_pos > dst.max_pos or src.max_neg > dst.max_neg:
        return False
    if src.lo < dst.lo:
        return False
    return all(dst.spacing_exp(e) <= src.spacing_exp(e) for e in range(src.lo, src.hi + 1))


def widening(src: str, dst: str) -> Widening:
    """How converting a ``src`` tensor to ``dst`` treats its values.

    ``"exact"``: every value of ``src`` (NaN as NaN, ``-0.0`` as ``-0.0``)
    comes out as the same value; ``"lossy"``: some value is rounded,
    clipped, loses its sign of zero or becomes something else;
    ``"impossible"``: a complex value into a real dtype.

    >>> widening("bfloat16", "float32"), widening("float32", "bfloat16")
    ('exact', 'lossy')
    >>> widening("int32", "float64"), widening("int64", "float64")
    ('exact', 'lossy')
    >>> widening("complex64", "float64")
    'impossible'

    Raises:
        ValueError: a code outside the format's dtype table.
    """
    for code in (src, dst):
        if code not in _REAL and code not in _COMPLEX_PART:
            raise ValueError(f"unknown dtype code {code!r}")
    if src == dst:
        return "exact"
    if src in _COMPLEX_PART:
        if dst not in _COMPLEX_PART:
            return "impossible"
        src_part = _REAL[_COMPLEX_PART[src]]
    else:
        src_part = _REAL[src]
    dst_part = _REAL[_COMPLEX_PART.get(dst, dst)]
    return "exact" if _holds(dst_part, src_part) else "lossy"


def exact_targets(src: str) -> tuple[str, ...]:
    """Every other dtype ``src`` converts to exactly (the format's table order)."""
    codes = (*_REAL, *_COMPLEX_PART)
    return tuple(d for d in codes if d != src and widening(src, d) == "exact")


def cast_refusal(
    fqn: str, src: str, dst: str, allow_lossy_cast: Callable[[str], bool] | None
) -> str | None:
    """Why a load may not convert ``fqn`` from ``src`` to ``dst``, or ``None`` when it may.

    Exact conversions need no consent; lossy ones need ``allow_lossy_cast(fqn)``
    (``LoadOptions.allow_lossy_cast``, ``DefaultLoadPlanner(allow_lossy_cast=...)``
    in the DCP facade); impossible ones (complex into real) are always refused.

    >>> cast_refusal("w", "bfloat16", "float32", None) is None
    True
    >>> cast_refusal("w", "float32", "bfloat16", None)
    "converting float32 to bfloat16 can lose bits; allow it by name: allow_lossy_cast={'w'}"
    """
    kind = widening(src, dst)
    if kind == "exact" or (
        kind == "lossy" and allow_lossy_cast is not None and allow_lossy_cast(fqn)
    ):
        return None
    if kind == "impossible":
        return f"{src} cannot be converted to {dst} (the imaginary part would be dropped)"
    return (
        f"converting {src} to {dst} can lose bits; allow it by name: allow_lossy_cast={{{fqn!r}}}"
    )

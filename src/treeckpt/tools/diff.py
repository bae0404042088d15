"""Compare two checkpoints leaf by leaf.

For each FQN the verdict is ``same``, ``close`` (within ``atol``/``rtol``,
only when a tolerance is given), ``different``, ``only_a`` or ``only_b``.

Tensors are compared as cheaply as the stored data allows:

1. metadata: a different dtype, shape or library is ``different`` at once;
2. checksums: when both checkpoints store the tensor in the same chunk boxes
   with the same codecs and every chunk checksum is equal, the stored bytes are
   equal, so the tensor is ``same`` without reading any data;
3. data: otherwise both tensors are read (in slabs of at most
   ``SLAB_BYTES`` raw bytes per side, so memory stays bounded for any size)
   and compared bit for bit. When they differ, the number of differing
   elements is counted and, for numeric types, the largest absolute and
   relative difference is computed in float64 (complex128 for complex types).

Equal checksums under different codecs or chunk layouts prove nothing, and
unequal checksums do not prove a difference either (a different zstd level
gives different bytes for the same values), so step 3 decides those.

Values (ints, floats, strings, ...) are equal when their types and values
are; floats compare by bit pattern, so ``nan`` equals ``nan`` and ``0.0``
differs from ``-0.0``. Pickled leaves compare by their pickled bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from treeckpt.core.box import Box, full_box
from treeckpt.core.dtypes import dtype_info
from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf, TensorLib, ValueLeaf
from treeckpt.core.manifest import Manifest
from treeckpt.core.options import LoadOptions
from treeckpt.core.plan import StoredTensor
from treeckpt.core.values import canonical, encode_value
from treeckpt.shell.load import read_regions
from treeckpt.shell.tensors import allocate
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.reader import read_indexes, read_manifest, stored_tensors

__all__ = ["SLAB_BYTES", "STATUSES", "DiffEntry", "DiffReport", "Status", "diff"]

Status = Literal["same", "close", "different", "only_a", "only_b"]
STATUSES: tuple[Status, ...] = ("same", "close", "different", "only_a", "only_b")

#: Largest raw slab of one tensor read at a time, per checkpoint.
SLAB_BYTES = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class DiffEntry:
    """The verdict on one FQN.

    ``how`` says what decided it: ``metadata``, ``checksums``, ``data`` or
    ``value``. For tensors compared by data, ``mismatched`` counts the
    elements whose bits differ (of ``numel``); ``max_abs`` / ``max_rel`` are
    the largest ``|a - b|`` and ``|a - b| / |b|`` (``None`` for non-numeric
    types), ignoring positions where both are nan; ``nan_mismatched`` counts
    positions where exactly one side is nan.
    """

    fqn: str
    status: Status
    kind: str
    how: str
    reason: str = ""
    numel: int | None = None
    mismatched: int | None = None
    nan_mismatched: int | None = None
    max_abs: float | None = None
    max_rel: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DiffReport:
    a: str
    b: str
    entries: tuple[DiffEntry, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        """True when nothing is ``different``, ``only_a`` or ``only_b``."""
        return all(e.status in ("same", "close") for e in self.entries)


@dataclass(slots=True)
class _Side:
    backend: Backend
    manifest: Manifest
    stored: dict[str, StoredTensor]


def diff(
    a: str,
    b: str,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    on_read: Callable[[int], None] | None = None,
) -> DiffReport:
    """Compare the checkpoints at ``a`` and ``b`` leaf by leaf.

    With ``atol`` or ``rtol`` given, numeric tensors that differ in their bits
    but satisfy ``|a - b| <= atol + rtol * |b|`` everywhere (nan where both are
    nan) are ``close`` rather than ``different``. ``on_read(raw_bytes)`` is
    called after each slab read from either checkpoint.

    Raises:
        CheckpointNotFoundError, ManifestError, CorruptChunkError: a
            checkpoint is missing or damaged (``treeckpt verify`` says where).
    """
    tol = None if atol is None and rtol is None else (atol or 0.0, rtol or 0.0)
    side_a, side_b = _open(a), _open(b)
    try:
        entries = []
        recs_a, recs_b = side_a.manifest.records, side_b.manifest.records
        for fqn, ra in recs_a.items():
            rb = recs_b.get(fqn)
            if rb is None:
                entries.append(DiffEntry(fqn=fqn, status="only_a", kind=_kind(ra), how="metadata"))
            else:
                entries.append(_compare(fqn, ra, rb, side_a, side_b, tol, on_read))
        for fqn, rb in recs_b.items():
            if fqn not in recs_a:
                entries.append(DiffEntry(fqn=fqn, status="only_b", kind=_kind(rb), how="metadata"))
        counts: dict[str, int] = {s: sum(e.status == s for e in entries) for s in STATUSES}
        return DiffReport(
            a=side_a.backend.root, b=side_b.backend.root, entries=tuple(entries), counts=counts
        )
    finally:
        side_a.backend.close()
        side_b.backend.close()


def _open(path: str) -> _Side:
    backend = open_backend(path)
    try:
        manifest = read_manifest(backend)
        stored = stored_tensors(manifest, read_indexes(backend, manifest))
    except BaseException:
        backend.close()
        raise
    return _Side(backend=backend, manifest=manifest, stored=stored)


def _kind(rec: LeafRecord) -> str:
    if isinstance(rec, TensorLeaf):
        return "tensor"
    return "pickle" if isinstance(rec, PickleLeaf) else "value"


def _compare(
    fqn: str,
    ra: LeafRecord,
    rb: LeafRecord,
    side_a: _Side,
    side_b: _Side,
    tol: tuple[float, float] | None,
    on_read: Callable[[int], None] | None,
) -> DiffEntry:
    ka, kb = _kind(ra), _kind(rb)
    if ka != kb:
        return DiffEntry(
            fqn=fqn,
            status="different",
            kind=f"{ka}/{kb}",
            how="metadata",
            reason=f"a {ka} in A, a {kb} in B",
        )
    if isinstance(ra, ValueLeaf) and isinstance(rb, ValueLeaf):
        same = _value_key(ra.value) == _value_key(rb.value)
        reason = "" if same else f"{_short(ra.value)} != {_short(rb.value)}"
        return DiffEntry(
            fqn=fqn,
            status="same" if same else "different",
            kind="value",
            how="value",
            reason=reason,
        )
    if isinstance(ra, PickleLeaf) and isinstance(rb, PickleLeaf):
        same = ra.data == rb.data
        return DiffEntry(
            fqn=fqn,
            status="same" if same else "different",
            kind="pickle",
            how="value",
            reason="" if same else "the pickled bytes differ",
        )
    assert isinstance(ra, TensorLeaf) and isinstance(rb, TensorLeaf)
    return _compare_tensor(fqn, ra, rb, side_a, side_b, tol, on_read)


def _value_key(v: Any) -> str:
    """Equality key of a stored value: its canonical record (type, bits, sets in order, enums by
    class and member name, whichever checkpoint made their types)."""
    return canonical(encode_value(v))


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _compare_tensor(
    fqn: str,
    ra: TensorLeaf,
    rb: TensorLeaf,
    side_a: _Side,
    side_b: _Side,
    tol: tuple[float, float] | None,
    on_read: Callable[[int], None] | None,
) -> DiffEntry:
    numel = math.prod(ra.shape)
    reasons = []
    if ra.dtype != rb.dtype:
        reasons.append(f"dtype {ra.dtype} != {rb.dtype}")
    if ra.shape != rb.shape:
        reasons.append(f"shape {list(ra.shape)} != {list(rb.shape)}")
    if ra.lib != rb.lib:
        reasons.append(f"stored from {ra.lib} in A, {rb.lib} in B")
    if reasons:
        return DiffEntry(
            fqn=fqn, status="different", kind="tensor", how="metadata", reason="; ".join(reasons)
        )
    if numel == 0:
        return DiffEntry(fqn=fqn, status="same", kind="tensor", how="metadata", numel=0)
    if _same_checksums(side_a.stored[fqn], side_b.stored[fqn]):
        return DiffEntry(
            fqn=fqn, status="same", kind="tensor", how="checksums", numel=numel, mismatched=0
        )
    stats = _Stats(numeric=_numeric(ra.dtype))
    scalars = ""
    for box in _slabs(ra.shape, dtype_info(ra.dtype).itemsize, SLAB_BYTES):
        ta = _read(side_a, fqn, ra, box)
        if on_read is not None:
            on_read(ta.numel() * ta.element_size())
        tb = _read(side_b, fqn, rb, box)
        if on_read is not None:
            on_read(tb.numel() * tb.element_size())
        stats.add(ta, tb, tol)
        if numel == 1:  # a step counter, a loss: show both values
            scalars = f"{_short(ta.item())} != {_short(tb.item())}"
    if stats.mismatched == 0:
        return DiffEntry(
            fqn=fqn, status="same", kind="tensor", how="data", numel=numel, mismatched=0
        )
    close = tol is not None and stats.numeric and stats.within
    return DiffEntry(
        fqn=fqn,
        status="close" if close else "different",
        kind="tensor",
        how="data",
        reason=scalars or f"{stats.mismatched:,} of {numel:,} elements differ",
        numel=numel,
        mismatched=stats.mismatched,
        nan_mismatched=stats.nan_mismatched if stats.numeric else None,
        max_abs=stats.max_abs if stats.numeric else None,
        max_rel=stats.max_rel if stats.numeric else None,
    )


def _same_checksums(sa: StoredTensor, sb: StoredTensor) -> bool:
    """Equal stored bytes in identical chunk boxes with identical codecs (no data read)."""

    def layout(st: StoredTensor) -> dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[str, str]]:
        return {(c.box.offsets, c.box.sizes): (c.codec, c.checksum) for c in st.chunks}

    la, lb = layout(sa), layout(sb)
    return bool(la) and len(la) == len(sa.chunks) and la == lb


def _numeric(dtype: str) -> bool:
    return dtype != "bool"


def _slabs(shape: tuple[int, ...], itemsize: int, limit: int) -> Iterator[Box]:
    """Boxes that tile ``shape`` in row-major order, each of at most ``limit`` bytes
    (or one innermost row, when a row alone is larger)."""
    n = len(shape)
    if n == 0 or 0 in shape:
        yield full_box(shape)
        return
    k = 0
    inner = itemsize * math.prod(shape[1:])  # bytes of one index along dim k
    while k < n - 1 and inner > limit:
        k += 1
        inner //= shape[k]
    step = max(1, limit // max(1, inner))
    for outer in itertools.product(*(range(d) for d in shape[:k])):
        for lo in range(0, shape[k], step):
            hi = min(shape[k], lo + step)
            yield Box(
                offsets=(*outer, lo, *([0] * (n - k - 1))),
                sizes=(*([1] * k), hi - lo, *shape[k + 1 :]),
            )


def _read(side: _Side, fqn: str, rec: TensorLeaf, box: Box) -> torch.Tensor:
    """Region ``box`` of tensor ``fqn`` as a flat CPU torch tensor (checksums verified)."""
    lib: TensorLib = "torch" if rec.lib == "torch" else "numpy"
    out = allocate(TensorLeaf(lib=lib, dtype=rec.dtype, shape=box.sizes), fqn)
    read_regions(side.backend, side.manifest, side.stored, {fqn: [(box, out)]}, LoadOptions())
    t = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(out))
    return t.reshape(-1)


@dataclass(slots=True)
class _Stats:
    numeric: bool
    mismatched: int = 0
    nan_mismatched: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    within: bool = True

    def add(self, a: torch.Tensor, b: torch.Tensor, tol: tuple[float, float] | None) -> None:
        n = a.element_size()
        bits_a = a.view(torch.uint8).reshape(-1, n)
        bits_b = b.view(torch.uint8).reshape(-1, n)
        differs = (bits_a != bits_b).any(dim=1)
        count = int(differs.sum())
        if count == 0:
            return
        self.mismatched += count
        if not self.numeric:
            self.within = False
            return
        try:
            wide = torch.complex128 if a.is_complex() else torch.float64
            x, y = a[differs].to(wide), b[differs].to(wide)
        except (RuntimeError, TypeError, NotImplementedError):  # torch cannot widen it: bits only
            self.numeric = False
            self.within = False
            return
        nan_x, nan_y = torch.isnan(x), torch.isnan(y)
        both_nan, one_nan = nan_x & nan_y, nan_x ^ nan_y
        zero = torch.zeros((), dtype=torch.float64)
        # equal values (0.0 and -0.0, inf and inf) and nan positions add no difference
        d = torch.where(both_nan | one_nan | (x == y), zero, (x - y).abs())
        d = torch.nan_to_num(d, nan=math.inf, posinf=math.inf)
        mag = y.abs()
        rel = torch.where(d == 0, zero, d / mag)  # b == 0 < |a| gives inf
        rel = torch.nan_to_num(rel, nan=math.inf, posinf=math.inf)
        self.nan_mismatched += int(one_nan.sum())
        self.max_abs = max(self.max_abs, float(d.max()))
        self.max_rel = max(self.max_rel, float(rel.max()))
        if tol is not None and self.within:
            atol, rtol = tol
            ok = both_nan | (~one_nan & torch.isfinite(d) & (d <= atol + rtol * mag))
            self.within = bool(ok.all())


def entries_by_status(report: DiffReport) -> Mapping[str, list[DiffEntry]]:
    """The report's entries grouped by status, in report order."""
    out: dict[str, list[DiffEntry]] = {s: [] for s in STATUSES}
    for e in report.entries:
        out[e.status].append(e)
    return out

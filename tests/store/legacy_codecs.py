"""The writer of format 1.0's single-frame codecs (``zstd``, ``shuffle-zstd``), for tests only.

treeckpt no longer writes them (``planes`` does better) but must keep reading
them; this encoder writes such chunks so the tests can prove it does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import zstandard

from treeckpt.store.codecs import Encoded
from treeckpt.store.codecs.planes import sample_windows

__all__ = ["encode", "shuffle"]


def shuffle(raw: npt.NDArray[np.uint8], itemsize: int) -> npt.NDArray[np.uint8]:
    """Group bytes by position within each ``itemsize``-byte element (one copy)."""
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)


def encode(
    raw: npt.NDArray[np.uint8],
    *,
    itemsize: int,
    mode: str,
    min_ratio: float,
    cctx: zstandard.ZstdCompressor,
) -> Encoded:
    """Encode one chunk as a single ``zstd`` or ``shuffle-zstd`` frame, or ``raw``.

    ``mode`` is ``"never"`` (raw), ``"always"`` (compress unless it grows) or
    ``"auto"``: compress a sample of up to three windows first and
    compress the chunk only when the sample shrinks by ``min_ratio``.
    """
    n = raw.nbytes
    if mode == "never" or n == 0:
        return Encoded("raw", raw.data)
    shuffled = itemsize > 1 and n % itemsize == 0
    if mode == "auto" and not _pays(raw, itemsize if shuffled else 1, cctx, min_ratio):
        return Encoded("raw", raw.data)
    data = shuffle(raw, itemsize) if shuffled else raw
    payload = cctx.compress(data.data)
    if len(payload) >= n:
        return Encoded("raw", raw.data)
    return Encoded("shuffle-zstd" if shuffled else "zstd", memoryview(payload))


def _pays(
    raw: npt.NDArray[np.uint8], itemsize: int, cctx: zstandard.ZstdCompressor, min_ratio: float
) -> bool:
    windows = sample_windows(raw, itemsize)
    total = sum(w.nbytes for w in windows)
    packed = sum(
        len(cctx.compress((shuffle(w, itemsize) if itemsize > 1 else w).data)) for w in windows
    )
    return bool(total >= min_ratio * packed)

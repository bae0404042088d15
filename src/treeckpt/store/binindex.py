"""The binary chunk index (``index-r<rank>.idx``): packed columns instead of JSON.

A JSON index spends most of its decoding time on one checksum string per
64 KiB block and one small list per chunk. The binary form holds the same
fields as little-endian integer columns, read with one ``numpy.frombuffer``
each and validated with vectorised comparisons; only names (FQNs, files,
codec parameters) stay JSON, in a small head. The columns are stored as one
Zstandard frame, the table column by column and each column as differences
between neighbours (file offsets grow by the chunk lengths, tensor numbers
by one), so an index of thousands of chunks is mostly its checksums.
``docs/format.md`` specifies it byte by byte::

    magic "TCKINDEX" | u32 version | u32 head length H | head (JSON, H bytes)
    | zstd frame of: table (10 columns of n int64, delta-coded)
      | checksums (n u64) | coords (C int64) | block checksums (B u64)
      | segments (S int64) | digests (n x 2 u64, optional)
    | u64 xxh3-64 of every byte before it

Every check of the JSON index applies, with the same errors
(``ManifestError`` naming the file, the field and the FQN).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from treeckpt.core.box import Box
from treeckpt.core.dtypes import DTYPES
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.manifest import FORMAT_VERSION, ChunkIndex, ChunkRef, DataFile, Manifest
from treeckpt.errors import ManifestError
from treeckpt.store.checksum import ALGORITHM
from treeckpt.store.codecs import CODECS
from treeckpt.store.parse import MAX_INT, check_format_version, parse_data_files

__all__ = ["MAGIC", "decode_binary_index", "encode_binary_index"]

MAGIC = b"TCKINDEX"
_HEAD = struct.Struct("<8sII")
_MAX_HEAD = 1 << 28
#: table columns, in order
_COLUMNS = (
    "tensor",
    "file",
    "offset",
    "length",
    "codec",
    "raw_length",
    "block_bytes",
    "blocks",
    "params",
    "segments",
)
_NCOL = len(_COLUMNS)
#: a frame that would inflate more than this many times its size (plus 1 MiB) is refused
_MAX_RATIO = 1024
_HEAD_KEYS = ("save_id", "rank", "files", "tensors", "codecs", "params", "counts", "digests")


def _hex_u64(value: str) -> int:
    return int(value.partition(":")[2], 16)


def _strings(values: npt.NDArray[np.uint64]) -> list[str]:
    """``"xxh3-64:<hex>"`` of each value (one bytes.hex call for them all)."""
    text = values.astype(">u8").tobytes().hex()
    return [f"{ALGORITHM}:{text[i : i + 16]}" for i in range(0, len(text), 16)]


def encode_binary_index(ix: ChunkIndex) -> bytes:
    """The binary chunk index of ``ix`` (validated by :func:`decode_binary_index`)."""
    file_no = {f.name: n for n, f in enumerate(ix.files)}
    tensors: dict[str, int] = {}
    codecs: dict[str, int] = {}
    params: dict[str, int] = {"": 0}
    n = len(ix.chunks)
    table = np.zeros((n, _NCOL), dtype=np.int64)
    sums = np.zeros(n, dtype=np.uint64)
    coords: list[int] = []
    blocks: list[int] = []
    segments: list[int] = []
    for i, c in enumerate(ix.chunks):
        table[i] = (
            tensors.setdefault(c.fqn, len(tensors)),
            file_no[c.file],
            c.offset,
            c.length,
            codecs.setdefault(c.codec, len(codecs)),
            c.raw_length,
            c.block_bytes if c.blocks else 0,
            len(c.blocks),
            params.setdefault(c.codec_params, len(params)),
            len(c.segments),
        )
        sums[i] = _hex_u64(c.checksum)
        coords += c.box.offsets
        coords += c.box.sizes
        blocks += [_hex_u64(b) for b in c.blocks]
        segments += c.segments
    digests = bool(ix.chunks) and all(c.digest for c in ix.chunks)
    head = {
        "save_id": ix.save_id,
        "rank": ix.rank,
        "files": [[f.name, f.size] for f in ix.files],
        "tensors": list(tensors),
        "codecs": list(codecs),
        "params": list(params),
        "counts": [n, len(coords), len(blocks), len(segments)],
        "digests": digests,
    }
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=True).encode()
    columns = np.ascontiguousarray(table.T)
    columns[:, 1:] = np.diff(table.T, axis=1)  # each column as differences between rows
    parts = [
        columns.astype("<i8").tobytes(),
        sums.astype("<u8").tobytes(),
        np.asarray(coords, dtype="<i8").tobytes(),
        np.asarray(blocks, dtype=np.uint64).astype("<u8").tobytes(),
        np.asarray(segments, dtype="<i8").tobytes(),
    ]
    if digests:
        pairs = [(int(c.digest[9:25], 16), int(c.digest[25:], 16)) for c in ix.chunks]
        parts.append(np.asarray(pairs, dtype=np.uint64).astype("<u8").tobytes())
    body = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(b"".join(parts))
    data = b"".join([_HEAD.pack(MAGIC, FORMAT_VERSION, len(text)), text, body])
    return data + struct.pack("<Q", xxhash.xxh3_64_intdigest(data))


def decode_binary_index(data: bytes, rank: int, manifest: Manifest, where: str) -> ChunkIndex:
    """Decode and validate a binary chunk index of writer ``rank`` against ``manifest``.

    The caller has checked the file's size and checksum against the root
    manifest; this checks everything else, as for a JSON index.
    """
    total = len(data)
    if total < _HEAD.size + 8:
        raise ManifestError(f"{where}: {total} bytes is too short for a binary chunk index")
    magic, version, head_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ManifestError(f"{where}: not a treeckpt binary chunk index (bad magic)")
    check_format_version(version, where)
    (trailer,) = struct.unpack_from("<Q", data, total - 8)
    if xxhash.xxh3_64_intdigest(memoryview(data)[: total - 8]) != trailer:
        raise ManifestError(f"{where}: checksum mismatch (the file is damaged)")
    if head_len > min(_MAX_HEAD, total - _HEAD.size - 8):
        raise ManifestError(f"{where}: head length {head_len} exceeds the file")
    head = _head(data[_HEAD.size : _HEAD.size + head_len], where)
    if head["save_id"] != manifest.save_id or head["rank"] != rank:
        raise ManifestError(f"{where}: belongs to another save or rank")
    files = parse_data_files(head["files"], manifest.save_id, rank, where)
    n, n_coords, n_blocks, n_segs = head["counts"]
    words = n * _NCOL + n + n_coords + n_blocks + n_segs + (2 * n if head["digests"] else 0)
    raw = _inflate(memoryview(data)[_HEAD.size + head_len : total - 8], 8 * words, where)
    body = np.frombuffer(raw, dtype="<i8", count=words)
    ubody = np.frombuffer(raw, dtype="<u8", count=words)
    pos = 0

    def take(k: int, unsigned: bool = False) -> npt.NDArray[Any]:
        nonlocal pos
        out = (ubody if unsigned else body)[pos : pos + k]
        pos += k
        return out

    # Undo the differences (wrapping like the writer's); the values are then checked.
    table = np.cumsum(take(n * _NCOL).reshape(_NCOL, n), axis=1, dtype=np.int64).T
    sums = take(n, unsigned=True)
    coords = take(n_coords)
    block_sums = take(n_blocks, unsigned=True)
    segs = take(n_segs)
    digests = take(2 * n, unsigned=True).reshape(n, 2) if head["digests"] else None
    if (table < 0).any() or (table >= MAX_INT).any():
        row, col = np.argwhere((table < 0) | (table >= MAX_INT))[0]
        raise ManifestError(
            f"{where}: chunks[{row}] {_COLUMNS[col]}: {int(table[row, col])} is out of range"
        )
    for arr, what in ((coords, "box"), (segs, "segment")):
        if len(arr) and ((arr < 0) | (arr >= MAX_INT)).any():
            raise ManifestError(f"{where}: a chunk {what} value is out of range")
    chunks = _chunks(head, files, table, sums, coords, block_sums, segs, manifest, where)
    if digests is not None:
        text = digests.astype(">u8").tobytes().hex()
        chunks = [
            _with_digest(c, f"xxh3-128:{text[32 * i : 32 * i + 32]}") for i, c in enumerate(chunks)
        ]
    return ChunkIndex(save_id=manifest.save_id, rank=rank, files=tuple(files), chunks=tuple(chunks))


def _inflate(frame: memoryview, expected: int, where: str) -> bytes:
    """The columns: exactly one Zstandard frame of exactly ``expected`` bytes, nothing after it."""
    if expected > _MAX_RATIO * len(frame) + (1 << 20):
        raise ManifestError(
            f"{where}: its head describes {expected} bytes of columns, too many for "
            f"{len(frame)} stored bytes"
        )
    try:
        size = zstandard.frame_content_size(frame)
        if size != expected:
            raise ManifestError(
                f"{where}: its columns hold {size} bytes, but its head describes {expected}"
            )
        inflater = zstandard.ZstdDecompressor().decompressobj()
        raw = inflater.decompress(frame)
    except zstandard.ZstdError as exc:
        raise ManifestError(f"{where}: columns are not a valid zstd frame ({exc})") from None
    if not inflater.eof or inflater.unused_data or len(raw) != expected:
        raise ManifestError(f"{where}: columns are not exactly one zstd frame of {expected} bytes")
    return raw


def _with_digest(c: ChunkRef, digest: str) -> ChunkRef:
    return dataclasses.replace(c, digest=digest)


def _head(raw: bytes, where: str) -> dict[str, Any]:
    try:
        head = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{where}: head is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(head, dict) or any(k not in head for k in _HEAD_KEYS):
        raise ManifestError(f"{where}: head lacks one of {', '.join(_HEAD_KEYS)}")
    for key in ("tensors", "codecs", "params"):
        v = head[key]
        if not (isinstance(v, list) and all(type(x) is str for x in v)):
            raise ManifestError(f"{where}: head {key} must be a list of strings")
    counts = head["counts"]
    if not (
        isinstance(counts, list)
        and len(counts) == 4
        and all(type(x) is int and 0 <= x < (1 << 40) for x in counts)
    ):
        raise ManifestError(f"{where}: head counts malformed")
    if type(head["digests"]) is not bool or type(head["rank"]) is not int:
        raise ManifestError(f"{where}: head digests or rank malformed")
    return head


def _chunks(
    head: dict[str, Any],
    files: list[DataFile],
    table: npt.NDArray[np.int64],
    sums: npt.NDArray[np.uint64],
    coords: npt.NDArray[np.int64],
    block_sums: npt.NDArray[np.uint64],
    segs: npt.NDArray[np.int64],
    manifest: Manifest,
    where: str,
) -> list[ChunkRef]:
    n = len(table)
    names: list[str] = head["tensors"]
    recs: list[TensorLeaf] = []
    for name in names:
        rec = manifest.records.get(name)
        if not isinstance(rec, TensorLeaf):
            raise ManifestError(f"{where}: {name[:80]!r} is not a tensor of this checkpoint")
        recs.append(rec)
    col = {c: table[:, k] for k, c in enumerate(_COLUMNS)}

    def bad(mask: npt.NDArray[np.bool_], what: str) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            t = int(col["tensor"][i])
            fqn = names[t] if t < len(names) else "?"
            raise ManifestError(f"{where}: chunks[{i}] ({fqn}): {what}")

    bad(col["tensor"] >= len(names), "tensor number out of range")
    bad(col["file"] >= len(files), "file number out of range")
    bad(col["codec"] >= len(head["codecs"]), "codec number out of range")
    bad(col["params"] >= len(head["params"]), "codec parameters number out of range")
    for cid in head["codecs"]:
        if cid not in CODECS:
            raise ManifestError(f"{where}: unknown codec {cid[:40]!r}")
    tensor = col["tensor"]
    ndim = np.asarray([len(r.shape) for r in recs] or [0], dtype=np.int64)[tensor]
    if int(ndim.sum()) * 2 != len(coords):
        raise ManifestError(f"{where}: chunk boxes do not match their tensors' dimensions")
    # Boxes: coordinate j of chunk i is its offset (j < ndim) or size along a dim.
    ends = np.cumsum(2 * ndim)
    first = ends - 2 * ndim
    maxd = int(ndim.max()) if n else 0
    offs = np.zeros((n, maxd), dtype=np.int64)
    sizes = np.ones((n, maxd), dtype=np.int64)
    shape = np.ones((n, maxd), dtype=np.int64)
    shapes = np.ones((len(recs), maxd), dtype=np.int64)
    for t, r in enumerate(recs):
        shapes[t, : len(r.shape)] = r.shape
    for d in range(maxd):
        has = ndim > d
        offs[has, d] = coords[first[has] + d]
        sizes[has, d] = coords[first[has] + ndim[has] + d]
        shape[:, d] = shapes[tensor, d]
    bad(
        ((sizes == 0) | (offs + sizes > shape)).any(axis=1) if maxd else np.zeros(n, bool),
        "box lies outside the tensor shape or is empty",
    )
    itemsize = np.asarray([DTYPES[r.dtype].itemsize for r in recs] or [1], dtype=np.int64)[tensor]
    volume = np.prod(sizes, axis=1) if maxd else np.ones(n, dtype=np.int64)
    bad(col["raw_length"] != volume * itemsize, "raw_length does not match its box")
    fsize = np.asarray([f.size for f in files] or [0], dtype=np.int64)[
        np.minimum(col["file"], max(0, len(files) - 1))
    ]
    bad(col["offset"] + col["length"] > fsize, "bytes lie beyond the end of their data file")
    nb, ns = col["blocks"], col["segments"]
    # Each count at most its column's length first, so that the sums cannot wrap.
    bad((nb > len(block_sums)) | (ns > len(segs)), "more block checksums or segments than stored")
    if int(nb.sum()) != len(block_sums) or int(ns.sum()) != len(segs):
        raise ManifestError(f"{where}: block checksums or segments do not add up to the counts")
    bad((nb == 0) != (col["block_bytes"] == 0), "block_bytes without blocks, or blocks without it")
    bad((nb == 0) & ((ns != 0) | (col["params"] != 0)), "codec fields without blocks")
    b_end = np.cumsum(nb)
    s_end = np.cumsum(ns)
    sum_text = _strings(sums)
    block_text = _strings(block_sums)
    codecs_ids: list[str] = head["codecs"]
    params: list[str] = head["params"]
    file_names = [f.name for f in files]
    rows = table.tolist()
    coord_list = coords.tolist()
    first_l, ndim_l = first.tolist(), ndim.tolist()
    out = []
    for i, row in enumerate(rows):
        t, fno, off, ln, cno, raw, bb, k, pno, _ = row
        a = first_l[i]
        d = ndim_l[i]
        box = Box(offsets=tuple(coord_list[a : a + d]), sizes=tuple(coord_list[a + d : a + 2 * d]))
        rec = recs[t]
        fqn = names[t]
        w = f"{where}: chunks[{i}] ({fqn})"
        codec = CODECS[codecs_ids[cno]]
        field: list[Any] | None = None
        seg_t: tuple[int, ...] = ()
        if k:
            lo = int(b_end[i]) - k
            seg_t = tuple(segs[int(s_end[i]) - row[9] : int(s_end[i])].tolist())
            # The block field as the codec itself writes it (its own shape), then
            # validated by the codec, as in a JSON index.
            field = codec.write_fields(
                ChunkRef(
                    fqn=fqn,
                    box=box,
                    file="",
                    offset=0,
                    length=ln,
                    codec=codec.id,
                    raw_length=raw,
                    checksum="",
                    block_bytes=bb,
                    blocks=tuple(block_text[lo : lo + k]),
                    codec_params=params[pno],
                    segments=seg_t,
                )
            )
        blocks = codec.read_fields(
            field,
            length=ln,
            raw_length=raw,
            dtype=rec.dtype,
            itemsize=DTYPES[rec.dtype].itemsize,
            where=w,
        )
        if (
            len(blocks.get("blocks", ())) != k
            or blocks.get("segments", ()) != seg_t
            or blocks.get("codec_params", "") != params[pno]
        ):
            raise ManifestError(f"{w}: block fields the {codec.id!r} codec does not have")
        out.append(
            ChunkRef(
                fqn=fqn,
                box=box,
                file=file_names[fno],
                offset=off,
                length=ln,
                codec=codec.id,
                raw_length=raw,
                checksum=sum_text[i],
                **blocks,
            )
        )
    return out

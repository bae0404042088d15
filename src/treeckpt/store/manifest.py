"""Encode, decode and validate manifests and chunk indexes.

A checkpoint is untrusted input. Decoding checks, before anything is used:
the size cap, JSON syntax, the magic and format version, the checksum, the
type and range of every field, that every name is one treeckpt generates for
this save id (no path escapes), that dtypes come from the closed table, that
the structure's leaves and the leaf records agree, and that every chunk lies
inside its tensor and its file. Each rejected case raises ``ManifestError``
naming the file and the field.

Both documents share one envelope::

    {"magic": "treeckpt" | "treeckpt-index", "format_version": 1,
     "checksum": "xxh3-64:<hex>", "body": {...}}

where the checksum covers the body serialised compactly (``separators=(",",
":")``, ASCII, keys in stored order). Numbers in a body are integers only:
floats are stored as their IEEE-754 bits in hex, big integers as strings.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import math
from typing import Any

import numpy as np

from treeckpt.core.box import Box
from treeckpt.core.dtypes import DTYPES
from treeckpt.core.extents import Extents, Layout
from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf, ValueLeaf
from treeckpt.core.manifest import (
    FORMAT_VERSION,
    ChunkIndex,
    ChunkRef,
    DataFile,
    IndexRef,
    Manifest,
)
from treeckpt.core.tree import UnstorableFactory, build_tree, iter_leaf_fqns
from treeckpt.core.values import EnumTypes, decode_value, encode_value
from treeckpt.errors import ManifestError, UnsupportedLeafError
from treeckpt.store import layout
from treeckpt.store.binindex import decode_binary_index, encode_binary_index
from treeckpt.store.checksum import checksum, is_checksum, is_content_digest
from treeckpt.store.codecs import CODECS
from treeckpt.store.parse import MAX_INT as _MAX_INT
from treeckpt.store.parse import check_format_version, parse_data_files
from treeckpt.store.parse import parse_int as _int

__all__ = [
    "MAX_INDEX_BYTES",
    "MAX_MANIFEST_BYTES",
    "decode_index",
    "decode_manifest",
    "encode_binary_index",
    "encode_index",
    "encode_manifest",
]

MAX_MANIFEST_BYTES = 256 << 20
MAX_INDEX_BYTES = 1 << 30
_MAX_NDIM = 64
_MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**_MAX_INT_DIGITS


def _envelope(magic: str, body: dict[str, Any]) -> bytes:
    text = _dumps(body)
    head = f'{{"magic":{json.dumps(magic)},"format_version":{FORMAT_VERSION},'
    return f'{head}"checksum":"{checksum(text.encode())}","body":{text}}}'.encode()


def _dumps(obj: Any) -> str:
    return json.dumps(
        obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_unstorable
    )


def _unstorable(obj: Any) -> Any:
    if isinstance(obj, UnstorableFactory):  # a defaultdict factory met with allow_pickle=True
        raise UnsupportedLeafError(obj.message)
    raise TypeError(f"{type(obj).__qualname__} is not JSON serializable")


def _open(data: bytes, magic: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{where}: not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict) or doc.get("magic") != magic:
        raise ManifestError(f"{where}: not a treeckpt {magic} file (bad magic)")
    version = doc.get("format_version")
    if type(version) is not int:
        raise ManifestError(f"{where}: format_version is missing")
    check_format_version(version, where)
    body = doc.get("body")
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: body is missing")
    try:
        text = _dumps(body)
    except (ValueError, RecursionError):
        raise ManifestError(f"{where}: body holds non-finite numbers or is too deep") from None
    if doc.get("checksum") != checksum(text.encode()):
        raise ManifestError(f"{where}: checksum mismatch (the file is damaged)")
    return body


# ------------------------------------------------------------------ values


def encode_record(rec: LeafRecord, fqn: str = "") -> dict[str, Any]:
    """The manifest record of a leaf (values: see ``core/values.py``).

    Raises:
        UnsupportedLeafError: a value cannot be stored; the message names ``fqn``.
    """
    if isinstance(rec, TensorLeaf):
        out: dict[str, Any] = {
            "kind": "tensor",
            "lib": rec.lib,
            "dtype": rec.dtype,
            "shape": list(rec.shape),
        }
        # Written only when set, so records of plain tensors stay as they always were.
        if rec.requires_grad:
            out["requires_grad"] = True
        if rec.parameter:
            out["parameter"] = True
        return out
    if isinstance(rec, PickleLeaf):
        return {"kind": "pickle", "data": base64.b64encode(rec.data).decode()}
    return encode_value(rec.value, fqn)


def decode_record(raw: Any, where: str, enums: EnumTypes | None = None) -> LeafRecord:
    """A leaf record, validated; ``enums`` gathers the enum types of the whole manifest."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: leaf record is not an object")
    kind = raw.get("kind")
    try:
        if kind == "tensor":
            lib, dtype, shape = raw.get("lib"), raw.get("dtype"), raw.get("shape")
            if lib not in ("torch", "numpy", "numpy-scalar"):
                raise ManifestError(f"{where}: unknown tensor library {str(lib)[:40]!r}")
            if dtype not in DTYPES:
                raise ManifestError(f"{where}: dtype {str(dtype)[:40]!r} is not in the dtype table")
            dims = _int_list(shape, f"{where}: shape")
            if len(dims) > _MAX_NDIM or math.prod(dims) * DTYPES[dtype].itemsize >= _MAX_INT:
                raise ManifestError(f"{where}: shape {dims[:8]} is absurdly large")
            if lib == "numpy-scalar" and dims:
                raise ManifestError(f"{where}: a numpy scalar must have shape []")
            if lib != "torch" and DTYPES[dtype].numpy is None:
                raise ManifestError(f"{where}: numpy has no dtype {dtype}")
            flags = {f: raw.get(f, False) for f in ("requires_grad", "parameter")}
            for f, v in flags.items():
                if type(v) is not bool or (v and (lib != "torch" or not DTYPES[dtype].floating)):
                    raise ManifestError(
                        f"{where}: bad {f} (a bool, true only for floating torch tensors)"
                    )
            return TensorLeaf(lib=lib, dtype=dtype, shape=tuple(dims), **flags)
        if kind == "pickle":
            if not isinstance(raw.get("data"), str):
                raise ManifestError(f"{where}: bad leaf record of kind 'pickle'")
            return PickleLeaf(data=base64.b64decode(raw["data"], validate=True))
    except ManifestError:
        raise
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{where}: bad {kind} value ({str(exc)[:60]})") from None
    return ValueLeaf(value=decode_value(raw, where, enums))


def _decode_records(raw_leaves: dict[str, Any], where: str) -> dict[str, LeafRecord]:
    """Every leaf record; those holding enum members are decoded again once their types exist."""
    enums = EnumTypes()
    records: dict[str, LeafRecord] = {}
    again = []
    for fqn, r in raw_leaves.items():
        met = enums.met
        records[fqn] = decode_record(r, f"{where}: leaf {fqn!r}", enums)
        if enums.met != met:
            again.append(fqn)
    if again:
        enums.build(where)
        for fqn in again:
            records[fqn] = decode_record(raw_leaves[fqn], f"{where}: leaf {fqn!r}", enums)
    return records


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or len(value) > _MAX_NDIM:
        raise ManifestError(f"{where}: expected a list of at most {_MAX_NDIM} integers")
    return [_int(v, where) for v in value]


# ---------------------------------------------------------------- manifest


def encode_manifest(m: Manifest) -> bytes:
    body = {
        "save_id": m.save_id,
        "world_size": m.world_size,
        "tree": m.structure,
        "leaves": {fqn: _encode_leaf(fqn, r) for fqn, r in m.records.items()},
        "indexes": [
            {"rank": i.rank, "file": i.file, "size": i.size, "checksum": i.checksum}
            for i in m.indexes
        ],
        "user_metadata": m.user_metadata,
    }
    if m.holders:
        # Added without a version bump: older readers ignore it and load
        # every key as if all ranks had saved it.
        body["holders"] = {fqn: list(ranks) for fqn, ranks in m.holders.items()}
    if m.extents is not None:
        # Also additive: a reader that ignores it reads every index.
        body["extents"] = _encode_extents(m.extents)
    return _envelope("treeckpt", body)


def _encode_extents(ext: Extents) -> dict[str, Any]:
    layouts = []
    for lay in ext.layouts:
        dims: list[Any] = [None] * len(lay.whole)
        for j, d in enumerate(lay.cut):
            dims[d] = [lay.offsets[:, j].tolist(), lay.sizes[:, j].tolist()]
        layouts.append([lay.ranks.tolist(), dims])
    return {"layouts": layouts, "tensors": dict(ext.tensors)}


def _int_column(raw: Any, n: int, lo: int, hi: int, where: str) -> Any:
    """A list of ``n`` integers in ``[lo, hi)`` as an int64 array (one type check per element)."""
    if not (isinstance(raw, list) and len(raw) == n and all(type(v) is int for v in raw)):
        raise ManifestError(f"{where}: expected a list of {n} integers")
    try:
        arr = np.asarray(raw, dtype=np.int64)
    except OverflowError:
        raise ManifestError(f"{where}: integer out of range") from None
    if n and (int(arr.min()) < lo or int(arr.max()) >= hi):
        raise ManifestError(f"{where}: expected integers in [{lo}, {hi})")
    return arr


def _decode_extents(
    raw: Any, records: dict[str, LeafRecord], writers: set[int], where: str
) -> Extents:
    """The writers' map, validated: known writers, tensors and layouts, boxes inside shapes."""
    where = f"{where}: extents"
    if not isinstance(raw, dict) or not isinstance(raw.get("layouts"), list):
        raise ManifestError(f"{where}: expected an object with layouts and tensors")
    layouts = []
    for n, rl in enumerate(raw["layouts"]):
        w = f"{where}: layouts[{n}]"
        if not (isinstance(rl, list) and len(rl) == 2 and isinstance(rl[1], list)):
            raise ManifestError(f"{w}: malformed")
        if not isinstance(rl[0], list) or len(rl[1]) > _MAX_NDIM:
            raise ManifestError(f"{w}: malformed")
        k = len(rl[0])
        ranks = _int_column(rl[0], k, 0, 1 << 24, f"{w} ranks")
        if not set(np.unique(ranks).tolist()) <= writers:
            raise ManifestError(f"{w}: names a writer that has no chunk index")
        whole = tuple(rd is None for rd in rl[1])
        ncut = whole.count(False)
        offs = np.zeros((k, ncut), dtype=np.int64)
        sizes = np.zeros((k, ncut), dtype=np.int64)
        j = 0
        for d, rd in enumerate(rl[1]):
            if rd is None:
                continue
            if not (isinstance(rd, list) and len(rd) == 2):
                raise ManifestError(f"{w}: dimension {d} malformed")
            offs[:, j] = _int_column(rd[0], k, 0, _MAX_INT, f"{w} offsets")
            sizes[:, j] = _int_column(rd[1], k, 1, _MAX_INT, f"{w} sizes")
            j += 1
        layouts.append(Layout.of(ranks, offs, sizes, whole))
    # The far edge of each layout along each dimension it cuts.
    far = [
        (lay.offsets.astype(np.int64) + lay.sizes).max(axis=0).tolist()
        if len(lay.ranks)
        else [0] * len(lay.cut)
        for lay in layouts
    ]
    tensors = raw.get("tensors")
    if not isinstance(tensors, dict):
        raise ManifestError(f"{where}: tensors must be an object")
    for fqn, n in tensors.items():
        rec = records.get(fqn)
        if not isinstance(rec, TensorLeaf):
            raise ManifestError(f"{where}: {str(fqn)[:80]!r} is not a tensor of this checkpoint")
        _int(n, f"{where}: layout of {fqn!r}", hi=max(1, len(layouts)))
        if n >= len(layouts) or len(layouts[n].whole) != len(rec.shape):
            raise ManifestError(f"{where}: layout of {fqn!r} does not fit its shape")
        if any(e > rec.shape[d] for e, d in zip(far[n], layouts[n].cut, strict=True)):
            raise ManifestError(f"{where}: layout of {fqn!r} lies outside its shape")
    return Extents(layouts=tuple(layouts), tensors=dict(tensors))


def _encode_leaf(fqn: str, rec: LeafRecord) -> dict[str, Any]:
    return encode_record(rec, fqn)


def decode_manifest(data: bytes, where: str = layout.MANIFEST) -> Manifest:
    """Decode and validate a root manifest (raises ManifestError)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}: manifest of {len(data)} bytes exceeds the cap")
    body = _open(data, "treeckpt", where)
    raw_id = body.get("save_id")
    if not isinstance(raw_id, str) or not layout.is_save_id(raw_id):
        raise ManifestError(f"{where}: bad save_id {str(raw_id)[:40]!r}")
    save_id: str = raw_id
    world = _int(body.get("world_size"), f"{where}: world_size", lo=1, hi=1 << 24)
    raw_leaves = body.get("leaves")
    if not isinstance(raw_leaves, dict):
        raise ManifestError(f"{where}: leaves is missing")
    records = _decode_records(raw_leaves, where)
    tree = body.get("tree")
    if not isinstance(tree, dict):
        raise ManifestError(f"{where}: tree structure is missing")
    try:
        fqns = iter_leaf_fqns(tree)
        consistent = len(fqns) == len(set(fqns)) and set(fqns) == set(records)
    except (AttributeError, TypeError, KeyError):
        raise ManifestError(f"{where}: tree structure is malformed") from None
    if not consistent:
        raise ManifestError(f"{where}: tree structure and leaf records name different leaves")
    try:  # validate every structure node now, so errors name this file
        build_tree(tree, lambda fqn: None)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    raw_indexes = body.get("indexes")
    if not isinstance(raw_indexes, list) or len(raw_indexes) > world:
        raise ManifestError(f"{where}: indexes must be a list of at most world_size entries")
    indexes = []
    seen: set[int] = set()
    for n, ri in enumerate(raw_indexes):
        w = f"{where}: indexes[{n}]"
        if not isinstance(ri, dict):
            raise ManifestError(f"{w}: not an object")
        rank = _int(ri.get("rank"), f"{w}.rank", hi=world)
        if rank in seen:
            raise ManifestError(f"{w}: rank {rank} listed twice")
        seen.add(rank)
        if not layout.is_index_file(ri.get("file"), save_id, rank):
            raise ManifestError(
                f"{w}: file name {str(ri.get('file'))[:80]!r} is not this save's index"
            )
        if not is_checksum(ri.get("checksum")):
            raise ManifestError(f"{w}: bad checksum field")
        size = _int(ri.get("size"), f"{w}.size", hi=MAX_INDEX_BYTES + 1)
        indexes.append(IndexRef(rank=rank, file=ri["file"], size=size, checksum=ri["checksum"]))
    meta = body.get("user_metadata", {})
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}: user_metadata must be an object")
    holders = _decode_holders(body.get("holders", {}), records, world, where)
    raw_extents = body.get("extents")
    extents = (
        None
        if raw_extents is None
        else _decode_extents(raw_extents, records, {i.rank for i in indexes}, where)
    )
    return Manifest(
        format_version=FORMAT_VERSION,
        save_id=save_id,
        world_size=world,
        structure=tree,
        records=records,
        indexes=tuple(indexes),
        user_metadata=meta,
        holders=holders,
        extents=extents,
    )


def _decode_holders(
    raw: Any, records: dict[str, LeafRecord], world: int, where: str
) -> dict[str, tuple[int, ...]]:
    """The ranks that held each per-rank key: known FQNs, increasing ranks below world_size."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: holders must be an object")
    out: dict[str, tuple[int, ...]] = {}
    for fqn, ranks in raw.items():
        w = f"{where}: holders of {str(fqn)[:80]!r}"
        if fqn not in records:
            raise ManifestError(f"{w}: not a leaf of this checkpoint")
        if not isinstance(ranks, list) or not 0 < len(ranks) < world:
            raise ManifestError(f"{w}: expected a list of 1 to world_size - 1 ranks")
        got = tuple(_int(r, w, hi=world) for r in ranks)
        if any(a >= b for a, b in itertools.pairwise(got)):
            raise ManifestError(f"{w}: ranks must be increasing")
        out[fqn] = got
    return out


# ------------------------------------------------------------------- index


def encode_index(ix: ChunkIndex) -> bytes:
    file_no = {f.name: n for n, f in enumerate(ix.files)}
    body = {
        "save_id": ix.save_id,
        "rank": ix.rank,
        "files": [[f.name, f.size] for f in ix.files],
        "chunks": [
            [
                c.fqn,
                list(c.box.offsets),
                list(c.box.sizes),
                file_no[c.file],
                c.offset,
                c.length,
                c.codec,
                c.raw_length,
                c.checksum,
                *_block_field(c),
            ]
            for c in ix.chunks
        ],
    }
    if ix.chunks and all(c.digest for c in ix.chunks):
        body["digests"] = [c.digest for c in ix.chunks]
    return _envelope("treeckpt-index", body)


def decode_index(data: bytes, ref: IndexRef, manifest: Manifest) -> ChunkIndex:
    """Decode and validate the chunk index ``ref`` points to, against ``manifest``.

    Checks the index belongs to this commit (its checksum is the one the root
    recorded; its save id and rank match), that data file names are this
    rank's files of this save, and that every chunk lies inside its tensor and
    its file with a consistent raw length.
    """
    where = ref.file
    if len(data) != ref.size:
        raise ManifestError(f"{where}: {len(data)} bytes, the manifest recorded {ref.size}")
    if checksum(data) != ref.checksum:
        raise ManifestError(f"{where}: does not match the checksum the manifest recorded")
    if layout.is_binary_index(ref.file):
        return decode_binary_index(data, ref.rank, manifest, where)
    body = _open(data, "treeckpt-index", where)
    if body.get("save_id") != manifest.save_id or body.get("rank") != ref.rank:
        raise ManifestError(f"{where}: belongs to another save or rank")
    files = parse_data_files(body.get("files"), manifest.save_id, ref.rank, where)
    raw_chunks = body.get("chunks")
    if not isinstance(raw_chunks, list):
        raise ManifestError(f"{where}: chunks is missing")
    chunks = [_decode_chunk(rc, n, files, manifest, where) for n, rc in enumerate(raw_chunks)]
    digests = body.get("digests")
    if digests is not None:
        if not (
            isinstance(digests, list)
            and len(digests) == len(chunks)
            and all(is_content_digest(d) for d in digests)
        ):
            raise ManifestError(f"{where}: digests must be one xxh3-128 digest per chunk")
        chunks = [dataclasses.replace(c, digest=d) for c, d in zip(chunks, digests, strict=True)]
    return ChunkIndex(
        save_id=manifest.save_id, rank=ref.rank, files=tuple(files), chunks=tuple(chunks)
    )


def _block_field(c: ChunkRef) -> list[list[Any]]:
    """The chunk's optional tenth entry, as its codec writes it (none without blocks)."""
    field = CODECS[c.codec].write_fields(c) if c.blocks else None
    return [] if field is None else [field]


def _decode_chunk(
    rc: Any, n: int, files: list[DataFile], manifest: Manifest, where: str
) -> ChunkRef:
    w = f"{where}: chunks[{n}]"
    if not (isinstance(rc, list) and len(rc) in (9, 10)):
        raise ManifestError(f"{w}: malformed")
    fqn, offs, sizes, file_no, offset, length, codec, raw_length, chk = rc[:9]
    rec = manifest.records.get(fqn) if isinstance(fqn, str) else None
    if not isinstance(rec, TensorLeaf):
        raise ManifestError(f"{w}: {str(fqn)[:80]!r} is not a tensor of this checkpoint")
    w = f"{w} ({fqn})"
    offs_l, sizes_l = _int_list(offs, f"{w} offsets"), _int_list(sizes, f"{w} sizes")
    if len(offs_l) != len(rec.shape) or len(sizes_l) != len(rec.shape):
        raise ManifestError(f"{w}: box has the wrong number of dimensions")
    box = Box(offsets=tuple(offs_l), sizes=tuple(sizes_l))
    if any(o + s > d for o, s, d in zip(offs_l, sizes_l, rec.shape, strict=True)) or box.is_empty():
        raise ManifestError(f"{w}: box lies outside the tensor shape {list(rec.shape)} or is empty")
    fno = _int(file_no, f"{w} file", hi=max(1, len(files)))
    if fno >= len(files):
        raise ManifestError(f"{w}: file number {fno} out of range")
    f = files[fno]
    off = _int(offset, f"{w} offset")
    ln = _int(length, f"{w} length")
    if off + ln > f.size:
        raise ManifestError(
            f"{w}: bytes [{off}, {off + ln}) lie beyond the end of {f.name} ({f.size} bytes)"
        )
    codec_obj = CODECS.get(codec) if isinstance(codec, str) else None
    if codec_obj is None:
        raise ManifestError(f"{w}: unknown codec {str(codec)[:40]!r}")
    raw = _int(raw_length, f"{w} raw_length")
    itemsize = DTYPES[rec.dtype].itemsize
    if raw != box.volume * itemsize:
        raise ManifestError(f"{w}: raw_length {raw} does not match its box")
    if not is_checksum(chk):
        raise ManifestError(f"{w}: bad checksum field")
    blocks = codec_obj.read_fields(
        rc[9] if len(rc) == 10 else None,
        length=ln,
        raw_length=raw,
        dtype=rec.dtype,
        itemsize=itemsize,
        where=w,
    )
    return ChunkRef(
        fqn=fqn,
        box=box,
        file=f.name,
        offset=off,
        length=ln,
        codec=codec,
        raw_length=raw,
        checksum=chk,
        **blocks,
    )

"""Tools to damage and forge checkpoints, and to compare what a load returns.

A forged document gets a valid envelope checksum (computed here exactly as
the format specifies: xxh3-64 over the compact ASCII JSON of the body), so
every check *behind* the checksum is exercised.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import treeckpt
from treeckpt.store.checksum import checksum
from treeckpt.store.manifest import decode_index, decode_manifest, encode_index

MANIFEST = "manifest.json"
# min_ratio 1.1: normal floats ("w2") compress their sign-and-exponent plane
SAVE_OPTIONS = treeckpt.SaveOptions(
    chunk_bytes=2048,
    io_threads=2,
    compression=treeckpt.Compression(mode="auto", block_bytes=1024, min_ratio=1.1),
)


def sample_tree(seed: int = 0) -> dict[str, Any]:
    """Raw chunks (random bits as floats), compressed chunks (zeros, ints), numpy leaves, values."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (32, 32), generator=g, dtype=torch.int32)
    return {
        "w": bits.view(torch.float32),
        # normal floats: the sign and exponent plane compresses, the mantissa planes do not
        "w2": torch.randn(64, 48, generator=g),
        "z": torch.zeros(30, 50, dtype=torch.bfloat16) + seed,
        "i": torch.arange(500, dtype=torch.int64) * (seed + 1),
        "u8": torch.randint(0, 256, (300,), generator=g, dtype=torch.uint8),
        "s": torch.tensor(3.5 + seed, dtype=torch.float64),
        "np": np.arange(60, dtype=np.int32).reshape(6, 10) + seed,
        "step": 7 + seed,
        "name": f"run-{seed}",
    }


def template_of(tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.full(v.shape, 0, dtype=v.dtype)
        elif isinstance(v, np.ndarray):
            out[k] = np.zeros(v.shape, dtype=v.dtype)
        else:
            out[k] = None
    return out


def raw(x: Any) -> bytes:
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def same(expected: Any, got: Any) -> bool:
    """Bit-exact equality of two flat trees (tensors, arrays, values; floats by bits)."""
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and list(got) == list(expected)
            and all(same(expected[k], got[k]) for k in expected)
        )
    if isinstance(expected, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and got.dtype == expected.dtype
            and got.shape == expected.shape
            and raw(got) == raw(expected)
        )
    if isinstance(expected, np.ndarray):
        return (
            isinstance(got, np.ndarray)
            and got.dtype == expected.dtype
            and got.shape == expected.shape
            and raw(got) == raw(expected)
        )
    if isinstance(expected, float):
        return type(got) is float and struct.pack(">d", got) == struct.pack(">d", expected)
    return type(got) is type(expected) and got == expected


def seal(magic: str, body: Any, *, version: int = 1, check: str | None = None) -> bytes:
    """A document with a valid envelope checksum over ``body`` (unless ``check`` is given)."""
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    chk = check if check is not None else checksum(text.encode())
    head = f'{{"magic":{json.dumps(magic)},"format_version":{version},'
    return f'{head}"checksum":"{chk}","body":{text}}}'.encode()


class Ckpt:
    """A checkpoint directory on local disk, opened for surgery."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -------------------------------------------------------------- reading
    def read(self, rel: str) -> bytes:
        return (self.path / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        (self.path / rel).write_bytes(data)

    def manifest(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.read(MANIFEST))["body"]
        return body

    @property
    def save_id(self) -> str:
        return str(self.manifest()["save_id"])

    @property
    def data_dir(self) -> str:
        return f"data-{self.save_id}"

    def index_name(self, rank: int = 0) -> str:
        return str(self.manifest()["indexes"][rank]["file"])

    def index(self, rank: int = 0) -> dict[str, Any]:
        """The body of the ``rank``-th index, as the JSON form holds it (a binary one is decoded)."""
        name = self.index_name(rank)
        data = self.read(name)
        if name.endswith(".idx"):
            m = decode_manifest(self.read(MANIFEST))
            data = encode_index(decode_index(data, m.indexes[rank], m))
        body: dict[str, Any] = json.loads(data)["body"]
        return body

    def data_files(self, rank: int = 0) -> list[str]:
        return [name for name, _ in self.index(rank)["files"]]

    def files(self) -> list[str]:
        """Every file of the commit: manifest, index, data files."""
        return [MANIFEST, self.index_name(), *self.data_files()]

    # -------------------------------------------------------------- forging
    def write_manifest(self, body: Any, *, version: int = 1, magic: str = "treeckpt") -> None:
        self.write(MANIFEST, seal(magic, body, version=version))

    def edit_manifest(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        body = self.manifest()
        fn(body)
        self.write_manifest(body)

    def write_index(
        self,
        body: Any,
        rank: int = 0,
        *,
        version: int = 1,
        magic: str = "treeckpt-index",
        name: str | None = None,
    ) -> None:
        """Write an index and make the manifest point to it (size and checksum updated).

        The index is written in the JSON form; a binary one is replaced by its JSON twin.
        """
        blob = seal(magic, body, version=version)
        name = name or self.index_name(rank).replace(".idx", ".json")
        if not name.startswith("/") and ".." not in name:
            self.write(name, blob)
        m = self.manifest()
        m["indexes"][rank].update(file=name, size=len(blob), checksum=checksum(blob))
        self.write_manifest(m)

    def edit_index(self, fn: Callable[[dict[str, Any]], Any], rank: int = 0) -> None:
        body = self.index(rank)
        fn(body)
        self.write_index(body, rank)

    def replace_data(self, rel: str, data: bytes) -> None:
        """Replace a data file and record its new size in the index (chunks unchanged)."""
        self.write(rel, data)

        def fix(body: dict[str, Any]) -> None:
            for f in body["files"]:
                if f[0] == rel:
                    f[1] = len(data)

        self.edit_index(fix)

    def chunks_of(self, fqn: str) -> list[list[Any]]:
        return [c for c in self.index()["chunks"] if c[0] == fqn]


def copy(src: str | Path, dst: str | Path) -> Ckpt:
    shutil.copytree(src, dst)
    return Ckpt(dst)


def nbytes(shape: list[int], itemsize: int) -> int:
    return math.prod(shape) * itemsize

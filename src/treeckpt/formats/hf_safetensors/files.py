"""safetensors files through treeckpt's storage backends: headers, byte ranges, whole files.

A reader fetches the 8-byte length and the JSON header of each file, then
only the byte ranges of the regions it needs (:func:`read_region`), so a
rank loading a slice of a tensor never reads the rest of it. A writer
streams one tensor at a time after the header (:func:`write_file`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from treeckpt.core.box import Box
from treeckpt.errors import CheckpointNotFoundError, ManifestError, PlanError
from treeckpt.formats.hf_safetensors.layout import (
    HEADER_LENGTH_BYTES,
    INDEX_NAME,
    SUFFIX,
    Entry,
    Header,
    byte_runs,
    coalesce_runs,
    encode_header,
    header_length,
    parse_header,
    parse_index,
)
from treeckpt.store.backends import Backend, LocalBackend, open_backend

__all__ = [
    "Folder",
    "ReadCounter",
    "is_model_file",
    "opened",
    "read_folder",
    "read_header",
    "read_region",
    "tensor_bytes",
    "write_file",
]

_MAX_INDEX_BYTES = 256 * 1024 * 1024
#: On object stores, ranges of a region this close are fetched in one request.
REMOTE_MAX_GAP = 1024 * 1024
_OUR_NAMES = re.compile(r"^(shard-\d{5,}-)?model-\d{5,}-of-\d{5,}\.safetensors$")


def is_model_file(name: str) -> bool:
    """A file name this package writes (``[shard-0000r-]model-0000i-of-0000N.safetensors``)."""
    return _OUR_NAMES.match(name) is not None


@contextmanager
def opened(path: str) -> Iterator[Backend]:
    """The backend of folder ``path`` (a directory or an fsspec URL), closed afterwards."""
    backend = open_backend(path)
    try:
        yield backend
    finally:
        backend.close()


class ReadCounter:
    """How many byte ranges, and how many bytes, were read (thread-safe)."""

    def __init__(self) -> None:
        self.ranges = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.ranges += 1
            self.bytes += n


def _read_exact(
    backend: Backend, name: str, offset: int, out: memoryview, counter: ReadCounter | None
) -> None:
    got = backend.readinto(name, offset, out)
    if counter is not None:
        counter.add(len(out))
    if got != len(out):
        raise ManifestError(
            f"{name}: {got} of {len(out)} bytes at offset {offset} (truncated file)"
        )


def read_header(backend: Backend, name: str, counter: ReadCounter | None = None) -> Header:
    """The checked header of file ``name``: two reads, its length then its JSON."""
    size = backend.size(name)
    if size is None:
        raise CheckpointNotFoundError(f"{backend.root}/{name}: no such file")
    where = f"{backend.root}/{name}"
    prefix = bytearray(min(HEADER_LENGTH_BYTES, size))
    _read_exact(backend, name, 0, memoryview(prefix), counter)
    n = header_length(bytes(prefix), where, size)
    raw = bytearray(n)
    _read_exact(backend, name, HEADER_LENGTH_BYTES, memoryview(raw), counter)
    return parse_header(bytes(raw), where, size)


@dataclass(frozen=True, slots=True, kw_only=True)
class Folder:
    """The safetensors files of a folder, their headers, and its index's weight map (if any)."""

    root: str
    headers: dict[str, Header]
    weight_map: dict[str, str] | None

    def pieces(self) -> Iterator[tuple[str, Entry]]:
        """Every ``(file, entry)``, files in name order."""
        for file, header in self.headers.items():
            for entry in header.entries.values():
                yield file, entry


def read_folder(backend: Backend, counter: ReadCounter | None = None) -> Folder:
    """The folder's safetensors files: those its ``model.safetensors.index.json`` names,
    else every ``*.safetensors`` file in it. An index naming a tensor some other file holds,
    or a file that is missing, is an error."""
    weight_map: dict[str, str] | None = None
    if backend.size(INDEX_NAME) is not None:
        where = f"{backend.root}/{INDEX_NAME}"
        weight_map = parse_index(backend.read_file(INDEX_NAME, _MAX_INDEX_BYTES), where)
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(n for n in backend.listdir() if n.endswith(SUFFIX))
    if not names:
        raise CheckpointNotFoundError(
            f"{backend.root}: no safetensors files (and no {INDEX_NAME} naming any)"
        )
    headers = {name: read_header(backend, name, counter) for name in names}
    if weight_map is not None:
        for fqn, file in weight_map.items():
            if fqn not in headers[file].entries:
                raise ManifestError(
                    f"{backend.root}/{INDEX_NAME}: tensor {fqn!r} is not in {file}, "
                    "where the weight map puts it"
                )
    return Folder(root=backend.root, headers=headers, weight_map=weight_map)


def read_region(
    backend: Backend,
    file: str,
    entry: Entry,
    region: Box,
    counter: ReadCounter | None = None,
) -> torch.Tensor:
    """The elements of ``region`` (global coordinates, inside ``entry``'s piece), read as the
    contiguous byte ranges they occupy, never more."""
    if not entry.box.contains(region):
        raise PlanError(
            f"{entry.name}: region {region} outside the stored piece {entry.box} in {file}"
        )
    local = region.relative_to(entry.box)
    if local.is_empty():
        return torch.empty(local.sizes, dtype=entry.dtype)
    itemsize = entry.itemsize
    buf = bytearray(local.volume * itemsize)
    view = memoryview(buf)
    pos = 0
    max_gap = 0 if isinstance(backend, LocalBackend) else REMOTE_MAX_GAP
    for start, length, parts in coalesce_runs(byte_runs(entry.shape, itemsize, local), max_gap):
        if len(parts) == 1:
            _read_exact(backend, file, entry.start + start, view[pos : pos + length], counter)
            pos += length
            continue
        span = memoryview(bytearray(length))
        _read_exact(backend, file, entry.start + start, span, counter)
        for at, n in parts:
            view[pos : pos + n] = span[at : at + n]
            pos += n
    return torch.frombuffer(buf, dtype=torch.uint8).view(entry.dtype).reshape(local.sizes)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes in row-major order (copied only when not contiguous)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def write_file(
    backend: Backend,
    name: str,
    tensors: Sequence[tuple[str, torch.dtype, Sequence[int], Callable[[], torch.Tensor]]],
    metadata: Mapping[str, str] | None,
    *,
    sync: bool,
) -> dict[str, Entry]:
    """Write the safetensors file ``name``: the header, then each tensor's bytes as its
    fetch returns it (one tensor in memory at a time). A file already there is replaced."""
    header, entries = encode_header(((n, dt, sh) for n, dt, sh, _ in tensors), metadata)
    backend.remove(name)
    w = backend.open_writer(name)
    try:
        w.write(header)
        for fqn, dtype, shape, fetch in tensors:
            t = fetch()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise PlanError(
                    f"{fqn}: planned {dtype}{list(shape)}, got {t.dtype}{list(t.shape)}"
                )
            w.write(tensor_bytes(t))
        w.close(sync=sync)
    except BaseException:
        w.abort()
        raise
    return entries

"""A whole safetensors folder to and from a flat dict of tensors keyed by name.

:func:`read_tensors` assembles every tensor of a folder (whole-tensor files,
or the pieces a distributed save wrote); :func:`write_tensors` writes
``model-0000i-of-0000N.safetensors`` files of at most ``max_shard_bytes``
each (a larger tensor gets a file of its own) and the index, in the order
given, one tensor in memory per write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

from treeckpt.errors import OptionsError
from treeckpt.formats.hf_safetensors.files import opened, read_folder, read_region, write_file
from treeckpt.formats.hf_safetensors.layout import FORMAT_KEY, INDEX_NAME, encode_index, file_name
from treeckpt.formats.hf_safetensors.reader import folder_metadata

__all__ = ["DEFAULT_SHARD_BYTES", "is_folder", "read_tensors", "shard_files", "write_tensors"]

#: transformers' default ``max_shard_size`` ("5GB").
DEFAULT_SHARD_BYTES = 5 * 10**9


def is_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local directory holding a safetensors index or safetensors files."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        return False
    names = os.listdir(p)
    return INDEX_NAME in names or any(n.endswith(".safetensors") for n in names)


def read_tensors(
    path: str, on_bytes: Callable[[int], None] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, whole, by name (pieces assembled by their offsets)."""
    with opened(path) as backend:
        folder = read_folder(backend)
        described = folder_metadata(folder)  # dtypes agree and pieces tile each tensor
        out = {
            name: torch.empty(tuple(md.size), dtype=md.properties.dtype)
            for name, md in described.items()
        }
        for file, entry in folder.pieces():
            t = out[entry.name]
            t[entry.box.slices()] = read_region(backend, file, entry, entry.box)
            if on_bytes is not None:
                on_bytes(entry.stop - entry.start)
    return out


def shard_files(sizes: Mapping[str, int], max_shard_bytes: int) -> dict[str, int]:
    """File index (from 1) of each tensor, in order: a new file when the next tensor
    would take the current one past ``max_shard_bytes``.

    >>> shard_files({"a": 6, "b": 5, "c": 4, "d": 20}, 10)
    {'a': 1, 'b': 2, 'c': 2, 'd': 3}
    """
    if max_shard_bytes < 1:
        raise OptionsError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    index, used, out = 1, 0, {}
    for name, n in sizes.items():
        if used and used + n > max_shard_bytes:
            index, used = index + 1, 0
        out[name] = index
        used += n
    return out


def write_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, str]:
    """Write the folder (files, then the index); returns the weight map."""
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    index_of = shard_files(sizes, max_shard_bytes)
    count = max(index_of.values(), default=1)
    weight_map = {k: file_name(i, count) for k, i in index_of.items()}
    with opened(path) as backend:
        backend.makedirs("")
        for i in range(1, count + 1):
            name = file_name(i, count)
            members = [k for k, j in index_of.items() if j == i]
            write_file(
                backend,
                name,
                [
                    (k, tensors[k].dtype, tuple(tensors[k].shape), _fetch(tensors[k]))
                    for k in members
                ],
                {FORMAT_KEY: "pt"},
                sync=True,
            )
        backend.commit_file(INDEX_NAME, encode_index(weight_map, sum(sizes.values())), sync=True)
    return weight_map


def _fetch(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t

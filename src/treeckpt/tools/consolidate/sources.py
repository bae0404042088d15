"""What ``consolidate`` reads: a treeckpt checkpoint or one in torch's DCP format.

A source gives the saved tree with a :class:`Hole` where each tensor was (its
*skeleton*) and reads any region of a tensor into a given buffer. A DCP
checkpoint Lightning wrote comes with ``meta.pt`` (the other keys of the
checkpoint), which :func:`lightning_layout` folds back into Lightning's layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from treeckpt.core.box import Box
from treeckpt.core.leaves import PickleLeaf, TensorLeaf
from treeckpt.core.options import LoadOptions
from treeckpt.core.tree import build_tree
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, OptionsError
from treeckpt.shell.load import read_regions, read_stored, value_of
from treeckpt.store.backends import open_backend
from treeckpt.store.layout import MANIFEST
from treeckpt.store.reader import has_dcp_metadata, read_manifest

__all__ = [
    "Hole",
    "Source",
    "TorchDcpSource",
    "TreeckptSource",
    "lightning_layout",
    "open_dcp_source",
    "open_source",
    "read_lightning_meta",
]

_LIGHTNING_META = "meta.pt"  # what Lightning writes beside a DCP checkpoint


class Source(Protocol):
    """A checkpoint to consolidate: its tree, and its tensors read region by region."""

    format: str

    def skeleton(self) -> tuple[Any, dict[str, TensorLeaf]]:
        """The tree with each tensor replaced by a ``Hole(fqn)``, and each tensor's record."""
        ...

    def read(self, requests: list[tuple[str, Box, torch.Tensor]]) -> None:
        """Fill each ``out`` tensor with the region ``box`` of tensor ``fqn``."""
        ...

    def whole_tensors_only(self) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Hole:
    """Where tensor ``fqn`` stands in a skeleton."""

    fqn: str


class TreeckptSource:
    format = "treeckpt"

    def __init__(self, path: str) -> None:
        self.backend = open_backend(path)
        try:
            self.manifest = read_manifest(self.backend)
            self.stored = read_stored(self.backend, self.manifest)
        except BaseException:
            self.backend.close()
            raise

    def skeleton(self) -> tuple[Any, dict[str, TensorLeaf]]:
        records: dict[str, TensorLeaf] = {}

        def leaf(fqn: str) -> Any:
            rec = self.manifest.records[fqn]
            if isinstance(rec, TensorLeaf):
                records[fqn] = rec
                return Hole(fqn)
            if isinstance(rec, PickleLeaf):
                raise CheckpointError(
                    f"{fqn!r} was saved with pickle; a consolidated file is loaded with "
                    "torch.load(weights_only=True) and cannot hold it"
                )
            return value_of(fqn, rec, allow_pickle=False)

        return build_tree(self.manifest.structure, leaf), records

    def read(self, requests: list[tuple[str, Box, torch.Tensor]]) -> None:
        regions: dict[str, list[tuple[Box, Any]]] = {}
        for fqn, box, out in requests:
            regions.setdefault(fqn, []).append((box, out))
        read_regions(self.backend, self.manifest, self.stored, regions, LoadOptions())

    def whole_tensors_only(self) -> bool:
        return False

    def close(self) -> None:
        self.backend.close()


def open_dcp_source(path: str) -> Source:
    """The reader for a checkpoint in torch's DCP format: treeckpt's pickle-free one.

    ``.metadata`` is read by an allow-listed unpickler that accepts only the
    classes DCP writes, and stored values with ``torch.load(weights_only=True)``,
    so nothing in the checkpoint runs code. Tensors are read region by region
    (only the stored chunks a region meets), like a treeckpt checkpoint's.
    """
    return TorchDcpSource(path)


class TorchDcpSource:
    format = "dcp"

    def __init__(self, path: str) -> None:
        from treeckpt.formats.torch_dcp import read_dcp_metadata

        self.ckpt = read_dcp_metadata(path)

    def skeleton(self) -> tuple[Any, dict[str, TensorLeaf]]:
        from treeckpt.formats.torch_dcp import nest, read_dcp_value

        records: dict[str, TensorLeaf] = {}
        flat: dict[str, Any] = {}
        for fqn in self.ckpt.fqns:
            t = self.ckpt.tensors.get(fqn)
            if t is None:
                flat[fqn] = read_dcp_value(self.ckpt, fqn)
            else:
                records[fqn] = TensorLeaf(lib="torch", dtype=t.dtype, shape=t.shape)
                flat[fqn] = Hole(fqn)
        return nest(flat, self.ckpt.paths), records

    def read(self, requests: list[tuple[str, Box, torch.Tensor]]) -> None:
        from treeckpt.formats.torch_dcp import read_dcp_tensor

        for fqn, box, out in requests:
            read_dcp_tensor(self.ckpt, fqn, box, out=out)

    def whole_tensors_only(self) -> bool:
        return False

    def close(self) -> None:
        pass


def open_source(src: str) -> Source:
    local = "://" not in src or src.startswith("file://")
    path = src[len("file://") :] if src.startswith("file://") else src
    backend = open_backend(src)
    try:
        has_manifest = backend.size(MANIFEST) is not None
        has_dcp = has_dcp_metadata(backend)  # DCP's .metadata, not treeckpt's marker
        listing = backend.size("") is not None or bool(backend.listdir())
    finally:
        backend.close()
    if has_manifest:
        return TreeckptSource(src)
    if has_dcp:
        if not local:
            raise OptionsError(f"{src}: DCP-format checkpoints are read from local paths only")
        return open_dcp_source(path)
    if not listing:
        raise CheckpointNotFoundError(f"{src}: no checkpoint there")
    return TreeckptSource(src)  # raises the precise error (incomplete, not found)


def read_lightning_meta(src: str) -> dict[str, Any] | None:
    path = Path(src) / _LIGHTNING_META
    if not path.is_file():
        return None
    try:
        meta = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read Lightning's metadata with torch.load(weights_only=True): {exc}"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: Lightning's metadata is not a dict")
    return meta


def lightning_layout(tree: Any, meta: dict[str, Any] | None) -> Any:
    """Lightning's checkpoint layout from a DCP checkpoint Lightning wrote.

    Lightning's strategies save ``model`` (FSDP) or ``state_dict``
    (ModelParallel) and ``optimizer_0``, ``optimizer_1``... with DCP, and the
    other keys with ``torch.save`` into ``meta.pt``; the loaded checkpoint
    has ``state_dict`` and an ``optimizer_states`` list.
    """
    if meta is None or not isinstance(tree, dict):
        return tree
    out: dict[str, Any] = dict(meta)
    out["state_dict"] = tree.get("state_dict", tree.get("model", {}))
    opt_keys = sorted(
        (k for k in tree if isinstance(k, str) and re.fullmatch(r"optimizer_[0-9]+", k)),
        key=lambda k: int(k.split("_")[1]),
    )
    if opt_keys:
        out["optimizer_states"] = [tree[k] for k in opt_keys]
    for k, v in tree.items():
        if k not in ("state_dict", "model") and k not in opt_keys:
            out[k] = v
    return out

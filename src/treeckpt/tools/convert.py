"""Convert checkpoints between treeckpt, DCP, ``torch.save`` files, safetensors and HF folders.

The source format is recognised from what is at ``src``: a ``manifest.json``
(treeckpt, any fsspec URL), a ``.metadata`` file in a directory (a DCP
checkpoint written by ``torch.distributed.checkpoint``), a file starting
with a safetensors header, a ``torch.save`` file (zip or legacy), or a
directory of safetensors files (a Hugging Face folder, with or without its
``model.safetensors.index.json``, or the pieces of a distributed save). The
whole tree is read into memory, then written as ``to``:

- ``treeckpt``: ``treeckpt.save`` (atomic; any fsspec URL);
- ``dcp``: a directory in torch DCP's own format (``.metadata`` and one
  ``__0_0.distcp``), written by ``treeckpt.dcp``'s DCP writer, which
  ``torch.distributed.checkpoint.load`` reads;
- ``torch``: from a treeckpt checkpoint, ``treeckpt.tools.consolidate``
  (bounded memory); from the other formats, one ``torch.save`` file;
- ``safetensors``: the tensor leaves only, keyed by FQN (non-tensor leaves
  are listed in the result as dropped).
- ``hf``: a Hugging Face folder of the tensor leaves, keyed by FQN:
  ``model-0000i-of-0000N.safetensors`` files of at most ``max_shard_size``
  bytes and ``model.safetensors.index.json`` (non-tensor leaves dropped, as
  for ``safetensors``).

Safety: nothing read runs code. ``torch.save`` files are read with
``torch.load(weights_only=True)``, safetensors files never run code, and a
DCP checkpoint is read by ``treeckpt.dcp``'s pickle-free reader (its
``.metadata`` through an allow-listed unpickler, its items with
``weights_only=True``), so no flag is needed for it. ``allow_pickle=True``
is needed only for treeckpt checkpoints holding pickled leaves.

Files and directories written outside treeckpt's own format are first
written under a temporary name next to ``dst`` and then renamed into place,
so an interrupted conversion leaves no half-written ``dst``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import treeckpt
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.tree import build_tree, flatten_tree
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, ManifestError
from treeckpt.explore import TensorHandle
from treeckpt.formats.hf_safetensors import folder as hf_folder
from treeckpt.formats.torch_dcp import is_dcp_checkpoint, restore_dcp, write_dcp
from treeckpt.store import layout
from treeckpt.store.backends import open_backend

__all__ = ["FORMATS", "ConvertResult", "Format", "convert", "detect_format"]

Format = Literal["treeckpt", "dcp", "torch", "safetensors", "hf"]
FORMATS: tuple[Format, ...] = ("treeckpt", "dcp", "torch", "safetensors", "hf")

_DCP_METADATA = ".metadata"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


@dataclass(frozen=True, slots=True, kw_only=True)
class ConvertResult:
    """What a conversion did: formats, how many tensors and raw bytes, which leaves it dropped."""

    src: str
    dst: str
    src_format: Format
    dst_format: Format
    tensors: int
    raw_bytes: int
    dropped: tuple[str, ...] = field(default=())


def detect_format(src: str | os.PathLike[str]) -> Format:
    """The format of the checkpoint at ``src``.

    Raises:
        CheckpointNotFoundError: nothing recognisable is there.
    """
    path = os.fspath(src)
    backend = open_backend(path)
    try:
        if backend.size(layout.MANIFEST) is not None:
            return "treeckpt"
    except (NotADirectoryError, FileNotFoundError):
        pass  # a file: one of the single-file formats
    finally:
        backend.close()
    local = Path(path[len("file://") :] if path.startswith("file://") else path)
    if "://" in path and not path.startswith("file://"):
        raise CheckpointNotFoundError(f"{path}: no treeckpt checkpoint (no {layout.MANIFEST})")
    if local.is_dir():
        if is_dcp_checkpoint(local):  # DCP's .metadata, not treeckpt's marker
            return "dcp"
        if hf_folder.is_folder(local):
            return "hf"
        raise CheckpointNotFoundError(
            f"{path}: a directory with neither {layout.MANIFEST} (treeckpt), "
            f"{_DCP_METADATA} (DCP) nor safetensors files (Hugging Face)"
        )
    if not local.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    with local.open("rb") as f:
        head = f.read(9)
    size = local.stat().st_size
    if head[:4] == _ZIP_MAGIC or head[:1] == bytes([_PICKLE_PROTO]):
        return "torch"
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size and head[8:9] == b"{":
            return "safetensors"
    raise CheckpointNotFoundError(
        f"{path}: not a treeckpt, DCP, torch.save or safetensors checkpoint"
    )


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Format,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_memory: int | None = None,
    max_shard_size: int | None = None,
    save_options: treeckpt.SaveOptions | None = None,
    on_start: Callable[[int | None], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into format ``to`` at ``dst``.

    Args:
        to: ``treeckpt``, ``dcp``, ``torch``, ``safetensors`` or ``hf``.
        overwrite: replace an existing ``dst`` (refused by default).
        allow_pickle: allow reading treeckpt leaves saved with pickle (DCP
            checkpoints are read without pickle and need no flag).
        max_memory: for ``torch`` from treeckpt, passed to ``consolidate``.
        max_shard_size: for ``hf``, the most bytes per file (transformers' 5 GB by default).
        save_options: for ``treeckpt``, how to store (chunking, compression).
        on_start: called once with the raw bytes to convert (``None`` when unknown).
        on_bytes: called with the raw bytes of each tensor as it is read.

    Raises:
        CheckpointError: ``dst`` exists without ``overwrite``, the source is
            missing or damaged, or the target format cannot hold a leaf (named).
    """
    if to not in FORMATS:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {', '.join(FORMATS)}")
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    src_format = detect_format(src_s)
    if _same_place(src_s, dst_s):
        raise CheckpointError(f"{dst_s}: the destination is the source")
    if not overwrite and _exists(dst_s, to):
        raise CheckpointError(
            f"{dst_s} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if to == "torch" and src_format == "treeckpt":
        # Imported by name: consolidation lives in its own module of this package.
        consolidate = importlib.import_module("treeckpt.tools.consolidate").consolidate
        consolidate(src_s, dst_s, max_memory=max_memory, overwrite=overwrite)
        info = treeckpt.metadata(src_s)
        return ConvertResult(
            src=src_s,
            dst=dst_s,
            src_format=src_format,
            dst_format=to,
            tensors=len(info.tensors),
            raw_bytes=info.raw_bytes,
        )
    tree = _read(src_s, src_format, allow_pickle=allow_pickle, on_start=on_start, on_bytes=on_bytes)
    flat = flatten_tree(tree, allow_pickle=True)
    tensor_fqns = [f for f, r in flat.records.items() if isinstance(r, TensorLeaf)]
    raw = sum(_nbytes(flat.leaves[f]) for f in tensor_fqns)
    dropped: tuple[str, ...] = ()
    if to == "treeckpt":
        treeckpt.save(tree, dst_s, options=save_options, allow_pickle=allow_pickle)
    elif to == "dcp":
        _write_dcp(tree, dst_s)
    elif to == "torch":
        _replace_into(dst_s, lambda tmp: torch.save(tree, tmp))
    else:
        dropped = tuple(f for f in flat.records if f not in set(tensor_fqns))
        tensors = {f: flat.leaves[f] for f in tensor_fqns}
        if to == "hf":
            _write_hf(tensors, dst_s, max_shard_size or hf_folder.DEFAULT_SHARD_BYTES)
        else:
            _write_safetensors(tensors, dst_s)
    return ConvertResult(
        src=src_s,
        dst=dst_s,
        src_format=src_format,
        dst_format=to,
        tensors=len(tensor_fqns),
        raw_bytes=raw,
        dropped=dropped,
    )


# ------------------------------------------------------------------ reading


def _read(
    src: str,
    fmt: Format,
    *,
    allow_pickle: bool,
    on_start: Callable[[int | None], None] | None,
    on_bytes: Callable[[int], None] | None,
) -> Any:
    if fmt == "treeckpt":
        return _read_treeckpt(src, allow_pickle=allow_pickle, on_start=on_start, on_bytes=on_bytes)
    if on_start is not None:
        on_start(None)
    if fmt == "dcp":
        tree = restore_dcp(src)  # pickle-free; its errors name the file and the FQN
    elif fmt == "hf":
        tree = hf_folder.read_tensors(src)  # every tensor whole, by name; no code runs
    elif fmt == "torch":
        try:
            tree = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError...
            raise CheckpointError(
                f"{src}: cannot be read as a torch.save file with weights_only=True "
                f"({str(exc).splitlines()[0][:200]})"
            ) from None
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tree = load_file(src)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{src}: not a readable safetensors file ({exc})") from None
    if on_bytes is not None:
        flat = flatten_tree(tree, allow_pickle=True)
        on_bytes(sum(_nbytes(v) for v in flat.leaves.values() if _is_tensor(v)))
    return tree


def _read_treeckpt(
    src: str,
    *,
    allow_pickle: bool,
    on_start: Callable[[int | None], None] | None,
    on_bytes: Callable[[int], None] | None,
) -> Any:
    """The saved tree, read tensor by tensor (so progress can be shown)."""
    with treeckpt.open(src, allow_pickle=allow_pickle) as ckpt:
        if on_start is not None:
            on_start(ckpt.raw_bytes)

        def leaf(fqn: str) -> Any:
            entry = ckpt[fqn]
            if isinstance(entry, TensorHandle):
                value = entry.read()
                if on_bytes is not None:
                    on_bytes(entry.nbytes)
                return value
            return entry

        return build_tree(ckpt.structure, leaf)


# ------------------------------------------------------------------ writing


def _write_dcp(tree: Any, dst: str) -> None:
    state = tree if isinstance(tree, dict) else {"state": tree}

    def no_fetch(fqn: str) -> torch.Tensor:
        raise AssertionError(f"{fqn}: every tensor is in memory")  # pragma: no cover

    def write(tmp: str) -> None:
        try:
            write_dcp(state, no_fetch, tmp)
        except CheckpointError:
            raise
        # A value torch.save cannot pickle (a class defined nowhere importable).
        except Exception as exc:
            raise CheckpointError(
                f"{dst}: DCP cannot write this checkpoint ({_last_line(exc)})"
            ) from None

    _replace_into(dst, write)


def _write_safetensors(tensors: dict[str, Any], dst: str) -> None:
    from safetensors.torch import save_file

    out = {}
    storages: set[int] = set()
    for fqn, v in tensors.items():
        t = torch.from_numpy(np.ascontiguousarray(v)) if not isinstance(v, torch.Tensor) else v
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():  # tied weights: safetensors refuses shared storage
            t = t.clone()
        storages.add(ptr)
        out[fqn] = t
    try:
        _replace_into(dst, lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{dst}: safetensors cannot store this checkpoint ({exc})") from None


def _write_hf(tensors: dict[str, Any], dst: str, max_shard_size: int) -> None:
    out = {
        fqn: (torch.from_numpy(np.ascontiguousarray(v)) if not isinstance(v, torch.Tensor) else v)
        for fqn, v in tensors.items()
    }

    def write(tmp: str) -> None:
        hf_folder.write_tensors(out, tmp, max_shard_size)

    try:
        _replace_into(dst, write)
    except ManifestError as exc:  # a dtype safetensors has no name for
        raise CheckpointError(f"{dst}: safetensors cannot store this checkpoint ({exc})") from None


def _replace_into(dst: str, write: Callable[[str], None]) -> None:
    """Write with ``write(tmp)`` next to ``dst``, then move it into place (replacing ``dst``)."""
    if "://" in dst and not dst.startswith("file://"):
        raise CheckpointError(f"{dst}: only treeckpt checkpoints can be written to URLs")
    target = Path(dst[len("file://") :] if dst.startswith("file://") else dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        write(str(tmp))
        if target.is_dir():
            target.rename(old)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    _remove(old)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ------------------------------------------------------------------ checks and sizes


def _last_line(exc: BaseException) -> str:
    """The gist of an error whose text may carry whole tracebacks (DCP's do)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _exists(dst: str, to: Format) -> bool:
    if "://" in dst and not dst.startswith("file://"):
        backend = open_backend(dst)
        try:
            return backend.size("") is not None or bool(backend.listdir())
        finally:
            backend.close()
    path = Path(dst[len("file://") :] if dst.startswith("file://") else dst)
    if to == "treeckpt" and path.is_dir():
        return any(path.iterdir())  # an empty directory is fine to save into
    return path.exists()


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor | np.ndarray | np.generic)


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    return int(np.asarray(v).nbytes)

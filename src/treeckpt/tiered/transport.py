"""A torchft checkpoint transport built on treeckpt chunks: chunked, checksummed, pickle-free.

torchft heals a replica that fell behind by sending it a healthy replica's
live state dict (``CheckpointTransport.send_checkpoint`` /
``recv_checkpoint``). Its own transports pickle what they send and unpickle
what they receive. :class:`ChunkTransport` sends an ordinary one-writer
treeckpt checkpoint instead: a JSON header (the files and their sizes), the
manifest, the chunk index and the data files, each a uint8 tensor over
torchft's process group. The receiver validates every name and size, and
the loader checks every checksum; values travel as treeckpt's typed
records, so nothing received runs code.

Each rank sends its own shards (a DTensor's local tensor, with its mesh and
placements as plain data) to the same rank of the recovering replica, as
torchft expects: the replicas share one sharding. ``state_dict``, when
given, is a function returning the receiver's own state dict: the received
values are then copied into its tensors in place.

torchft is optional: without it, ``ChunkTransport`` derives from a class of
the same interface.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch

from treeckpt.core.options import Compression, LoadOptions, SaveOptions
from treeckpt.errors import CheckpointError
from treeckpt.shell.committed import load_committed
from treeckpt.shell.coord import LocalCoordinator
from treeckpt.shell.load import load_tree, restore_tree
from treeckpt.shell.save import save_tree
from treeckpt.store import layout
from treeckpt.store.backends import Backend, open_backend

T = TypeVar("T")

__all__ = ["CheckpointTransport", "ChunkTransport"]

try:
    from torchft.checkpointing.transport import CheckpointTransport
except ImportError:  # pragma: no cover - torchft is optional

    class CheckpointTransport(Generic[T], ABC):  # type: ignore[no-redef]
        """torchft's ``CheckpointTransport`` interface, for use without torchft."""

        @abstractmethod
        def metadata(self) -> str: ...

        @abstractmethod
        def send_checkpoint(
            self, dst_ranks: list[int], step: int, state_dict: T, timeout: timedelta
        ) -> None: ...

        def disallow_checkpoint(self) -> None:
            return None

        @abstractmethod
        def recv_checkpoint(
            self, src_rank: int, metadata: str, step: int, timeout: timedelta
        ) -> T: ...

        def shutdown(self, wait: bool = True) -> None:
            return None


FORMAT = "treeckpt-chunks/1"
#: the marker key of a DTensor's local view
DTENSOR_KEY = "treeckpt.dtensor.local"
MAX_HEADER_BYTES = 16 << 20
_TAG_LENGTH, _TAG_HEADER, _TAG_FILES = 1, 2, 3
_PLACEMENT = re.compile(r"(S|R)(?:\(([0-9]{1,3})\))?")


def _placement_text(p: Any) -> str:
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(p, Shard):
        return f"S({p.dim})"
    if isinstance(p, Replicate):
        return "R"
    raise CheckpointError(f"a DTensor placement {p!r} cannot be sent (Shard and Replicate can)")


def _placement(text: str) -> Any:
    from torch.distributed.tensor import Replicate, Shard

    m = _PLACEMENT.fullmatch(text)
    if m is None:
        raise CheckpointError(f"received an invalid DTensor placement {text!r}")
    return Shard(int(m.group(2))) if m.group(1) == "S" else Replicate()


def local_view(tree: Any) -> Any:
    """``tree`` with each DTensor replaced by its local tensor and its layout as plain data."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        mesh = tree.device_mesh
        return {
            DTENSOR_KEY: tree.to_local(),
            "device_type": mesh.device_type,
            "mesh": mesh.mesh.tolist(),
            "dim_names": list(mesh.mesh_dim_names or ()),
            "placements": [_placement_text(p) for p in tree.placements],
            "shape": list(tree.shape),
            "stride": list(tree.stride()),
        }
    if isinstance(tree, dict):
        return type(tree)((k, local_view(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [local_view(v) for v in tree]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(local_view(v) for v in tree)
    return tree


def from_local_view(tree: Any) -> Any:
    """The inverse of :func:`local_view` for a received tree: DTensors rebuilt from plain data."""
    if isinstance(tree, dict) and DTENSOR_KEY in tree:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

        local = tree[DTENSOR_KEY]
        names = tuple(tree["dim_names"]) or None
        mesh = DeviceMesh(
            tree["device_type"], tree["mesh"], mesh_dim_names=names, _init_backend=False
        )
        # The local tensor as sent, also on a rank outside the mesh (``from_local``
        # would replace it with an empty one there).
        spec = DTensorSpec(
            mesh,
            tuple(_placement(p) for p in tree["placements"]),
            tensor_meta=TensorMeta(torch.Size(tree["shape"]), tuple(tree["stride"]), local.dtype),
        )
        return DTensor(local, spec, requires_grad=False)
    if isinstance(tree, dict):
        return type(tree)((k, from_local_view(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [from_local_view(v) for v in tree]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(from_local_view(v) for v in tree)
    return tree


class ChunkTransport(CheckpointTransport[T]):
    """A torchft ``CheckpointTransport`` sending treeckpt chunks over torchft's process group.

    Args:
        pg: the process group of the replicas (torchft's ``ProcessGroup``, or
            anything with ``send``/``recv`` of tensor lists returning works).
        timeout: the default bound of every message.
        state_dict: returns the receiver's state dict, filled in place.
        options: how the chunks are encoded (uncompressed by default).
    """

    def __init__(
        self,
        pg: Any,
        timeout: timedelta,
        state_dict: Callable[[], object] | None = None,
        options: SaveOptions | None = None,
    ) -> None:
        self._pg = pg
        self._timeout = timeout
        self._state_dict = state_dict
        self._options = options or SaveOptions(
            compression=Compression(mode="never"), sync=False, check_replicas=False
        )

    def metadata(self) -> str:
        return FORMAT

    def disallow_checkpoint(self) -> None:
        return None  # sends are synchronous: nothing is read after send_checkpoint returns

    def shutdown(self, wait: bool = True) -> None:
        return None

    def send_checkpoint(
        self, dst_ranks: list[int], step: int, state_dict: T, timeout: timedelta
    ) -> None:
        backend = _scratch()
        try:
            save_tree(
                local_view(state_dict),
                backend,
                options=self._options,
                coord=LocalCoordinator(),
                user_metadata={"step": step},
            )
            # The manifest, chunk index and data files; not the DCP marker (no
            # data, and the receiver accepts only a checkpoint's own files).
            names = sorted(n for n in backend.list_files() if n != layout.DCP_MARKER)
            files = [(n, backend.read_file(n, 1 << 62)) for n in names]
        finally:
            _drop(backend)
        header = json.dumps(
            {"format": FORMAT, "step": step, "files": [[n, len(d)] for n, d in files]}
        ).encode()
        length = torch.tensor([len(header)], dtype=torch.int64)
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        works = []
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in files]
        for dst in dst_ranks:
            works.append(self._pg.send([length], dst, tag=_TAG_LENGTH))
            works.append(self._pg.send([head], dst, tag=_TAG_HEADER))
            for i, t in enumerate(tensors):
                if t.numel():
                    works.append(self._pg.send([t], dst, tag=_TAG_FILES + i))
        for w in works:
            w.wait(timeout)

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> T:
        if metadata != FORMAT:
            raise CheckpointError(
                f"the sending replica uses the transport format {metadata!r}, not {FORMAT!r}"
            )
        length = torch.zeros(1, dtype=torch.int64)
        self._pg.recv([length], src_rank, tag=_TAG_LENGTH).wait(timeout)
        n = int(length.item())
        if not 0 < n <= MAX_HEADER_BYTES:
            raise CheckpointError(f"rank {src_rank} sent a header length of {n} bytes")
        head = torch.empty(n, dtype=torch.uint8)
        self._pg.recv([head], src_rank, tag=_TAG_HEADER).wait(timeout)
        files = _check_header(head.numpy().tobytes(), src_rank, step)
        backend = _scratch()
        try:
            for i, (name, size) in enumerate(files):
                buf = torch.empty(size, dtype=torch.uint8)
                if size:
                    self._pg.recv([buf], src_rank, tag=_TAG_FILES + i).wait(timeout)
                w = backend.open_writer(name)
                w.write(buf.numpy().tobytes())
                w.close(sync=False)
            return self._load(backend, step)
        finally:
            _drop(backend)

    def _load(self, backend: Backend, step: int) -> Any:
        coord = LocalCoordinator()
        if self._state_dict is not None:
            template = self._state_dict()
            view = local_view(template)

            def fill(manifest: Any, stored: Any) -> Any:
                _check_step(manifest, step)
                return load_tree(
                    view, backend, manifest, stored, strict=True, allow_pickle=False,
                    options=LoadOptions(), rank=0, world_size=1,
                )  # fmt: skip

            load_committed(backend, coord, "receive", fill, fills_in_place=True)
            return _refill(template, view)

        def restore(manifest: Any, stored: Any) -> Any:
            _check_step(manifest, step)
            return restore_tree(
                backend, manifest, stored, allow_pickle=False, options=LoadOptions()
            )

        return from_local_view(load_committed(backend, coord, "receive", restore))


def _refill(template: Any, view: Any) -> Any:
    """Values (not tensors, which were filled in place) of ``view`` put back into ``template``."""
    from torch.distributed.tensor import DTensor

    if isinstance(template, (DTensor, torch.Tensor)):
        return template
    if isinstance(template, dict):
        for k in template:
            template[k] = _refill(template[k], view[k])
        return template
    if isinstance(template, list):
        for i, v in enumerate(template):
            template[i] = _refill(v, view[i])
        return template
    return view


def _check_step(manifest: Any, step: int) -> None:
    got = manifest.user_metadata.get("step")
    if got != step:
        raise CheckpointError(f"received the checkpoint of step {got!r}, expected step {step}")


def _check_header(data: bytes, src: int, step: int) -> list[tuple[str, int]]:
    try:
        head = json.loads(data)
        assert isinstance(head, dict) and head.get("format") == FORMAT
        assert head.get("step") == step, f"step {head.get('step')!r}, expected {step}"
        files = head["files"]
        assert isinstance(files, list) and 0 < len(files) <= 1 << 20
        out = []
        for entry in files:
            assert isinstance(entry, list) and len(entry) == 2
            name, size = entry
            assert isinstance(name, str) and type(size) is int and 0 <= size < 1 << 48
            out.append((name, size))
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise CheckpointError(f"rank {src} sent an invalid checkpoint header ({exc})") from None
    save_ids = {n.split("/", 1)[0][len("data-") :] for n, _ in out if n != layout.MANIFEST}
    ok = len(save_ids) == 1 and layout.is_save_id(next(iter(save_ids)))
    for name, _ in out:
        if not ok or not (
            name == layout.MANIFEST
            or layout.is_index_file(name, next(iter(save_ids)), 0)
            or layout.is_data_file(name, next(iter(save_ids)), 0)
        ):
            raise CheckpointError(
                f"rank {src} sent the file name {name!r}, not one of a checkpoint"
            )
    return out


def _scratch() -> Backend:
    return open_backend(f"memory://treeckpt-transport/{uuid.uuid4().hex}")


def _drop(backend: Backend) -> None:
    with contextlib.suppress(Exception):
        backend.remove_tree("")
    backend.close()

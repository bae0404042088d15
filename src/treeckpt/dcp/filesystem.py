"""File-system storage, as in ``torch.distributed.checkpoint.filesystem``, in treeckpt's format.

:class:`FileSystemWriter` writes a treeckpt checkpoint (``manifest.json``,
per-save data files, checksums, atomic overwrite) at a local path or any
fsspec URL; :class:`FileSystemReader` reads it back with resharding, and
presents it to planners as DCP's :class:`~treeckpt.dcp.metadata.Metadata`.
A directory written by torch's own DCP (a ``.metadata`` file and no
``manifest.json``) is read by :class:`~treeckpt.formats.torch_dcp.TorchDcpReader`,
without running its pickles, with the same resharding.

``FileSystem``, ``FileSystemBase`` and ``SerializationFormat`` are torch's,
re-exported for code that names them.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemBase, SerializationFormat
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from treeckpt.core.box import Box
from treeckpt.core.dtypes import torch_dtype
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.options import LoadOptions, SaveOptions
from treeckpt.dcp._shards import ShardSet
from treeckpt.dcp._view import (
    RAW_BYTES_KEY,
    TreeckptStorage,
    is_torch_format,
    metadata_of,
    value_item,
)
from treeckpt.dcp.staging import BlockingAsyncStager
from treeckpt.errors import CheckpointError, LoadMismatchError
from treeckpt.formats.torch_dcp import DcpCheckpoint, TorchDcpReader
from treeckpt.formats.torch_dcp.protocol import commit_read, done, encode_bytes, stored_box
from treeckpt.shell.coord import Coordinator
from treeckpt.shell.load import read_regions, read_stored
from treeckpt.shell.save import SaveResult, save_tree
from treeckpt.store import layout
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.reader import read_manifest

__all__ = [
    "FileSystem",
    "FileSystemBase",
    "FileSystemReader",
    "FileSystemWriter",
    "SerializationFormat",
]


def _path_str(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


class FileSystemWriter(StorageWriter, BlockingAsyncStager):
    """Write a treeckpt checkpoint at ``path`` (a directory or fsspec URL).

    Args mirror DCP's: ``sync_files`` fsyncs data, manifest and directory;
    ``thread_count`` is the number of threads per rank that encode and write
    (each writes its own file); ``overwrite=False`` refuses a path that already
    holds a committed checkpoint. ``single_file_per_rank``,
    ``per_thread_copy_ahead``, ``cache_staged_state_dict``, ``_extensions`` and
    ``serialization_format`` are accepted for compatibility: treeckpt's layout
    (per-rank, per-thread data files, zstd where it pays) is the same for all.
    As in DCP, the writer is also a stager for ``async_save``
    (``cache_staged_state_dict`` reuses its host buffers across saves).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
    ) -> None:
        StorageWriter.__init__(self)
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)
        self.path = _path_str(path)
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.cache_staged_state_dict = cache_staged_state_dict
        self.overwrite = overwrite
        self.extensions = _extensions
        self.serialization_format = serialization_format
        self.is_coordinator = False
        self.options = SaveOptions(sync=sync_files, io_threads=max(1, thread_count))
        self.result: SaveResult | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = _path_str(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Unused: ``treeckpt.dcp.save`` writes through :meth:`save_items`, a collective."""
        raise CheckpointError(
            "FileSystemWriter writes treeckpt's format; use it through treeckpt.dcp.save"
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        return None  # the commit happened in the collective save

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, str | os.PathLike)

    # --- treeckpt's side -------------------------------------------------

    def open_backend(self) -> Backend:
        return open_backend(self.path)

    def check_overwrite(self, backend: Backend) -> None:
        """With ``overwrite=False``, refuse a path holding a committed checkpoint."""
        if not self.overwrite and (
            backend.size(layout.MANIFEST) is not None or backend.size(".metadata") is not None
        ):
            raise CheckpointError(
                f"{backend.root}: a checkpoint exists and FileSystemWriter(overwrite=False) "
                "was given"
            )

    def save_tree(self, tree: Any, coord: Coordinator, user_metadata: dict[str, Any]) -> None:
        """Save ``tree`` collectively with treeckpt's format (every rank calls this)."""
        backend = self.open_backend()
        try:
            err: Exception | None = None
            try:
                self.check_overwrite(backend)
                if coord.is_coordinator:
                    backend.makedirs("")
            except Exception as exc:
                err = exc
            coord.agree("prepare", err)
            self.result = save_tree(
                tree,
                backend,
                options=self.options,
                coord=coord,
                user_metadata=user_metadata or None,
            )
        finally:
            backend.close()

    def save_items(
        self, plan: SavePlan, planner: SavePlanner, metadata: Metadata, coord: Coordinator
    ) -> list[WriteResult]:
        """Write a planner's items as a treeckpt checkpoint (every rank calls this).

        Tensors become (shape, box) shards; non-tensor items keep the planner's
        bytes, read back as they were written.
        """
        shards: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]] = {}
        values: dict[str, bytes] = {}
        results: list[WriteResult] = []
        err: Exception | None = None
        try:
            for item in plan.items:
                data = planner.resolve_data(item)
                fqn = item.index.fqn
                if item.type == WriteItemType.BYTE_IO:
                    raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                    values[fqn] = raw
                    results.append(
                        WriteResult(index=item.index, size_in_bytes=len(raw), storage_data=None)
                    )
                    continue
                td = item.tensor_data
                assert td is not None and isinstance(data, torch.Tensor)
                local = data.detach()
                if tuple(local.shape) != tuple(td.chunk.sizes):
                    local = local.reshape(tuple(td.chunk.sizes))
                shards.setdefault(fqn, []).append(
                    (tuple(int(o) for o in td.chunk.offsets), tuple(td.chunk.sizes), local)
                )
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=local.numel() * local.element_size(),
                        storage_data=None,
                    )
                )
        except Exception as exc:
            err = exc
        coord.agree("resolve", err)
        all_values = coord.gather(values, "values")
        tree: dict[str, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                tree[fqn] = ShardSet(tuple(md.size), md.properties.dtype, shards.get(fqn, []))
        raw_fqns: list[str] = []
        if all_values is not None:
            for vs in all_values:
                for fqn, raw in vs.items():
                    tree[fqn] = raw
                    raw_fqns.append(fqn)
        self.save_tree(tree, coord, {RAW_BYTES_KEY: sorted(raw_fqns)})
        return results


class FileSystemReader(StorageReader):
    """Read a treeckpt checkpoint at ``path`` (a directory or fsspec URL), or one torch's DCP wrote.

    Every chunk is verified before use; a rank reads only the byte ranges its
    shards need. ``_extension_registry`` is accepted for compatibility.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        _extension_registry: Any | None = None,
    ) -> None:
        super().__init__()
        self.path = _path_str(path)
        self.extension_registry = _extension_registry
        self.storage: TreeckptStorage | None = None
        self.delegate: StorageReader | None = None
        self.options = LoadOptions()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = _path_str(checkpoint_id)
        self.storage = None
        self.delegate = None

    def _torch_delegate(self) -> StorageReader | None:
        if self.delegate is None:
            backend = open_backend(self.path)
            try:
                torch_written = is_torch_format(backend)
            finally:
                backend.close()
            if torch_written:
                self.delegate = TorchDcpReader(self.path)
        return self.delegate

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        delegate = self._torch_delegate()
        if delegate is not None:
            return delegate.read_metadata(*args, **kwargs)
        backend = open_backend(self.path)
        try:
            manifest = read_manifest(backend)
            stored = read_stored(backend, manifest)
        finally:
            backend.close()
        md = metadata_of(manifest, stored)
        assert isinstance(md.storage_data, TreeckptStorage)
        self.storage = md.storage_data
        return md

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(metadata.storage_data, TreeckptStorage):
            self.storage = metadata.storage_data
            return
        if self.delegate is None and isinstance(metadata.storage_data, DcpCheckpoint):
            self.delegate = TorchDcpReader(self.path)  # another rank read the metadata
        delegate = self._torch_delegate()
        if delegate is not None:
            delegate.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        if self.delegate is not None:
            return self.delegate.prepare_local_plan(plan)
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        if self.delegate is not None:
            return self.delegate.prepare_global_plan(plans)
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.delegate is not None:
            return self.delegate.read_data(plan, planner)
        if self.storage is None:
            self.read_metadata()
        assert self.storage is not None
        manifest, stored = self.storage.manifest, self.storage.stored
        raw_fqns = set(manifest.user_metadata.get(RAW_BYTES_KEY, ()))
        buffers: dict[tuple[str, Box], torch.Tensor] = {}
        tensor_items = []
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                value = value_item(self.storage, fqn)
                if fqn in raw_fqns and isinstance(value, bytes):
                    buf = io.BytesIO(value)
                else:
                    buf = encode_bytes(fqn, value)
                planner.load_bytes(item, buf)
                continue
            rec = manifest.records.get(fqn)
            if not isinstance(rec, TensorLeaf):
                raise LoadMismatchError(missing=[fqn])
            box = stored_box(item)
            key = (fqn, box)
            if key not in buffers:
                buffers[key] = torch.empty(box.sizes, dtype=torch_dtype(rec.dtype))
            tensor_items.append((item, buffers[key]))
        regions: dict[str, list[tuple[Box, Any]]] = {}
        for (fqn, box), buf_t in buffers.items():
            regions.setdefault(fqn, []).append((box, buf_t))
        backend = open_backend(self.path)
        try:
            read_regions(backend, manifest, stored, regions, self.options)
        finally:
            with contextlib.suppress(Exception):
                backend.close()
        for item, src in tensor_items:
            commit_read(planner, item, src)
        return done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, str | os.PathLike)

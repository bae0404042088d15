"""A DCP ``StorageReader`` over a Hugging Face safetensors folder.

``read_metadata`` reads each file's header only (two small reads per file)
and describes every tensor as DCP ``Metadata``: whole tensors from an
ordinary folder, or the pieces ``DCP_SHARDING_INFO`` places (a folder a
distributed save wrote), checked to tile their tensor. Any planner then
reshards by box intersection; ``read_data`` reads, for each ``ReadItem``,
only the byte ranges of its region, in ``thread_count`` threads (one file
per thread at a time). Values are copied into the planner's tensors with
nothing cast (:func:`treeckpt.formats.torch_dcp.protocol.commit_read`).
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from treeckpt.core.box import check_tiling
from treeckpt.errors import PlanError
from treeckpt.formats.hf_safetensors.files import (
    Folder,
    ReadCounter,
    opened,
    read_folder,
    read_region,
)
from treeckpt.formats.hf_safetensors.layout import Entry
from treeckpt.formats.torch_dcp.protocol import commit_read, done, stored_box
from treeckpt.store.backends import Backend

__all__ = ["SafetensorsReader", "folder_metadata"]


def folder_metadata(folder: Folder) -> dict[str, TensorStorageMetadata]:
    """DCP's description of each tensor of ``folder``: dtype, whole size, stored pieces."""
    pieces: dict[str, list[Entry]] = {}
    for _, entry in folder.pieces():
        pieces.setdefault(entry.name, []).append(entry)
    out: dict[str, TensorStorageMetadata] = {}
    for name, entries in pieces.items():
        dtypes = {e.dtype for e in entries}
        ndims = {len(e.shape) for e in entries}
        if len(dtypes) != 1 or len(ndims) != 1:
            raise PlanError(f"{name!r} in {folder.root}: pieces of different dtypes or ranks")
        ndim = ndims.pop()
        size = tuple(max(e.offsets[d] + e.shape[d] for e in entries) for d in range(ndim))
        check_tiling(size, [e.box for e in entries], what=f"{name!r} in {folder.root}")
        out[name] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtypes.pop()),
            size=torch.Size(size),
            chunks=[
                ChunkStorageMetadata(offsets=torch.Size(e.offsets), sizes=torch.Size(e.shape))
                for e in entries
            ],
        )
    return out


class SafetensorsReader(StorageReader):
    """Reads a safetensors folder for ``treeckpt.dcp.load`` (or torch's ``dcp.load``).

    ``counter`` counts the byte ranges and bytes this reader read (headers included).
    """

    def __init__(self, path: str, thread_count: int = 1) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.thread_count = max(1, int(thread_count))
        self.folder: Folder | None = None
        self.load_id = uuid.uuid4().hex
        self.counter = ReadCounter()
        self._where: dict[tuple[str, tuple[int, ...]], tuple[str, Entry]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.folder = None
        self._where = {}
        self.load_id = uuid.uuid4().hex

    def read_metadata(self) -> Metadata:
        with opened(self.path) as backend:
            folder = read_folder(backend, self.counter)
        self._use(folder)
        return Metadata(
            state_dict_metadata=dict(self._describe(folder)),
            storage_data=folder,
            storage_meta=StorageMeta(checkpoint_id=self.path, load_id=self.load_id),
        )

    def _describe(self, folder: Folder) -> dict[str, TensorStorageMetadata]:
        return folder_metadata(folder)

    def _use(self, folder: Folder) -> None:
        self.folder = folder
        self._where = {(e.name, e.offsets): (f, e) for f, e in folder.pieces()}

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(metadata.storage_data, Folder):
            self._use(metadata.storage_data)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _piece(self, item: ReadItem) -> tuple[str, Entry]:
        if self.folder is None:
            self.read_metadata()
        fqn = item.storage_index.fqn
        offsets = tuple(int(o) for o in (item.storage_index.offset or ())) or (0,) * len(
            item.lengths
        )
        got = self._where.get((fqn, offsets))
        if got is None:
            raise PlanError(f"{fqn!r}: no piece at {list(offsets)} in {self.path}")
        return got

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[tuple[ReadItem, Entry]]] = {}
        for item in plan.items:
            file, entry = self._piece(item)
            per_file.setdefault(file, []).append((item, entry))
        todo: queue.SimpleQueue[tuple[str, list[tuple[ReadItem, Entry]]]] = queue.SimpleQueue()
        for job in per_file.items():
            todo.put(job)
        errors: list[BaseException] = []
        commit_lock = threading.Lock()

        def work() -> None:
            with opened(self.path) as backend:
                while not errors:
                    try:
                        file, items = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        for item, entry in items:
                            src = self._read(backend, file, entry, item)
                            with commit_lock:
                                commit_read(planner, item, src)
                    except BaseException as exc:
                        errors.append(exc)
                        return

        _run_threads(work, min(self.thread_count, len(per_file)))
        if errors:
            raise errors[0]
        return done(None)

    def _read(self, backend: Backend, file: str, entry: Entry, item: ReadItem) -> torch.Tensor:
        """What storage holds for ``item``: the region of its piece, as stored."""
        return read_region(backend, file, entry, stored_box(item), self.counter)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, str | os.PathLike)


def _run_threads(work: Callable[[], None], n: int) -> None:
    threads = [threading.Thread(target=work) for _ in range(max(0, n - 1))]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()

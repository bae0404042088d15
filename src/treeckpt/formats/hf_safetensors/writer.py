"""A DCP ``StorageWriter`` that writes a Hugging Face safetensors folder.

Three layouts, as torch's ``HuggingFaceStorageWriter`` has them:

- ``save_distributed=False``: whole tensors, ``model-0000i-of-0000N.safetensors``
  (file ``i`` from ``fqn_to_index_mapping``, else one file) and
  ``model.safetensors.index.json``. Each file must be written by one rank:
  save a full state dict from one rank (``no_dist=True``) or use the
  distributed layout.
- ``save_distributed=True``: each rank writes its own pieces as
  ``shard-0000r-model-0000i-of-0000N.safetensors`` (rank ``r - 1``), the
  piece's place in the whole tensor in ``DCP_SHARDING_INFO``; no index.
- ``save_distributed=True, enable_consolidation=True``: the pieces go to
  ``<path>/sharded``, and after the save every rank assembles a disjoint
  share of the output files in ``<path>``
  (:func:`~treeckpt.formats.hf_safetensors.consolidate.consolidate_on_every_rank`),
  in bounded memory.

Only tensors are stored (a non-tensor value is an error naming it). Files of
this layout already in the folder are replaced; the index is removed first
and written last, so a reader never follows an index into half-written files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from treeckpt.errors import PlanError, UnsupportedLeafError
from treeckpt.formats.hf_safetensors.consolidate import consolidate_on_every_rank
from treeckpt.formats.hf_safetensors.files import is_model_file, opened, write_file
from treeckpt.formats.hf_safetensors.layout import (
    DCP_VERSION,
    FORMAT_KEY,
    INDEX_NAME,
    SHARDED_DIR,
    SHARDING_INFO_KEY,
    VERSION_KEY,
    encode_index,
    file_name,
)
from treeckpt.shell.coord import Coordinator

__all__ = ["SafetensorsPiece", "SafetensorsWriter"]


@dataclass(frozen=True, slots=True)
class SafetensorsPiece:
    """Where one written item lies: its file (relative to the folder), byte offset and length."""

    relative_path: str
    offset: int
    length: int


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}" if "://" in path else os.path.join(path, name)


class SafetensorsWriter(StorageWriter):
    """Writes the folder; see the module's description for the layouts."""

    def __init__(
        self,
        path: str,
        fqn_to_index_mapping: dict[str, int] | None = None,
        thread_count: int = 1,
        save_distributed: bool = False,
        enable_consolidation: bool = False,
        thread_count_consolidation: int = 1,
    ) -> None:
        super().__init__()
        if fqn_to_index_mapping is not None and (
            not fqn_to_index_mapping
            or any(type(i) is not int or i < 1 for i in fqn_to_index_mapping.values())
        ):
            raise PlanError("fqn_to_index_mapping: file indices are integers from 1")
        self.fqn_to_index_mapping = fqn_to_index_mapping
        self.thread_count = max(1, int(thread_count))
        self.save_distributed = save_distributed
        self.enable_consolidation = enable_consolidation
        self.thread_count_consolidation = max(1, int(thread_count_consolidation))
        self.sync_files = True
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self.consolidated_output_path: str | None = None
        self.path = ""
        self._set_path(os.fspath(path))

    def _set_path(self, path: str) -> None:
        if self.enable_consolidation:
            self.consolidated_output_path = path
            self.path = _join(path, SHARDED_DIR)
        else:
            self.path = path

    # -- DCP's StorageWriter protocol

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self._set_path(os.fspath(checkpoint_id))
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(
            checkpoint_id=self.consolidated_output_path or self.path, save_id=self.save_id
        )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                raise UnsupportedLeafError(
                    f"{fqn!r}: a safetensors folder holds tensors only (this value is not one)"
                )
            if self.fqn_to_index_mapping is not None and fqn not in self.fqn_to_index_mapping:
                raise PlanError(f"{fqn!r}: not in fqn_to_index_mapping (which file holds it?)")
            chunk = item.tensor_data.chunk
            whole = tuple(chunk.sizes) == tuple(item.tensor_data.size) and not any(chunk.offsets)
            if not self.save_distributed and not whole:
                raise PlanError(
                    f"{fqn!r}: this rank holds a piece {list(chunk.sizes)} at "
                    f"{list(chunk.offsets)} of a tensor {list(item.tensor_data.size)}; "
                    "save_distributed=False writes whole tensors (pass save_distributed=True, "
                    "with enable_consolidation=True for whole-tensor files)"
                )
        return plan

    def _file_index(self, fqn: str) -> int:
        return 1 if self.fqn_to_index_mapping is None else self.fqn_to_index_mapping[fqn]

    def _file_count(self) -> int:
        return 1 if self.fqn_to_index_mapping is None else max(self.fqn_to_index_mapping.values())

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if not self.save_distributed:
            writers: dict[int, list[int]] = {}
            for rank, plan in enumerate(plans):
                for i in sorted({self._file_index(it.index.fqn) for it in plan.items}):
                    writers.setdefault(i, []).append(rank)
            shared = {i: r for i, r in writers.items() if len(r) > 1}
            if shared:
                i, ranks = min(shared.items())
                raise PlanError(
                    f"{file_name(i, self._file_count())} would be written by ranks "
                    f"{', '.join(map(str, ranks))}: with save_distributed=False save the full "
                    "state dict from one rank (no_dist=True), or pass save_distributed=True"
                )
        self._clear_folder()
        return [
            dataclasses.replace(
                plan,
                storage_data={"shard_index": rank + 1} if self.save_distributed else {},
            )
            for rank, plan in enumerate(plans)
        ]

    def _clear_folder(self) -> None:
        """The index and the model files of an earlier save go before anything is written."""
        folders = [self.path] + (
            [self.consolidated_output_path] if self.consolidated_output_path else []
        )
        for folder in folders:
            with opened(folder) as backend:
                backend.makedirs("")
                backend.remove(INDEX_NAME)
                for name in backend.listdir():
                    if is_model_file(name):
                        backend.remove(name)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        shard = (
            plan.storage_data.get("shard_index") if isinstance(plan.storage_data, dict) else None
        )
        count = self._file_count()
        files: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            files.setdefault(file_name(self._file_index(item.index.fqn), count, shard), []).append(
                item
            )
        todo: queue.SimpleQueue[tuple[str, list[WriteItem]]] = queue.SimpleQueue()
        for entry in files.items():
            todo.put(entry)
        results: list[WriteResult] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work() -> None:
            with opened(self.path) as backend:
                while not errors:
                    try:
                        name, items = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        got = self._write_file(backend, name, items, planner)
                    except BaseException as exc:
                        with lock:
                            errors.append(exc)
                        return
                    with lock:
                        results.extend(got)

        threads = [
            threading.Thread(target=work) for _ in range(min(self.thread_count, len(files)) - 1)
        ]
        for t in threads:
            t.start()
        work()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(
        self, backend: Any, name: str, items: list[WriteItem], planner: SavePlanner
    ) -> list[WriteResult]:
        info = {it.index.fqn: {"saved_offsets": list(it.tensor_data.chunk.offsets)} for it in items}  # type: ignore[union-attr]
        metadata = {
            SHARDING_INFO_KEY: json.dumps(info),
            VERSION_KEY: DCP_VERSION,
            FORMAT_KEY: "pt",
        }

        def fetch(item: WriteItem) -> Any:
            return lambda: _as_tensor(planner.resolve_data(item), item.index.fqn)

        tensors = [
            (
                it.index.fqn,
                it.tensor_data.properties.dtype,  # type: ignore[union-attr]
                tuple(it.tensor_data.chunk.sizes),  # type: ignore[union-attr]
                fetch(it),
            )
            for it in items
        ]
        entries = write_file(backend, name, tensors, metadata, sync=self.sync_files)
        return [
            WriteResult(
                index=it.index,
                size_in_bytes=entries[it.index.fqn].stop - entries[it.index.fqn].start,
                storage_data=SafetensorsPiece(
                    name,
                    entries[it.index.fqn].start,
                    entries[it.index.fqn].stop - entries[it.index.fqn].start,
                ),
            )
            for it in items
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self.save_distributed:
            return  # the pieces need no index; consolidation runs on every rank afterwards
        weight_map: dict[str, str] = {}
        total = 0
        for rank_results in results:
            for r in rank_results:
                weight_map[r.index.fqn] = r.storage_data.relative_path
                total += r.storage_data.length
        with opened(self.path) as backend:
            backend.commit_file(INDEX_NAME, encode_index(weight_map, total), sync=self.sync_files)

    def finish_on_every_rank(self, coord: Coordinator) -> None:
        """After ``finish``, on every rank: consolidate the pieces (``enable_consolidation``)."""
        if not (self.save_distributed and self.enable_consolidation):
            return
        assert self.consolidated_output_path is not None
        consolidate_on_every_rank(
            self.path,
            self.consolidated_output_path,
            self.fqn_to_index_mapping,
            coord,
            num_threads=self.thread_count_consolidation,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, str | os.PathLike)

    @property
    def metadata_path(self) -> str:
        return INDEX_NAME


def _as_tensor(data: Any, fqn: str) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsupportedLeafError(f"{fqn!r}: a safetensors folder holds tensors only")
    return data.detach()

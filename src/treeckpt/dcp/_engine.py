"""One DCP save or load: DCP's documented call sequence over treeckpt's coordinator.

With treeckpt's own planner and file-system storage, a save or load is one
call of treeckpt's save or load on the state dict (the fast path). With a
user's planner or storage plugin, the planner protocol runs as DCP documents
it (set_up_planner, create_local_plan, create_global_plan, finish_plan,
resolve_data / set_up_storage_writer, prepare_local_plan,
prepare_global_plan, write_data, finish; and the reader side), with every
phase ending in an agreement: if any rank fails, every rank raises.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from treeckpt.core.manifest import Manifest
from treeckpt.core.plan import StoredTensor
from treeckpt.core.tree import flatten_tree
from treeckpt.dcp._view import (
    RAW_BYTES_KEY,
    TreeckptStorage,
    is_torch_format,
    metadata_from_plan,
    metadata_of,
)
from treeckpt.dcp.api import CheckpointException, wrap_failure
from treeckpt.dcp.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from treeckpt.dcp.filesystem import FileSystemReader, FileSystemWriter
from treeckpt.errors import CheckpointError, LoadMismatchError
from treeckpt.formats.hf_safetensors import SafetensorsWriter
from treeckpt.shell import ranks
from treeckpt.shell.committed import load_committed
from treeckpt.shell.coord import Coordinator, LocalCoordinator, agreed
from treeckpt.shell.load import load_tree, read_stored
from treeckpt.shell.optim import safe_torch_state_init
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.reader import read_manifest

__all__ = ["coordinator", "run_load", "run_save", "storage_reader_for", "storage_writer_for"]

T = TypeVar("T")

log = logging.getLogger("treeckpt.dcp")


def coordinator(
    process_group: Any, no_dist: bool, timeout_s: float | None = None, *, private: bool = False
) -> Coordinator:
    """The ranks taking part: none with ``no_dist``, else the process group when initialised.

    Over a process group, saves still running in the background finish first
    (their collectives must not interleave with this call's). Collectives
    wait for the others as long as the process group's timeout; ``private``
    gives a group of treeckpt's own, for collectives run from a background
    thread while training uses the caller's group.
    """
    if no_dist:
        return LocalCoordinator()
    try:
        return ranks.coordinator(process_group, timeout_s, private=private)
    except CheckpointError as exc:  # a peer never arrived: DCP's error type, as any failure
        raise wrap_failure(exc, torch.distributed.get_rank()) from exc


def _guarded(coord: Coordinator, fn: Callable[[], T]) -> T:
    """Every error leaves as a ``CheckpointException`` (DCP's contract), cause attached."""
    try:
        return fn()
    except CheckpointException:
        raise
    except Exception as exc:
        raise wrap_failure(exc, coord.rank) from exc


#: What DCP's ``save`` and ``load`` take as ``checkpoint_id``.
CheckpointId = str | os.PathLike[str]


def storage_writer_for(
    storage_writer: StorageWriter | None, checkpoint_id: CheckpointId | None
) -> StorageWriter:
    """DCP's rule: the given writer (reset to ``checkpoint_id``), else a FileSystemWriter."""
    return _storage_for(storage_writer, checkpoint_id, FileSystemWriter, "save", "storage_writer")


def storage_reader_for(
    storage_reader: StorageReader | None, checkpoint_id: CheckpointId | None
) -> StorageReader:
    """DCP's rule: the given reader (reset to ``checkpoint_id``), else a FileSystemReader."""
    return _storage_for(storage_reader, checkpoint_id, FileSystemReader, "load", "storage_reader")


_Storage = TypeVar("_Storage", StorageWriter, StorageReader)


def _storage_for(
    given: _Storage | None,
    checkpoint_id: CheckpointId | None,
    on_file_system: Callable[[CheckpointId], _Storage],
    phase: str,
    argument: str,
) -> _Storage:
    if given is None:
        if checkpoint_id is None:
            raise CheckpointError(f"{phase} needs a checkpoint_id or a {argument}")
        return on_file_system(checkpoint_id)
    if checkpoint_id is not None:
        given.reset(checkpoint_id)
    return given


def fast_save(planner: SavePlanner, writer: StorageWriter) -> bool:
    """treeckpt's own save decides everything: no planner option asks otherwise.

    ``dedup_save_to_lowest_rank`` and ``enable_plan_caching`` are planner
    decisions, so they take the planner path (treeckpt then writes what each
    rank was assigned).
    """
    return (
        type(planner) is DefaultSavePlanner
        and planner.flatten_state_dict
        and not planner.dedup_save_to_lowest_rank
        and not planner.enable_plan_caching
        and type(writer) is FileSystemWriter
    )


def _saved_metadata(writer: FileSystemWriter, coord: Coordinator) -> Metadata:
    """The committed save's Metadata on every rank, from rank 0's plan and manifest."""

    def build() -> Metadata:
        assert writer.result is not None and writer.result.plan is not None
        backend = open_backend(writer.path)
        try:
            return metadata_from_plan(read_manifest(backend), writer.result.plan)
        finally:
            backend.close()

    md: Metadata = ranks.on_coordinator(coord, "metadata", build)
    return md


def run_save(
    state_dict: dict[str, Any],
    writer: StorageWriter,
    planner: SavePlanner | None,
    coord: Coordinator,
    use_collectives: bool = True,
) -> Metadata:
    planner = DefaultSavePlanner() if planner is None else planner
    return _guarded(coord, lambda: _save(state_dict, writer, planner, coord, use_collectives))


def _save(
    state_dict: dict[str, Any],
    writer: StorageWriter,
    planner: SavePlanner,
    coord: Coordinator,
    use_collectives: bool,
) -> Metadata:
    if fast_save(planner, writer):
        assert isinstance(writer, FileSystemWriter)
        writer.set_up_storage_writer(coord.is_coordinator)
        writer.save_tree(state_dict, coord, {})
        return _saved_metadata(writer, coord)
    state_dict = {
        k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()
    }

    def local() -> Any:  # DCP's order: storage_meta, set_up_planner, set_up_storage_writer
        storage_meta = writer.storage_meta()
        if "storage_meta" not in inspect.signature(planner.set_up_planner).parameters:
            warnings.warn(  # as DCP does for planners written before storage_meta existed
                "The function definition for SavePlanner.set_up_planner has been updated"
                " to include the storage_meta argument. Please update your implementation"
                " to include this parameter.",
                stacklevel=2,
            )
            planner.set_up_planner(state_dict, coord.is_coordinator)  # type: ignore[arg-type]
        else:
            planner.set_up_planner(
                state_dict=state_dict,
                storage_meta=storage_meta,
                is_coordinator=coord.is_coordinator,
            )
        if "kwargs" in inspect.signature(writer.set_up_storage_writer).parameters:
            writer.set_up_storage_writer(
                coord.is_coordinator, rank=coord.rank, use_collectives=use_collectives
            )
        else:
            writer.set_up_storage_writer(coord.is_coordinator)
        return writer.prepare_local_plan(planner.create_local_plan())

    def global_plan(plans: list[Any]) -> list[Any]:
        global_plans, metadata = planner.create_global_plan(plans)
        return [(p, metadata) for p in writer.prepare_global_plan(global_plans)]

    central, metadata = _plan_round(coord, local, global_plan)
    final = agreed(coord, "plan:finish", lambda: planner.finish_plan(central))
    if isinstance(writer, FileSystemWriter):
        writer.save_items(final, planner, metadata, coord)
        return metadata
    results = agreed(coord, "write", lambda: writer.write_data(final, planner).wait())
    all_results = coord.gather(results, "write:gather")
    agreed(
        coord,
        "finish",
        lambda: writer.finish(metadata, all_results or []) if coord.is_coordinator else None,
    )
    if isinstance(writer, SafetensorsWriter):  # consolidation, spread over every rank
        agreed(coord, "finish:ranks", lambda: writer.finish_on_every_rank(coord))
    return metadata


def _plan_round(
    coord: Coordinator, local: Callable[[], Any], global_plan: Callable[[list[Any]], list[Any]]
) -> Any:
    """DCP's planning round, save and load alike, every step agreed by all ranks.

    Each rank's ``local()`` plan is gathered; on the coordinator,
    ``global_plan(plans)`` gives one entry per rank, scattered. A failure on
    any rank, in either step, raises on every rank. Returns this rank's entry.
    """
    local_plan = agreed(coord, "plan:local", local)
    plans = coord.gather(local_plan, "plan:gather")
    proposals: list[Any] | None = None
    if coord.is_coordinator:
        try:
            assert plans is not None
            proposals = global_plan(plans)
        except Exception as exc:
            proposals = [exc] * coord.world_size
    mine = coord.scatter(proposals, "plan:scatter")
    coord.agree("plan:global", mine if isinstance(mine, Exception) else None)
    return mine


def _fast_load(planner: LoadPlanner, reader: StorageReader) -> bool:
    return (
        type(planner) is DefaultLoadPlanner
        and planner.flatten_state_dict
        and type(reader) is FileSystemReader
    )


def run_load(
    state_dict: dict[str, Any],
    reader: StorageReader,
    planner: LoadPlanner | None,
    coord: Coordinator,
) -> None:
    planner = DefaultLoadPlanner() if planner is None else planner
    _guarded(coord, lambda: _load(state_dict, reader, planner, coord))


def _load(
    state_dict: dict[str, Any], reader: StorageReader, planner: LoadPlanner, coord: Coordinator
) -> None:
    metadata: Metadata | None = None
    if isinstance(reader, FileSystemReader):
        path = reader.path

        def read() -> Metadata | None:
            backend = open_backend(path)
            try:
                if is_torch_format(backend):
                    return None
                manifest = read_manifest(backend)
                return metadata_of(manifest, read_stored(backend, manifest))
            finally:
                backend.close()

        metadata = ranks.on_coordinator(coord, "metadata", read)
        if metadata is not None and _fast_load(planner, reader):
            storage = metadata.storage_data
            assert isinstance(storage, TreeckptStorage)
            if RAW_BYTES_KEY not in storage.manifest.user_metadata:
                assert isinstance(planner, DefaultLoadPlanner)
                partial = planner.allow_partial_load
                backend = open_backend(path)
                try:
                    # A save replacing the checkpoint meanwhile: the new one, wholly, or
                    # CheckpointReplacedError (shell/committed.py).
                    load_committed(
                        backend,
                        coord,
                        "load",
                        lambda manifest, stored: _load_tree(
                            state_dict, reader, backend, manifest, stored, partial
                        ),
                        fills_in_place=True,
                        first=(storage.manifest, dict(storage.stored)),
                    )
                finally:
                    backend.close()
                return
    if metadata is None:
        metadata = ranks.on_coordinator(coord, "metadata", reader.read_metadata)
    _load_protocol(state_dict, reader, planner, coord, metadata)


def _load_tree(
    state_dict: dict[str, Any],
    reader: FileSystemReader,
    backend: Backend,
    manifest: Manifest,
    stored: Mapping[str, StoredTensor],
    allow_partial_load: bool,
) -> None:
    with safe_torch_state_init():  # state_dict() of wrappers around torch's utilities
        template = flatten_tree(state_dict, allow_pickle=True)
    missing = [f for f in template.records if f not in manifest.records]
    if missing and not allow_partial_load:
        raise LoadMismatchError(missing=missing)
    # Inside a Stateful other than a module (an optimizer), the checkpoint's
    # entries are loaded even where the template has none yet (fresh state).
    open_prefixes = [s.fqn for s in template.statefuls if not isinstance(s.obj, torch.nn.Module)]
    unexpected = [
        f
        for f in manifest.records
        if f not in template.records
        and not any(p == "" or f == p or f.startswith(p + ".") for p in open_prefixes)
    ]
    if unexpected:
        log.info(
            "%s: %d key(s) of the checkpoint not loaded (not in the state dict): %s",
            reader.path,
            len(unexpected),
            unexpected[:20],
        )
    load_tree(  # in place: tensors, values and Statefuls of ``state_dict``
        state_dict,
        backend,
        manifest,
        stored,
        strict=False,
        allow_pickle=False,
        options=reader.options,
    )


def _load_protocol(
    state_dict: dict[str, Any],
    reader: StorageReader,
    planner: LoadPlanner,
    coord: Coordinator,
    metadata: Metadata,
) -> None:
    statefuls = {k: v for k, v in state_dict.items() if isinstance(v, Stateful)}
    sd = dict(state_dict)
    for k, v in statefuls.items():
        sd[k] = v.state_dict()

    def local() -> Any:
        planner.set_up_planner(sd, metadata, coord.is_coordinator)
        if "kwargs" in inspect.signature(reader.set_up_storage_reader).parameters:
            reader.set_up_storage_reader(
                metadata, coord.is_coordinator, rank=coord.rank, use_collectives=True
            )
        else:
            reader.set_up_storage_reader(metadata, coord.is_coordinator)
        return reader.prepare_local_plan(planner.create_local_plan())

    mine = _plan_round(
        coord,
        local,
        lambda plans: list(reader.prepare_global_plan(planner.create_global_plan(plans))),
    )

    def read() -> None:
        final = planner.finish_plan(mine)
        reader.read_data(final, planner).wait()

    agreed(coord, "read", read)
    for k, v in statefuls.items():
        v.load_state_dict(sd[k])
    for k, v in sd.items():
        if k not in statefuls:
            state_dict[k] = v

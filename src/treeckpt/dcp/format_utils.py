"""``treeckpt.dcp.format_utils``: convert between checkpoints and ``torch.save`` files.

Same names and signatures as ``torch.distributed.checkpoint.format_utils``,
with three changes a user notices only in the memory graph and in safety:

- :func:`dcp_to_torch_save` streams: the ``torch.save`` file is written a
  tensor at a time (the peak holds the largest tensor, not the state), and the
  input may be a treeckpt checkpoint or one torch's DCP wrote (read without
  running its pickles);
- :func:`torch_save_to_dcp` maps the ``torch.save`` file
  (``torch.load(mmap=True, weights_only=True)``) and writes treeckpt's format;
- ``_EmptyStateDictLoadPlanner`` (private in torch, imported by Lightning to
  load a whole checkpoint into an empty dict) is torch's planner: it builds
  the state dict from the reader's ``Metadata``, which treeckpt's reader fills
  in (``planner_data`` included), and the reads run through treeckpt;
- :class:`BroadcastingTorchSaveReader` reads the file with ``weights_only=True``
  and memory-mapped on the coordinator, and broadcasts one tensor at a time.

Beyond torch: :func:`dcp_to_treeckpt` and :func:`treeckpt_to_dcp` convert a
checkpoint torch's DCP wrote to treeckpt's format and back. Command line::

    python -m treeckpt.dcp.format_utils {torch_to_dcp,dcp_to_torch,dcp_to_treeckpt,treeckpt_to_dcp} src dst
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import format_utils as _tfu
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.default_planner import (
    _EmptyStateDictLoadPlanner as _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.format_utils import DynamicMetaLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from treeckpt.core.options import SaveOptions
from treeckpt.errors import CheckpointError, CheckpointNotFoundError
from treeckpt.formats.torch_dcp import open_lazy, restore_dcp, write_dcp, write_torch_save
from treeckpt.formats.torch_dcp import unpickling_reason as _reason
from treeckpt.formats.torch_dcp.protocol import commit_read, done
from treeckpt.shell.coord import LocalCoordinator
from treeckpt.shell.save import save_tree
from treeckpt.store.backends import open_backend

__all__ = [
    "BroadcastingTorchSaveReader",
    "DynamicMetaLoadPlanner",
    "dcp_to_torch_save",
    "torch_save_to_dcp",
]


def dcp_to_torch_save(
    dcp_checkpoint_dir: str | os.PathLike[str],
    torch_save_path: str | os.PathLike[str],
) -> None:
    """Convert a checkpoint directory into one ``torch.save`` file, a tensor at a time.

    ``dcp_checkpoint_dir`` may hold a treeckpt checkpoint or one torch's DCP
    wrote. The file gets the nested state dict (what ``torch.load`` of
    torch's own conversion gives), is readable with ``weights_only=True``,
    and appears at ``torch_save_path`` only once complete (atomic rename).
    Runs in this process only; call it on one rank.
    """
    with open_lazy(dcp_checkpoint_dir) as (tree, fetch):
        write_torch_save(tree, fetch, torch_save_path)


def _load_torch_save(path: str | os.PathLike[str]) -> Any:
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such torch.save file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files from torch < 1.6 (not zip) cannot be mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: holds objects that need pickle to load; refused (only tensors and plain "
            f"values are read): {_reason(exc)}"
        ) from None


def _save_here(tree: Any, path: str | os.PathLike[str]) -> None:
    """treeckpt.save in this process only, whatever process group is initialised.

    Same steps as :func:`treeckpt.save` with a one-process coordinator
    (torch's conversions pass ``no_dist=True`` for the same reason).
    """
    options = SaveOptions()
    backend = open_backend(str(path))
    try:
        new_dir = backend.size("") is None and not backend.listdir()
        backend.makedirs("")
        if new_dir and options.sync and backend.supports_fsync:
            backend.sync_dir("..")  # the new directory's own entry
        save_tree(
            tree,
            backend,
            options=options,
            coord=LocalCoordinator(),
            allow_pickle=False,
            user_metadata=None,
        )
    finally:
        backend.close()


def torch_save_to_dcp(
    torch_save_path: str | os.PathLike[str],
    dcp_checkpoint_dir: str | os.PathLike[str],
) -> None:
    """Convert a ``torch.save`` file into a treeckpt checkpoint.

    The file is memory-mapped and read with ``weights_only=True`` (a file
    that needs pickle is refused with a :class:`~treeckpt.CheckpointError`);
    tensors are paged in as they are written, not loaded first. Runs in this
    process only; call it on one rank.
    """
    _save_here(_load_torch_save(torch_save_path), dcp_checkpoint_dir)


def dcp_to_treeckpt(dcp_checkpoint_dir: Any, treeckpt_dir: Any) -> None:
    """Convert a checkpoint torch's DCP wrote into treeckpt's format (this process only)."""
    _save_here(restore_dcp(dcp_checkpoint_dir), treeckpt_dir)


def treeckpt_to_dcp(treeckpt_dir: Any, dcp_checkpoint_dir: Any) -> None:
    """Convert a treeckpt checkpoint into torch DCP's own format, a tensor at a time.

    ``torch.distributed.checkpoint.load`` reads the result: the way back for
    a user returning to DCP. Local directories only.
    """
    with open_lazy(treeckpt_dir) as (tree, fetch):
        write_dcp(tree, fetch, dcp_checkpoint_dir)


class BroadcastingTorchSaveReader(_tfu.BroadcastingTorchSaveReader):
    """StorageReader for a ``torch.save`` file: the coordinator reads, every rank receives.

    Use with :class:`DynamicMetaLoadPlanner` to load a ``torch.save`` file
    into a sharded model::

        dcp.load({"model": model_sd}, storage_reader=BroadcastingTorchSaveReader(),
                 planner=DynamicMetaLoadPlanner(), checkpoint_id="model.pt")

    Unlike torch's, the file is read with ``weights_only=True`` and
    memory-mapped, each tensor is broadcast once (the ranks then cut their own
    shards from it), and a tensor missing from the file or with another shape
    or dtype fails on every rank with an error naming it, before any copy.
    Tensors only, as in torch.
    """

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        coordinator_rank: int = 0,
    ) -> None:
        super().__init__(checkpoint_id=checkpoint_id, coordinator_rank=coordinator_rank)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Broadcast each requested tensor from the coordinator; copy each rank's shards."""
        dplanner = cast(DefaultLoadPlanner, planner)
        metadata = dplanner.metadata
        assert metadata is not None
        wanted = sorted(
            fqn
            for fqn, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        )
        by_fqn: dict[str, list[Any]] = {}
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                raise CheckpointError(
                    f"{req.storage_index.fqn!r} is not a tensor; {type(self).__name__} loads tensors only"
                )
            by_fqn.setdefault(req.storage_index.fqn, []).append(req)
        source: Any = None
        verdict: list[Any] = [None]
        if self.is_coordinator:
            try:
                source = _load_torch_save(cast(str, self.checkpoint_id))
                if dplanner.flatten_state_dict:
                    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

                    source, _ = flatten_state_dict(source)
                verdict[0] = _check_source(
                    source, metadata.state_dict_metadata, wanted, self.checkpoint_id
                )
            except Exception as exc:
                verdict[0] = f"{type(exc).__name__}: {exc}"
        dist.broadcast_object_list(verdict, src=self.coordinator_rank)
        if verdict[0] is not None:
            raise CheckpointError(f"{self.checkpoint_id}: {verdict[0]}")
        device = torch.device(dist.distributed_c10d._get_object_coll_device())
        for fqn in wanted:
            md = cast(TensorStorageMetadata, metadata.state_dict_metadata[fqn])
            if self.is_coordinator:
                tensor = source[fqn].detach().to(device).contiguous()
            else:
                tensor = torch.empty(md.size, dtype=md.properties.dtype, device=device)
            dist.broadcast(tensor, src=self.coordinator_rank)
            for req in by_fqn.get(fqn, []):
                # storage_offsets are relative to the stored chunk, which starts at
                # storage_index.offset of the full tensor broadcast here.
                base = req.storage_index.offset or [0] * len(req.storage_offsets)
                starts = [a + b for a, b in zip(base, req.storage_offsets, strict=True)]
                commit_read(planner, req, narrow_tensor_by_index(tensor, starts, req.lengths))
            del tensor
        return done(None)


def _check_source(
    source: Any, sd_md: dict[str, Any], wanted: Sequence[str], path: Any
) -> str | None:
    problems = []
    for fqn in wanted:
        got = source.get(fqn) if isinstance(source, dict) else None
        want = sd_md[fqn]
        if not isinstance(got, torch.Tensor):
            problems.append(f"{fqn} (missing from the file)")
        elif got.dtype != want.properties.dtype or got.shape != want.size:
            problems.append(
                f"{fqn} (file {got.dtype}{list(got.shape)}, model {want.properties.dtype}{list(want.size)})"
            )
    return (
        f"cannot load {len(problems)} tensor(s): " + "; ".join(problems[:8]) if problems else None
    )


_MODES = {
    "torch_to_dcp": torch_save_to_dcp,
    "dcp_to_torch": dcp_to_torch_save,
    "dcp_to_treeckpt": dcp_to_treeckpt,
    "treeckpt_to_dcp": treeckpt_to_dcp,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m treeckpt.dcp.format_utils MODE src dst``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m treeckpt.dcp.format_utils",
        description="Convert between torch.save files, treeckpt checkpoints and torch DCP checkpoints.",
    )
    parser.add_argument("mode", choices=list(_MODES), help="conversion mode")
    parser.add_argument("src", help="source: a torch.save file or a checkpoint directory")
    parser.add_argument("dst", help="destination")
    args = parser.parse_args(argv)
    print(f"Converting checkpoint from {args.src} to {args.dst} using method: '{args.mode}'")
    try:
        _MODES[args.mode](args.src, args.dst)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

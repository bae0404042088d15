"""Consolidate a sharded checkpoint into one ``torch.load``-able file, streaming.

The output is written in torch's own zip format in two passes: first
``torch.save`` of the whole tree with every tensor a ``FakeTensor`` of the
right shape and dtype under ``torch.serialization.skip_data`` (the pickle,
the zip headers and a hole for each tensor's bytes; no tensor memory), then
each hole is filled with ``pwrite`` from slabs read from the checkpoint. A
slab is a run of whole leading-dimension rows of one tensor (contiguous in the
output) of at most ``max_memory`` bytes, so the memory held is the budget
(plus one stored chunk being decoded), not the checkpoint size.

Sources: treeckpt checkpoints (any writer count) and checkpoints in torch's
DCP format (what plain Lightning writes with ``ModelParallelStrategy`` or
``FSDPStrategy(state_dict_type="sharded")``). A Lightning checkpoint comes
out in Lightning's layout: ``state_dict`` with the module's FQNs,
``optimizer_states`` (a list) and the other keys of the checkpoint.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from treeckpt.errors import OptionsError
from treeckpt.tools.consolidate.sources import lightning_layout, open_source, read_lightning_meta
from treeckpt.tools.consolidate.writer import Progress, plain, sync_dir, write

__all__ = ["DEFAULT_MAX_MEMORY", "ConsolidateReport", "Progress", "consolidate"]

DEFAULT_MAX_MEMORY = 1 << 30
"""Default budget for tensor data held at once: 1 GiB."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsolidateReport:
    """What one consolidation did."""

    src: str
    dst: str
    source_format: str  # "treeckpt" or "dcp"
    tensors: int
    tensor_bytes: int  # bytes of tensor data written
    bytes_written: int  # size of the output file
    max_memory: int
    largest_read: int  # largest slab (or, for DCP, batch of tensors) held at once
    seconds: float


def consolidate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    max_memory: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConsolidateReport:
    """Write the checkpoint at ``src`` as one file that ``torch.load`` reads, on CPU.

    Args:
        src: a treeckpt checkpoint (path or fsspec URL), or a local folder in
            torch's DCP format (as plain Lightning writes it).
        dst: the output file; default ``src`` with ``.consolidated`` appended
            (Lightning's name). Written to a temporary name beside it, fsynced,
            then moved into place: a failed run leaves no partial output.
        max_memory: bytes of tensor data held at once (default 1 GiB). Tensors
            larger than this are copied in slabs of whole rows; DCP-format
            sources are read a whole tensor at a time.
        overwrite: replace an existing ``dst`` (refused by default).
        progress: called with ``(done_bytes, total_bytes)`` as data is written.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
        CheckpointError: ``src`` is not a readable checkpoint, or holds a pickled leaf.
    """
    t0 = time.perf_counter()
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if type(budget) is not int or budget < 1:
        raise OptionsError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    src_s = os.fspath(src)
    if dst is None:
        if "://" in src_s and not src_s.startswith("file://"):
            raise OptionsError(f"{src_s}: give the output file for a remote checkpoint")
        dst_s = src_s.removeprefix("file://").rstrip("/") + ".consolidated"
    else:
        dst_s = os.fspath(dst)
    if os.path.lexists(dst_s) and not overwrite:
        raise FileExistsError(
            f"{dst_s} exists; choose another output file or pass overwrite=True (--overwrite)"
        )
    parent = os.path.dirname(os.path.abspath(dst_s))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{dst_s}: the output's folder {parent} does not exist")
    source = open_source(src_s)
    tmp = str(Path(dst_s).with_name(f".{Path(dst_s).name}.tmp-{uuid.uuid4().hex[:8]}"))
    try:
        skeleton, records = source.skeleton()
        meta = read_lightning_meta(src_s) if source.format == "dcp" else None
        skeleton = plain(lightning_layout(skeleton, meta))
        tensor_bytes, largest = write(source, skeleton, records, tmp, budget, progress)
        if overwrite:
            os.replace(tmp, dst_s)
        else:
            try:
                os.link(tmp, dst_s)  # fails if dst appeared meanwhile: never clobbered
            except FileExistsError:
                raise FileExistsError(
                    f"{dst_s} appeared while consolidating; not replaced"
                ) from None
            os.unlink(tmp)
        sync_dir(dst_s)
    finally:
        source.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ConsolidateReport(
        src=src_s,
        dst=dst_s,
        source_format=source.format,
        tensors=len(records),
        tensor_bytes=tensor_bytes,
        bytes_written=os.path.getsize(dst_s),
        max_memory=budget,
        largest_read=largest,
        seconds=time.perf_counter() - t0,
    )

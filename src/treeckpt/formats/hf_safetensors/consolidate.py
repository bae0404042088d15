"""Consolidate the ranks' safetensors pieces into whole-tensor files, spread over every rank.

The output files are dealt out to the ranks by size (largest first, to the
least loaded rank: :func:`plan_consolidation`, pure), so each rank writes a
disjoint set of files and no rank assembles the whole model. A rank writes
its files one tensor at a time, and each tensor in row-major slabs of at most
``max_buffer_bytes`` (:func:`~treeckpt.core.box.split_box`): for each slab it
reads only the byte ranges of the pieces that meet it. Memory per thread is
bounded by one slab, whatever the model's size.

Rank 0 reads the pieces' headers and writes ``model.safetensors.index.json``
last, after every rank has written its files; a failure on any rank raises
on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from treeckpt.core.box import Box, check_tiling, full_box, split_box
from treeckpt.errors import PlanError
from treeckpt.formats.hf_safetensors.files import (
    Folder,
    ReadCounter,
    opened,
    read_folder,
    read_region,
    tensor_bytes,
)
from treeckpt.formats.hf_safetensors.layout import (
    FORMAT_KEY,
    INDEX_NAME,
    Entry,
    encode_header,
    encode_index,
    file_name,
)
from treeckpt.shell import ranks
from treeckpt.shell.coord import Coordinator, agreed
from treeckpt.store.backends import Backend

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "ConsolidationPlan",
    "OutputFile",
    "OutputTensor",
    "consolidate_on_every_rank",
    "plan_consolidation",
]

log = logging.getLogger("treeckpt.formats.hf_safetensors")

#: The most bytes of one tensor a consolidating thread holds at a time.
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputTensor:
    """A whole tensor to assemble, and the pieces ``(file, entry)`` it is made of."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[tuple[str, Entry], ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFile:
    name: str
    tensors: tuple[OutputTensor, ...]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsolidationPlan:
    files: tuple[OutputFile, ...]
    #: Tensors the mapping names that no piece holds (not written).
    absent: tuple[str, ...]

    def for_rank(self, rank: int) -> tuple[OutputFile, ...]:
        return tuple(f for f in self.files if f.rank == rank)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: f.name for f in self.files for t in f.tensors}

    @property
    def total_size(self) -> int:
        return sum(f.nbytes for f in self.files)


def plan_consolidation(
    folder: Folder, fqn_to_index_mapping: Mapping[str, int] | None, world_size: int
) -> ConsolidationPlan:
    """Which whole tensors go to which output file, and which rank writes each file.

    Pieces of one tensor must agree on its dtype and tile it exactly. Every
    stored tensor needs a file index (all go to file 1 without a mapping).
    Files are dealt largest first to the least loaded rank (lowest rank on a
    tie), so ranks write disjoint sets of files of similar total size.
    """
    by_name: dict[str, list[tuple[str, Entry]]] = {}
    for file, entry in folder.pieces():
        by_name.setdefault(entry.name, []).append((file, entry))
    mapping = (
        dict(fqn_to_index_mapping)
        if fqn_to_index_mapping is not None
        else dict.fromkeys(by_name, 1)
    )
    unmapped = sorted(n for n in by_name if n not in mapping)
    if unmapped:
        raise PlanError(f"{folder.root}: no file index for {', '.join(map(repr, unmapped[:10]))}")
    count = max(mapping.values())
    per_file: dict[int, list[OutputTensor]] = {}
    for name, index in mapping.items():
        pieces = by_name.get(name)
        if pieces is None:
            continue
        dtypes = {e.dtype for _, e in pieces}
        if len(dtypes) != 1:
            raise PlanError(
                f"{name!r}: its pieces have different dtypes {sorted(map(str, dtypes))}"
            )
        ndims = {len(e.shape) for _, e in pieces}
        if len(ndims) != 1:
            raise PlanError(f"{name!r}: its pieces have different numbers of dimensions")
        shape = tuple(max(e.offsets[d] + e.shape[d] for _, e in pieces) for d in range(ndims.pop()))
        check_tiling(shape, [e.box for _, e in pieces], what=f"{name!r} in {folder.root}")
        per_file.setdefault(index, []).append(
            OutputTensor(name=name, dtype=dtypes.pop(), shape=shape, pieces=tuple(pieces))
        )
    load = [0] * world_size
    files: list[OutputFile] = []
    order = sorted(per_file, key=lambda i: (-sum(t.nbytes for t in per_file[i]), i))
    for index in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        f = OutputFile(name=file_name(index, count), tensors=tuple(per_file[index]), rank=rank)
        load[rank] += f.nbytes
        files.append(f)
    files.sort(key=lambda f: f.name)
    absent = tuple(sorted(n for n in mapping if n not in by_name))
    return ConsolidationPlan(files=tuple(files), absent=absent)


def _assemble(
    input_dir: str,
    out: OutputFile,
    output_dir: str,
    max_buffer_bytes: int,
    counter: ReadCounter | None,
) -> None:
    """Write one output file: its header, then each tensor slab by slab."""
    header, _ = encode_header(((t.name, t.dtype, t.shape) for t in out.tensors), {FORMAT_KEY: "pt"})
    with opened(input_dir) as src, opened(output_dir) as dst:
        dst.remove(out.name)
        w = dst.open_writer(out.name)
        try:
            w.write(header)
            for t in out.tensors:
                itemsize = torch.empty((), dtype=t.dtype).element_size()
                for slab in split_box(full_box(t.shape), itemsize, max_buffer_bytes):
                    w.write(tensor_bytes(_slab(src, t, slab, counter)))
            w.close(sync=True)
        except BaseException:
            w.abort()
            raise


def _slab(src: Backend, t: OutputTensor, slab: Box, counter: ReadCounter | None) -> torch.Tensor:
    """The elements of ``slab`` of tensor ``t``, from the byte ranges of the pieces meeting it."""
    buf = torch.empty(slab.sizes, dtype=t.dtype)
    for file, entry in t.pieces:
        part = entry.box.intersect(slab)
        if part is not None:
            buf[part.relative_to(slab).slices()] = read_region(src, file, entry, part, counter)
    return buf


def consolidate_on_every_rank(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: Mapping[str, int] | None,
    coord: Coordinator,
    *,
    num_threads: int = 1,
    max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    counter: ReadCounter | None = None,
) -> ConsolidationPlan:
    """Write the whole-tensor files of the pieces in ``input_dir`` into ``output_dir``.

    Every rank of ``coord`` calls it; each writes the files
    :func:`plan_consolidation` gives it, ``num_threads`` files at a time,
    then rank 0 writes the index. Returns the plan on every rank.
    """

    def read_plan() -> ConsolidationPlan:
        with opened(input_dir) as src:
            folder = read_folder(src)
        with opened(output_dir) as dst:
            dst.makedirs("")
            dst.remove(INDEX_NAME)
        return plan_consolidation(folder, fqn_to_index_mapping, coord.world_size)

    plan = ranks.on_coordinator(coord, "consolidate:plan", read_plan)
    if plan.absent and coord.is_coordinator:
        log.warning(
            "%s: %d tensor(s) of fqn_to_index_mapping are in no piece and not written: %s",
            input_dir,
            len(plan.absent),
            list(plan.absent[:20]),
        )
    mine = plan.for_rank(coord.rank)

    def write_mine() -> None:
        if num_threads <= 1 or len(mine) <= 1:
            for f in mine:
                _assemble(input_dir, f, output_dir, max_buffer_bytes, counter)
            return
        with ThreadPoolExecutor(max_workers=min(num_threads, len(mine))) as pool:
            for fut in [
                pool.submit(_assemble, input_dir, f, output_dir, max_buffer_bytes, counter)
                for f in mine
            ]:
                fut.result()

    agreed(coord, "consolidate:write", write_mine)

    def write_index() -> None:
        if coord.is_coordinator:
            with opened(output_dir) as dst:
                dst.commit_file(
                    INDEX_NAME, encode_index(plan.weight_map, plan.total_size), sync=True
                )

    agreed(coord, "consolidate:index", write_index)
    return plan

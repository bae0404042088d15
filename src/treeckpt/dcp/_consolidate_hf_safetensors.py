"""Consolidation of the ranks' safetensors pieces, as in torch's
``torch.distributed.checkpoint._consolidate_hf_safetensors`` (a private module
torchtitan imports, hence the same path and signatures).

Both functions write whole-tensor ``model-0000i-of-0000N.safetensors`` files
and ``model.safetensors.index.json`` into ``output_dir``. Unlike torch's, the
one on every rank deals the output files to the ranks by size, and each rank
assembles its files in bounded memory, reading only the byte ranges it needs
(:mod:`treeckpt.formats.hf_safetensors.consolidate`).
"""

from __future__ import annotations

from typing import Any

from treeckpt.dcp._engine import coordinator
from treeckpt.formats.hf_safetensors import consolidate_on_every_rank
from treeckpt.shell.coord import LocalCoordinator

__all__ = ["consolidate_safetensors_files", "consolidate_safetensors_files_on_every_rank"]


def consolidate_safetensors_files(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: dict[str, int],
    num_threads: int = 1,
) -> None:
    """Consolidate from this process alone (no collectives)."""
    consolidate_on_every_rank(
        input_dir, output_dir, fqn_to_index_mapping, LocalCoordinator(), num_threads=num_threads
    )


def consolidate_safetensors_files_on_every_rank(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: dict[str, int],
    num_threads: int = 1,
    process_group: Any | None = None,
) -> None:
    """Every rank of ``process_group`` (the default group; this process alone without one)
    calls it and writes its share of the output files; rank 0 writes the index last.
    A failure on any rank raises on every rank."""
    consolidate_on_every_rank(
        input_dir,
        output_dir,
        fqn_to_index_mapping,
        coordinator(process_group, False),
        num_threads=num_threads,
    )

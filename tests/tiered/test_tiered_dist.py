"""Tiered checkpoints on real processes: 4 gloo ranks as 2 nodes, each node its own memory directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.dist_utils import run_ranks
from tests.tiered.common import restore_and_check, run_and_save


def _save4(tmp: Path, steps: int = 4, **kw: Any) -> list[Any]:
    return run_ranks(4, run_and_save, tmp, tmp, 2, steps, kw, timeout=90)


def _data_files(node_dir: Path, step: int, writer: int) -> list[Path]:
    return sorted(node_dir.glob(f"step-{step:010d}/data-*/r{writer}-*.bin"))


def test_node_loss_resumes_from_the_other_nodes_copies(tmp_path: Path) -> None:
    held = _save4(tmp_path)
    assert all(h > 0 for h in held)
    # Node 1 is lost: its processes are gone and its memory with them.
    shutil.rmtree(tmp_path / "mem" / "node1")
    out = run_ranks(4, restore_and_check, tmp_path, tmp_path, 2, {}, timeout=90)
    for rank, (step, report, bad) in enumerate(out):
        assert step == 4
        assert bad == [], f"rank {rank}: {bad}"
        assert report.tier == "memory"
        if rank < 2:  # node 0 held everything itself
            assert set(report.bytes_by_source) == {"local"}
        else:  # node 1 received every byte from node 0
            assert set(report.bytes_by_source) == {"peer"}
            assert all(src in (0, 1) for src in report.writer_sources.values())
    assert out[0][1].bytes_by_source["local"] == out[2][1].bytes_by_source["peer"]
    # The replaced node holds the step again: one more node can be lost.
    assert any((tmp_path / "mem" / "node1").glob("step-0000000004/manifest.json"))


def test_flipped_byte_in_a_memory_copy_is_not_used(tmp_path: Path) -> None:
    _save4(tmp_path)
    node0 = tmp_path / "mem" / "node0"
    files = _data_files(node0, 4, 0)
    assert files
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x10
    files[0].write_bytes(bytes(data))
    out = run_ranks(4, restore_and_check, tmp_path, tmp_path, 2, {}, timeout=90)
    for rank, (step, report, bad) in enumerate(out):
        assert (step, bad) == (4, []), f"rank {rank}: {bad}"
        if rank < 2:
            # Writer 0's copy on node 0 failed its checksum: it came from node 1.
            assert report.writer_sources[0] in (2, 3)
            assert report.bytes_by_source["peer"] > 0
        else:
            assert report.writer_sources[0] is None

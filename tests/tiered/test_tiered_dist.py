"""Tiered checkpoints on real processes: 4 gloo ranks as 2 nodes, each node its own memory directory."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.dist_utils import DEAD, run_ranks
from tests.tiered.common import restore_and_check, run_and_save, save_then_die_in_replication


def _save4(tmp: Path, steps: int = 4, **kw: Any) -> list[Any]:
    return run_ranks(4, run_and_save, tmp, tmp, 2, steps, kw, timeout=90)


def _data_files(node_dir: Path, step: int, writer: int) -> list[Path]:
    return sorted(node_dir.glob(f"step-{step:010d}/data-*/r{writer}-*.bin"))


def test_node_loss_resumes_from_the_other_nodes_copies(tmp_path: Path) -> None:
    held = _save4(tmp_path)
    # Each node keeps only the newest step: its ranks' files and their partners' copies.
    files = []
    for node in ("node0", "node1"):
        assert [p.name for p in (tmp_path / "mem" / node).iterdir()] == ["step-0000000004"]
        files += [f for f in (tmp_path / "mem" / node).glob("step-*/data-*/*") if f.is_file()]
    assert all(h > 0 for h in held)
    assert sum(held) == sum(f.stat().st_size for f in files)
    # Node 1 is lost: its processes are gone and its memory with them.
    shutil.rmtree(tmp_path / "mem" / "node1")
    out = run_ranks(4, restore_and_check, tmp_path, tmp_path, 2, {}, timeout=90)
    for rank, (step, report, bad) in enumerate(out):
        assert step == 4
        assert bad == [], f"rank {rank}: {bad}"
        assert (report.tier, report.skipped) == ("memory", ())
        if rank < 2:  # node 0 held everything itself
            assert set(report.bytes_by_source) == {"local"}
        else:  # node 1 received every byte from node 0
            assert set(report.bytes_by_source) == {"peer"}
            assert all(src in (0, 1) for src in report.writer_sources.values())
    assert out[0][1].bytes_by_source["local"] == out[2][1].bytes_by_source["peer"]
    # The same bytes per FQN, counted from node 0's indexes for both nodes.
    local = {fqn: d["local"] for fqn, d in out[0][1].fqn_sources.items()}
    assert local == {fqn: d["peer"] for fqn, d in out[2][1].fqn_sources.items()}
    assert sum(local.values()) == out[0][1].bytes_by_source["local"]
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
        # Found by the load's checksums; the restore then checked every copy.
        assert len(report.skipped) == 1 and "checksum mismatch" in report.skipped[0]


def test_both_copies_of_a_shard_lost_falls_back_to_durable(tmp_path: Path) -> None:
    import treeckpt
    from treeckpt.manager import CheckpointManager

    durable = tmp_path / "durable"
    kw = {"durable": str(durable), "durable_every": 4}
    run_ranks(4, run_and_save, tmp_path, tmp_path, 2, 6, kw, timeout=90)
    # Memory holds step 6, durable storage step 4 (an ordinary checkpoint).
    info = treeckpt.metadata(durable / "step-0000000004")
    assert info.tensors["table"].shape == (10, 6)
    assert CheckpointManager(str(durable)).all_steps() == [4]
    # Both copies of writer 0's shards of step 6 are lost.
    for node in ("node0", "node1"):
        for f in _data_files(tmp_path / "mem" / node, 6, 0):
            f.unlink()
    out = run_ranks(4, restore_and_check, tmp_path, tmp_path, 2, kw, timeout=90)
    for rank, (step, report, bad) in enumerate(out):
        assert (step, bad) == (4, []), f"rank {rank}: {bad}"
        assert report.tier == "durable"
        assert set(report.bytes_by_source) == {"durable"}


@pytest.mark.slow
def test_restart_on_three_processes_reshards_from_memory(tmp_path: Path) -> None:
    _save4(tmp_path)
    # Three processes: ranks 0 and 1 on node 0, rank 2 on node 1.
    out = run_ranks(3, restore_and_check, tmp_path, tmp_path, 2, {}, timeout=90)
    for rank, (step, report, bad) in enumerate(out):
        assert (step, bad) == (4, []), f"rank {rank}: {bad}"
        assert report.tier == "memory"


@pytest.mark.slow
def test_rank_dying_during_replication_fails_the_save_and_keeps_the_previous_step(
    tmp_path: Path,
) -> None:
    out = run_ranks(
        4, save_then_die_in_replication, tmp_path, tmp_path, 2, timeout=120, allow_dead=True
    )
    assert out[3] is DEAD
    for rank in range(3):
        kind, text, elapsed = out[rank]
        assert kind in ("CollectiveError", "RankFailureError"), (rank, kind, text)
        # The dead rank is named (with any rank that failed on it first).
        assert re.search(r"rank(\(s\))? ([0-9]+, )*3\b", text), (rank, text)
        assert elapsed < 60
    for node in ("node0", "node1"):
        assert (tmp_path / "mem" / node / "step-0000000002" / "manifest.json").exists()
    out2 = run_ranks(4, restore_and_check, tmp_path, tmp_path, 2, {}, timeout=90)
    for rank, (step, _report, bad) in enumerate(out2):
        assert (step, bad) == (2, []), f"rank {rank}: {bad}"


@pytest.mark.slow
def test_a_step_saved_again_over_an_older_runs_copies(tmp_path: Path) -> None:
    # An older run left step 4 (holding the state of step 2) on both nodes.
    _save4(tmp_path, steps=2, memory_every=4, save_as={2: 4})
    _save4(tmp_path, steps=4, memory_every=4)
    out = run_ranks(4, restore_and_check, tmp_path, tmp_path, 2, {}, timeout=90)
    for rank, (step, report, bad) in enumerate(out):
        assert (step, bad, report.skipped) == (4, [], ()), f"rank {rank}"
        assert set(report.writer_sources.values()) == {None}

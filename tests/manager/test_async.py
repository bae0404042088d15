"""CheckpointManager(async_save=True): staged saves, retention after the commit, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import treeckpt
from treeckpt.manager import CheckpointManager

OPTS = treeckpt.SaveOptions(sync=False, chunk_bytes=64 << 10)


def test_async_saves_are_staged_committed_and_retained(tmp_path: Path) -> None:
    frozen = torch.randn(256, 256)
    head = torch.zeros(64)
    with CheckpointManager(tmp_path / "run", max_to_keep=2, async_save=True, options=OPTS) as m:
        for step in range(1, 5):
            head.fill_(float(step))
            assert m.save(step, {"frozen": frozen, "head": head, "step": step})
            head.fill_(-1.0)  # after save returns, changes are not saved
        m.wait_until_finished()
        assert m.all_steps() == [3, 4]
        out = m.restore()
        assert m.restored_step == 4
        assert torch.equal(out["frozen"], frozen) and torch.equal(
            out["head"], torch.full((64,), 4.0)
        )
        # incremental through the asynchronous path: step 4 reused the frozen chunks
        files = [p.name for p in (tmp_path / "run" / "step-0000000004").rglob("*.bin")]
        sizes = sum(p.stat().st_size for p in (tmp_path / "run" / "step-0000000004").rglob("*.bin"))
        assert files and sizes < frozen.numel() * 4 / 4


def test_an_async_failure_is_raised_by_the_next_call_and_leaves_nothing(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path / "run", async_save=True, options=OPTS)
    m.save(1, {"x": torch.ones(3)})
    with pytest.raises(treeckpt.UnsupportedLeafError):
        m.save(2, {"x": torch.ones(3), "bad": object()})
    m.wait_until_finished()
    assert m.all_steps() == [1]
    assert not (tmp_path / "run" / "step-0000000002").exists()
    m.close()


def test_a_failed_background_write_surfaces_at_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from treeckpt import asyncsave
    from treeckpt.store.backends import open_backend
    from treeckpt.testing.faults import FaultyBackend

    def faulty(path: object) -> object:
        b = open_backend(str(path))
        if str(path).endswith("step-0000000002"):
            return FaultyBackend(b, fail_at=0, ops={"open_writer"}, sticky=True)
        return b

    with CheckpointManager(tmp_path / "run", max_to_keep=1, async_save=True, options=OPTS) as m:
        m.save(1, {"x": torch.ones(3)})
        monkeypatch.setattr(asyncsave, "open_backend", faulty)
        assert m.save(2, {"x": torch.full((3,), 2.0)})
        with pytest.raises(treeckpt.CheckpointError, match="injected"):
            m.save(3, {"x": torch.full((3,), 3.0)})
        monkeypatch.undo()
        assert m.all_steps() == [1]  # step 1 kept: nothing newer committed
        assert not (tmp_path / "run" / "step-0000000002").exists()
        m.save(3, {"x": torch.full((3,), 3.0)})
        m.wait_until_finished()
        assert m.all_steps() == [3]

"""The tiered checkpointer in one process (no process group): the tiers, the policy, the errors."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

import treeckpt
from treeckpt.errors import CheckpointNotFoundError, OptionsError
from treeckpt.manager import CheckpointManager
from treeckpt.tiered import TieredCheckpointer, checkpointer

MEMORY_PHASES = (
    "group",
    "inventory",
    "decide",
    "prepare",
    "listing",
    "fetch",
    "agree",
    "load",
    "report",
    "cleanup",
)


def _state(seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "step": seed}


def test_memory_and_durable_tiers_in_one_process(tmp_path: Path) -> None:
    ckpt = TieredCheckpointer(
        tmp_path / "mem", tmp_path / "durable", memory_every=2, durable_every=4, replicas=0
    )
    kinds = []
    for step in range(1, 7):
        fut = ckpt.save(step, _state(step))
        kinds.append(None if fut is None else fut.kind)
        if fut is not None:
            fut.result()
    assert kinds == [None, "memory", None, "durable", None, "memory"]
    # Only the newest memory step is kept; durable storage has step 4, an ordinary checkpoint.
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["step-0000000006"]
    assert ckpt.memory_bytes == sum(
        f.stat().st_size for f in (tmp_path / "mem" / "step-0000000006").glob("data-*/*")
    )
    got = treeckpt.load(_state(0), tmp_path / "durable" / "step-0000000004")
    assert torch.equal(got["w"], _state(4)["w"]) and got["step"] == 4
    assert CheckpointManager(str(tmp_path / "durable")).all_steps() == [4]
    ckpt.close()

    template = _state(0)
    step, report = TieredCheckpointer(tmp_path / "mem", tmp_path / "durable", replicas=0).restore(
        template
    )
    assert step == 6 and report.tier == "memory"
    assert torch.equal(template["w"], _state(6)["w"]) and template["step"] == 6  # type: ignore[arg-type]
    nbytes = (64 * 32 + 32) * 4
    assert report.bytes_by_source == {"local": nbytes}
    assert report.fqn_sources == {"w": {"local": 64 * 32 * 4}, "b": {"local": 32 * 4}}
    assert list(report.phases) == list(MEMORY_PHASES)
    assert all(v >= 0 for v in report.phases.values())
    assert sum(report.phases.values()) <= report.seconds


def test_the_memory_tier_lost_restores_from_durable(tmp_path: Path) -> None:
    ckpt = TieredCheckpointer(tmp_path / "mem", tmp_path / "durable", replicas=0)
    ckpt.save(3, _state(3), durable=True)
    ckpt.save(4, _state(4))
    ckpt.wait()
    for f in (tmp_path / "mem" / "step-0000000004").glob("data-*/*.bin"):
        f.write_bytes(b"")  # truncated: the step is not whole any more
    template = _state(0)
    step, report = ckpt.restore(template)
    assert (step, report.tier) == (3, "durable")
    assert torch.equal(template["w"], _state(3)["w"])  # type: ignore[arg-type]
    assert report.bytes_by_source == {"durable": (64 * 32 + 32) * 4}
    # Both passes over the memory tier found no whole step, then the durable one loaded.
    assert list(report.phases) == [
        "group",
        "inventory",
        "decide",
        "durable-scan",
        "load",
        "report",
        "cleanup",
    ]


def test_nothing_to_restore_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no memory step is held whole"):
        TieredCheckpointer(tmp_path / "mem", replicas=0).restore(_state(0))
    with pytest.raises(OptionsError, match="memory_every must be a positive int, got 0"):
        TieredCheckpointer(tmp_path / "mem", memory_every=0, replicas=0)
    with pytest.raises(OptionsError, match="durable_every needs a durable path or URL"):
        TieredCheckpointer(tmp_path / "mem", durable_every=5, replicas=0)
    with pytest.raises(OptionsError, match="need at least 2 nodes; the job has 1"):
        TieredCheckpointer(tmp_path / "mem")
    with pytest.raises(OptionsError, match="durable=True needs a durable path or URL"):
        TieredCheckpointer(tmp_path / "mem", replicas=0).save(1, _state(1), durable=True)
    with pytest.raises(OptionsError, match="max_to_keep must be a positive int or None, got 0"):
        TieredCheckpointer(tmp_path / "mem", tmp_path / "d", durable_keep=0, replicas=0)


def test_the_cyclic_gc_is_paused_during_a_restore_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = TieredCheckpointer(tmp_path / "mem", replicas=0)
    ckpt.save(1, _state(1))
    ckpt.wait()
    seen: list[bool] = []
    real_load = checkpointer.api.load

    def load(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpointer.api, "load", load)
    assert gc.isenabled()
    assert ckpt.restore(_state(0))[0] == 1
    assert (seen, gc.isenabled()) == ([False], True)
    # resumed after an error too; left off when it was off before
    shutil.rmtree(tmp_path / "mem")
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore(_state(0))
    assert gc.isenabled()
    gc.disable()
    try:
        with checkpointer.paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()

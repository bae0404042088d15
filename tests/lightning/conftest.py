"""A Lightning checkpoint saved by treeckpt on 2 real processes, shared by the tests here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")


@pytest.fixture(scope="session")
def saved_on_2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train 20 steps on 2 processes (ModelParallelStrategy, FSDP2, gloo) and save through
    treeckpt.lightning; the state each rank held at the save, gathered, is in ``end.pt``."""
    from scripts.demo import run_job

    root = tmp_path_factory.mktemp("lightning")
    ckpt = root / "ckpt"
    summary = run_job(2, 20, root / "save", save=str(ckpt))
    return {"ckpt": ckpt, "expected": root / "save" / "end.pt", "summary": summary, "root": root}


def load_pt(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=True)

"""The README's first command runs the demo; it must keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lightning")

from scripts import demo

pytestmark = pytest.mark.distributed


def test_demo_trains_saves_resumes_inspects_and_consolidates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model and optimizer state equal to the saved ones, bit for bit: yes" in out
    assert "resumed at step 20" in out and "trained on to step 25 on 1 process" in out
    assert "equal to the trained ones: yes" in out
    assert "demo finished: all checks passed" in out
    assert (tmp_path / "ckpt.consolidated").exists()

"""The README's first command runs the demo; it must keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

from treeckpt.tools import demo

pytestmark = pytest.mark.distributed


def test_demo_trains_saves_resumes_inspects_and_consolidates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "parameters equal to the saved ones: yes" in out
    assert "equal to the checkpoint: yes" in out
    assert (tmp_path / "ckpt.consolidated.pt").exists()

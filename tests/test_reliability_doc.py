"""``docs/reliability.md`` maps every promise to tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "reliability.md").read_text()


def test_every_promise_has_a_section_with_tests() -> None:
    sections = re.split(r"^## (\d+)\. ", DOC, flags=re.M)[1:]
    numbers = [int(n) for n in sections[0::2]]
    assert numbers == list(range(1, 16))
    for n, body in zip(numbers, sections[1::2], strict=True):
        assert "Tests:" in body and "Status:" in body, f"promise {n}"


def test_every_named_test_exists() -> None:
    named = sorted(set(re.findall(r"`([a-z_/]+\.py)::([A-Za-z_0-9]+)`", DOC)))
    assert len(named) > 100
    missing = []
    for path, name in named:
        source = (ROOT / "tests" / path).read_text()
        if not re.search(rf"^\s*(def|class) {name}\b", source, flags=re.M):
            missing.append(f"{path}::{name}")
    assert missing == []


def test_every_named_module_exists() -> None:
    modules = sorted(set(re.findall(r"`([a-z_/]+\.py)`", DOC)))
    assert modules
    gone = [
        m
        for m in modules
        if not (ROOT / "src" / "treeckpt" / m).exists() and not (ROOT / "tests" / m).exists()
    ]
    assert gone == []

"""Shared test setup: hypothesis profiles, markers that skip themselves, `tmp_ckpt`.

HYPOTHESIS_PROFILE=ci runs five times as many examples per property.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _skip_reason(item: pytest.Item) -> str | None:
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA device"
    if item.get_closest_marker("s3") and not all(
        importlib.util.find_spec(name) for name in ("s3fs", "moto")
    ):
        return "needs the s3 extra: scripts/setup-venv.sh s3"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = _skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def tmp_ckpt(tmp_path: Path) -> Iterator[str]:
    """Path of a checkpoint directory that does not exist yet; saving creates it."""
    yield str(tmp_path / "ckpt")

"""Shared test setup: hypothesis profiles, markers that skip themselves, `tmp_ckpt`.

HYPOTHESIS_PROFILE=ci runs five times as many examples per property.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session", params=[False, True], ids=["raw", "zstd"])
def fsdp_dcp_ckpt(request: Any, tmp_path_factory: Any) -> tuple[str, Any]:
    """``(path, full state)`` of a checkpoint torch's DCP wrote on 2 FSDP2 ranks.

    Shared by the tests of the reader (``tests/formats``) and of the facade
    (``tests/dcp``): one 2-rank save per session and parameter.
    """
    from tests.dist_utils import run_ranks
    from tests.torch_dcp_utils import dcp_save_fsdp

    tmp = tmp_path_factory.mktemp("dcp")
    path = str(tmp / "ckpt")
    full = run_ranks(2, dcp_save_fsdp, tmp, path, request.param)[0]
    return path, full

"""``ThrottledBackend`` holds to the backend contract (a fast link, so no test waits)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from treeckpt.store.backends import Backend, LocalBackend, ThrottledBackend
from treeckpt.testing.backends import BackendTests


class TestThrottledLocalBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        b = ThrottledBackend(LocalBackend(str(tmp_path / "root")), write_bps=1e12)
        yield b
        b.close()

    def test_storage_key_names_the_link(self, tmp_path: Path) -> None:
        inner = LocalBackend(str(tmp_path / "ckpts" / "step-1"))
        key = ThrottledBackend(inner, write_bps=2e8).storage_key()
        assert key == f"throttled(2e+08)/LocalBackend:{tmp_path}/ckpts"
        sibling = LocalBackend(str(tmp_path / "ckpts" / "step-2"))
        assert sibling.storage_key() == inner.storage_key()

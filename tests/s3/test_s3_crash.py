"""Crash points of a save on S3: I/O errors and SIGKILL before each object-store operation.

The same sweeps as ``tests/adversarial/test_crash.py``, against a real
S3-protocol server: afterwards the previous checkpoint loads bit-exactly (or
the new one once its manifest object was written), a fresh path gives a clean
"incomplete" or "not found" error, a retry succeeds, and no object or
multipart upload of the failed save is left. Object stores have no locks, so
abandoned saves are recognised by age; these tests set the grace period to 0
(nothing else writes to their bucket).
"""

from __future__ import annotations

from typing import Any

import pytest

import treeckpt
from tests.adversarial.test_crash import (
    FORK_WARNING,
    NEW,
    _commit_index,
    _fresh,
    _loaded,
    _probe,
    _save_through,
    kill_sweep,
    leftovers,
)
from tests.s3.s3_utils import uploads
from treeckpt import CheckpointError
from treeckpt.shell import cleanup
from treeckpt.testing.faults import FaultMode

pytestmark = pytest.mark.s3


@pytest.fixture(autouse=True)
def _no_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cleanup, "ABANDONED_AFTER_S", 0.0)


def _fault_sweep(
    monkeypatch: pytest.MonkeyPatch, s3_url: str, s3fs_instance: Any, mode: FaultMode, every: int
) -> None:
    calls = _probe(monkeypatch, s3_url)
    commit = _commit_index(calls)
    for n in sorted({*range(0, len(calls), every), commit}):
        _fresh(s3_url)
        fb, err = _save_through(monkeypatch, s3_url, NEW, fail_at=n, mode=mode)
        where = f"fault at {fb.faults[0]} ({mode})"
        if n <= commit:
            assert isinstance(err, CheckpointError), f"{where}: {err!r}"
        committed = n > commit or (mode == "after" and n == commit)
        assert _loaded(s3_url) == ("new" if committed else "old"), where
        treeckpt.save(NEW, s3_url)
        assert _loaded(s3_url) == "new", where
        assert leftovers(s3_url) == [], where
        assert uploads(s3fs_instance, s3_url) == [], where


def test_fault_at_some_calls_of_an_overwrite_on_s3(
    monkeypatch: pytest.MonkeyPatch, s3_url: str, s3fs_instance: Any
) -> None:
    """An I/O error before every fifth call (and the manifest's)."""
    _fault_sweep(monkeypatch, s3_url, s3fs_instance, "before", every=5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["before", "torn", "after"])
def test_fault_at_every_call_of_an_overwrite_on_s3(
    monkeypatch: pytest.MonkeyPatch, s3_url: str, s3fs_instance: Any, mode: FaultMode
) -> None:
    _fault_sweep(monkeypatch, s3_url, s3fs_instance, mode, every=1)


def _kill_sweep(
    monkeypatch: pytest.MonkeyPatch, url: str, fs: Any, *, fresh: bool, mode: FaultMode, every: int
) -> None:
    outcomes = kill_sweep(monkeypatch, url, fresh=fresh, mode=mode, every=every)
    assert outcomes
    assert uploads(fs, url) == []


@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "overwrite"])
def test_sigkill_at_some_calls_on_s3(
    monkeypatch: pytest.MonkeyPatch, s3_url: str, s3fs_instance: Any, fresh: bool
) -> None:
    """Every fifth call, killed halfway through a write (a torn upload never becomes an object)."""
    _kill_sweep(monkeypatch, s3_url, s3fs_instance, fresh=fresh, mode="torn", every=5)


@pytest.mark.slow
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("mode", ["before", "torn", "after"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "overwrite"])
def test_sigkill_at_every_call_on_s3(
    monkeypatch: pytest.MonkeyPatch, s3_url: str, s3fs_instance: Any, fresh: bool, mode: FaultMode
) -> None:
    _kill_sweep(monkeypatch, s3_url, s3fs_instance, fresh=fresh, mode=mode, every=1)

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

import os
import signal
from typing import Any

import fsspec
import pytest
import torch

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
from treeckpt.store.backends import open_backend
from treeckpt.testing.faults import FaultMode, FaultyBackend

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


@pytest.mark.filterwarnings(FORK_WARNING)
def test_killed_mid_upload_leaves_an_upload_the_next_save_aborts(
    s3_url: str, s3fs_instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer killed after some parts of a large data object went up: no object appears,
    the unfinished multipart upload is found and aborted by the next save's clean-up."""
    # parts of 5 MiB (the S3 minimum) instead of s3fs's 50 MiB default: a 12 MiB object
    # is uploaded in parts as it is written
    conf = {**fsspec.config.conf["s3"], "default_block_size": 5 << 20}
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    big = {"x": torch.randn(3 << 20, generator=torch.Generator().manual_seed(0))}  # 12 MiB
    opts = treeckpt.SaveOptions(
        chunk_bytes=1 << 20, io_threads=1, compression=treeckpt.Compression(mode="never")
    )
    probe = open_backend(s3_url)
    probe.makedirs("")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            torch.set_num_threads(1)
            fb = FaultyBackend(open_backend(s3_url), fail_at=9, crash=True, ops={"write"})
            treeckpt.api._backend = lambda p: fb  # type: ignore[assignment]
            treeckpt.save(big, s3_url, options=opts)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    pending = uploads(s3fs_instance, s3_url)
    assert len(pending) == 1 and pending[0].endswith("r0-0.bin"), pending
    assert not [n for n in probe.listdir() if n.startswith("data-")]  # no object at all
    assert probe.unfinished() == [pending[0].split("/")[-2]]
    with pytest.raises(treeckpt.CheckpointNotFoundError):
        treeckpt.restore(s3_url)
    treeckpt.save(big, s3_url, options=opts)
    assert uploads(s3fs_instance, s3_url) == []
    assert leftovers(s3_url) == []
    assert torch.equal(treeckpt.restore(s3_url)["x"], big["x"])

"""CheckpointManager: steps, metadata, interval, retention, locking, damage, resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import treeckpt
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, OptionsError
from treeckpt.manager import (
    CheckpointManager,
    RootLockedError,
    StaleLockWarning,
    StepSkippedWarning,
)
from treeckpt.manager import root as root_mod
from treeckpt.testing.faults import FaultyBackend

FAST = treeckpt.SaveOptions(sync=False)
FORK_WARNING = "ignore:This process .* fork:DeprecationWarning"


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "run")
    else:
        url = f"memory://mgr-{uuid.uuid4().hex}"
        yield url
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "frozen": torch.arange(4096, dtype=torch.float32).reshape(64, 64),
        "head": torch.randn(32, generator=g),
        "step": step,
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        torch.equal(a["frozen"], b["frozen"])
        and torch.equal(a["head"], b["head"])
        and a["step"] == b["step"]
    )


def _files(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    return sorted(str(f)[len(path) + 1 :] for f in fs.find(path))


def test_steps_metadata_and_plain_loads(root: str) -> None:
    with CheckpointManager(root, options=FAST) as m:
        assert m.latest_step() is None and m.all_steps() == []
        for step in (5, 10, 15):
            assert m.save(step, _state(step), metrics={"loss": 1.0 / step}, user_metadata={"e": 1})
        assert m.all_steps() == [5, 10, 15]
        assert m.latest_step() == 15
        info = m.step_info(10)
        assert info.metrics == {"loss": 0.1}
        assert info.user_metadata == {"e": 1}
        assert abs(info.time - time.time()) < 600
        # no template: the saved tree rebuilt; with a template: in place
        assert _same(m.restore(), _state(15))
        assert m.restored_step == 15
        tmpl = {"frozen": torch.zeros(64, 64), "head": torch.zeros(32), "step": 0}
        out = m.restore(step=5, tree=tmpl)
        assert _same(out, _state(5)) and torch.equal(tmpl["head"], _state(5)["head"])
        # every step is a plain checkpoint
        assert _same(treeckpt.restore(m.step_path(10)), _state(10))
        with pytest.raises(CheckpointNotFoundError, match="step 7 is not a committed step"):
            m.restore(step=7)
        with pytest.raises(CheckpointError, match="step 10 is already saved"):
            m.save(10, _state(10))


def test_restore_of_an_empty_root(root: str) -> None:
    with CheckpointManager(root) as m, pytest.raises(CheckpointNotFoundError, match="no committed"):
        m.restore()


def test_interval_policy(root: str) -> None:
    with CheckpointManager(root, save_every_steps=10, options=FAST) as m:
        saved = [s for s in range(1, 31) if m.save(s, _state(s))]
        assert saved == [1, 10, 20, 30]
        assert not m.should_save(31)
        assert m.save(31, _state(31), force=True)
        assert m.all_steps() == [1, 10, 20, 30, 31]


@pytest.mark.parametrize("bad", [{"loss": float("nan")}, {"loss": "x"}, {1: 2.0}])
def test_bad_metrics_are_refused_before_writing(root: str, bad: Any) -> None:
    with CheckpointManager(root) as m:
        with pytest.raises(OptionsError):
            m.save(1, _state(1), metrics=bad)
        assert m.all_steps() == []


@pytest.mark.parametrize("incremental", [True, False])
def test_retention_by_count_deletes_only_after_a_commit(root: str, incremental: bool) -> None:
    with CheckpointManager(root, max_to_keep=2, incremental=incremental, options=FAST) as m:
        for step in (1, 2, 3):
            m.save(step, _state(step))
        assert m.all_steps() == [2, 3]
        # a failed save commits nothing and deletes nothing
        with pytest.raises(treeckpt.UnsupportedLeafError):
            m.save(4, {**_state(4), "bad": object()})
        assert m.all_steps() == [2, 3]
        assert _same(m.restore(), _state(3))
        m.save(4, _state(4))
        assert m.all_steps() == [3, 4]
        old = [f for f in _files(root) if f.startswith(("step-0000000001", "step-0000000002"))]
        if incremental:  # only the data files kept steps read (the unchanged "frozen" chunk)
            assert old and all(f.endswith((".bin", "/retired")) for f in old)
        else:
            assert old == []


@pytest.mark.parametrize("incremental", [True, False])
def test_retention_by_best_metric(root: str, incremental: bool) -> None:
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 9.0, 6: 8.0}
    with CheckpointManager(
        root,
        max_to_keep=1,
        keep_best=2,
        best_metric="loss",
        best_mode="min",
        incremental=incremental,
        options=FAST,
    ) as m:
        for step, loss in losses.items():
            m.save(step, _state(step), metrics={"loss": loss})
        assert m.all_steps() == [2, 4, 6]
        for step in (2, 4, 6):
            assert _same(treeckpt.restore(m.step_path(step)), _state(step))


def test_a_second_manager_on_the_root_is_refused(root: str) -> None:
    m = CheckpointManager(root)
    with pytest.raises(RootLockedError, match="another checkpoint manager uses this root"):
        CheckpointManager(root)
    m.close()
    with CheckpointManager(root) as again:
        assert again.all_steps() == []


def _write_lock(root: str, record: dict[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/manager.lock", json.dumps(record).encode())


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.filterwarnings(FORK_WARNING)
def test_stale_locks_are_taken_over(root: str) -> None:
    host = socket.gethostname()
    # a crashed holder on this host
    _write_lock(root, {"token": "x", "host": host, "pid": _dead_pid(), "time": time.time()})
    with pytest.warns(StaleLockWarning, match="stale lock"):
        CheckpointManager(root).close()
    # a holder elsewhere whose heartbeat stopped
    _write_lock(root, {"token": "x", "host": "elsewhere", "pid": 1, "time": time.time() - 99})
    with pytest.warns(StaleLockWarning):
        CheckpointManager(root, stale_lock_s=30).close()
    # a torn lock file
    fs, path = fsspec.core.url_to_fs(root)
    fs.pipe_file(f"{path}/manager.lock", b'{"tok')
    with pytest.warns(StaleLockWarning, match="unreadable"):
        CheckpointManager(root).close()
    # a live holder elsewhere is respected
    _write_lock(root, {"token": "x", "host": "elsewhere", "pid": 1, "time": time.time()})
    with pytest.raises(RootLockedError, match="elsewhere"):
        CheckpointManager(root, stale_lock_s=30)


def test_a_manager_whose_lock_was_taken_over_stops_saving(root: str) -> None:
    m = CheckpointManager(root, options=FAST)
    m.save(1, _state(1))
    _write_lock(root, {"token": "other", "host": "elsewhere", "pid": 1, "time": time.time()})
    with pytest.raises(RootLockedError, match="no longer holds the lock"):
        m.save(2, _state(2))
    assert m.all_steps() == [1]
    m.close()  # leaves the other holder's lock alone
    with pytest.raises(RootLockedError):
        CheckpointManager(root)


def test_heartbeat_keeps_a_short_lived_lock_fresh(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    with CheckpointManager(root, stale_lock_s=0.4):
        deadline = time.time() + 30
        first = json.loads(Path(root, "manager.lock").read_text())["time"]
        while json.loads(Path(root, "manager.lock").read_text())["time"] == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.05)
        # a busy but live holder is not mistaken for a crashed one (same host, live pid)
        with pytest.raises(RootLockedError):
            CheckpointManager(root, stale_lock_s=0.4)


def _damage(root: str, name: str) -> None:
    fs, path = fsspec.core.url_to_fs(root)
    data = bytearray(fs.cat_file(f"{path}/{name}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{path}/{name}", bytes(data))


@pytest.mark.parametrize("what", ["manifest", "index", "data", "missing-manifest"])
def test_a_damaged_latest_step_is_skipped_with_a_warning(root: str, what: str) -> None:
    with CheckpointManager(root, options=FAST) as m:
        for step in (1, 2, 3):
            m.save(step, _state(step))
        files = [f for f in _files(root) if f.startswith("step-0000000003/")]
        if what == "manifest":
            _damage(root, "step-0000000003/manifest.json")
        elif what == "index":
            _damage(root, next(f for f in files if "index-r0" in f))
        elif what == "data":
            for f in files:
                if f.endswith(".bin"):
                    _damage(root, f)
        else:
            fs, path = fsspec.core.url_to_fs(root)
            fs.rm_file(f"{path}/step-0000000003/manifest.json")
        with pytest.warns(StepSkippedWarning, match="step 3 is"):
            out = m.restore()
        assert m.restored_step == 2 and _same(out, _state(2))
        tmpl = {"frozen": torch.zeros(64, 64), "head": torch.zeros(32), "step": 0}
        with pytest.warns(StepSkippedWarning, match="step-0000000003"):
            assert _same(m.restore(tree=tmpl), _state(2))
        # an explicit request for the damaged step raises instead of falling back
        if what != "missing-manifest":
            with pytest.raises(CheckpointError):
                m.restore(step=3)
        # training goes on from step 2: step 3 is saved again over the damaged one
        m.save(3, _state(3))
        assert _same(m.restore(), _state(3))


def test_a_template_mismatch_is_not_mistaken_for_damage(root: str) -> None:
    with CheckpointManager(root, options=FAST) as m:
        m.save(1, _state(1))
        m.save(2, _state(2))
        with pytest.raises(treeckpt.LoadMismatchError):
            m.restore(tree={"frozen": torch.zeros(3), "head": torch.zeros(32), "step": 0})


def test_a_crash_between_steps_leaves_a_partial_step_that_is_skipped(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest commit of step 3 fails: step 3 never appears and leaves nothing behind."""
    real = root_mod.open_backend

    def faulty(path: str) -> Any:
        b = real(path)
        if path.endswith("step-0000000003"):
            return FaultyBackend(b, fail_at=0, ops={"commit_file"}, sticky=True)
        return b

    with CheckpointManager(root, max_to_keep=2, options=FAST) as m:
        m.save(1, _state(1))
        m.save(2, _state(2))
        monkeypatch.setattr(root_mod, "open_backend", faulty)
        with pytest.raises(CheckpointError):
            m.save(3, _state(3))
        monkeypatch.setattr(root_mod, "open_backend", real)
        assert m.all_steps() == [1, 2]  # no retention ran: step 1 is still there
        assert not any(f.startswith("step-0000000003") for f in _files(root))
        assert _same(m.restore(), _state(2))
        m.save(3, _state(3))
        assert m.all_steps() == [2, 3]
        assert _same(m.restore(), _state(3))


def _train_and_die(root: str, kill_at: int) -> int:
    """A training loop in a child process, SIGKILLed in the middle of step ``kill_at``'s commit."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            torch.set_num_threads(1)
            real = root_mod.open_backend

            def faulty(path: str) -> Any:
                b = real(path)
                if path.endswith(f"step-{kill_at:010d}"):
                    return FaultyBackend(b, fail_at=0, ops={"commit_file"}, crash=True)
                return b

            root_mod.open_backend = faulty  # type: ignore[assignment]
            m = CheckpointManager(root, max_to_keep=2)
            for step in range(1, 10):
                m.save(step, _state(step))
        finally:
            os._exit(3)
    return pid


@pytest.mark.filterwarnings(FORK_WARNING)
def test_resume_after_a_kill(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    pid = _train_and_die(root, kill_at=4)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # the dead trainer's lock is stale (its pid is gone): a new one takes over
    with pytest.warns(StaleLockWarning):
        m = CheckpointManager(root, max_to_keep=2)
    with m:
        assert m.all_steps() == [2, 3]
        with pytest.warns(StepSkippedWarning, match="step 4 is partial"):
            state = m.restore()
        assert _same(state, _state(3))
        for step in range(state["step"] + 1, 7):
            m.save(step, _state(step))
        assert m.all_steps() == [5, 6]
        assert _same(m.restore(), _state(6))
        assert not any(f.startswith("step-0000000004") for f in _files(root))

"""SIGKILL at every storage operation of a manager's save and retention.

After each kill, a new manager takes the root over (the dead trainer's lock is
stale), restores the newest good step bit-exactly, every listed step loads,
and training goes on.
"""

from __future__ import annotations

import os
import shutil
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import treeckpt
from treeckpt.manager import CheckpointManager, StaleLockWarning, StepSkippedWarning
from treeckpt.manager import root as root_mod
from treeckpt.testing.faults import FaultyBackend

pytestmark = pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")
OPTS = treeckpt.SaveOptions(sync=True, chunk_bytes=16 << 10)
FROZEN = torch.arange(16_384, dtype=torch.float32)


def _state(step: int) -> dict[str, Any]:
    return {"frozen": FROZEN, "head": torch.full((2048,), float(step)), "step": step}


def _same(a: dict[str, Any], step: int) -> bool:
    b = _state(step)
    return all(
        torch.equal(a[k], v) if isinstance(v, torch.Tensor) else a[k] == v for k, v in b.items()
    )


def _setup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    with CheckpointManager(root, max_to_keep=1, options=OPTS) as m:
        m.save(1, _state(1))
        m.save(2, _state(2))


def _save_step_3(
    root: Path, backend_kill: int | None, root_kill: int | None, mode: str = "before"
) -> tuple[int, int]:
    """Save step 3, killing the process at a call of a step's backend or of the root's."""
    real = root_mod.open_backend
    probe: list[FaultyBackend] = []
    root_probe: list[FaultyBackend] = []

    def wrapped(path: str) -> Any:
        is_root = path == str(root)
        b = FaultyBackend(
            real(path),
            fail_at=root_kill if is_root else backend_kill,
            crash=(root_kill if is_root else backend_kill) is not None,
            mode=mode,  # type: ignore[arg-type]
        )
        (root_probe if is_root else probe).append(b)
        return b

    root_mod.open_backend = wrapped  # type: ignore[assignment]
    try:
        m = CheckpointManager(root, max_to_keep=1, options=OPTS)
        m.save(3, _state(3))
        m.close()
    finally:
        root_mod.open_backend = real
    # backend calls counted per backend; the save's own backend is the one with a commit
    return max(len(b.calls) for b in probe), len(root_probe[0].calls)


def _recover(root: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaleLockWarning)
        warnings.simplefilter("ignore", StepSkippedWarning)
        m = CheckpointManager(root, max_to_keep=1, options=OPTS)
        state = m.restore()
    with m:
        got = m.restored_step
        assert got in (2, 3) and _same(state, got)
        for step in m.all_steps():
            assert _same(treeckpt.restore(m.step_path(step)), step), step
        m.save(got + 1, _state(got + 1))
        assert _same(m.restore(), got + 1)
        assert m.all_steps() == [got + 1]
    return got


def _kill_sweep(
    root: Path, total: int, make: Callable[[int], tuple[int | None, int | None, str]]
) -> set[int]:
    seen = set()
    for n in range(total):
        _setup(root)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                torch.set_num_threads(1)
                _save_step_3(root, *make(n))
            finally:
                os._exit(7)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (n, status)
        seen.add(_recover(root))
    return seen


def test_kill_at_every_call_of_a_save_and_its_retention(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _setup(root)
    backend_calls, root_calls = _save_step_3(root, None, None)
    assert backend_calls > 3 and root_calls > 2
    # killed before or right after each call of the save itself: step 2, or
    # step 3 once its manifest is committed
    seen = _kill_sweep(root, backend_calls, lambda n: (n, None, "before"))
    seen |= _kill_sweep(root, backend_calls, lambda n: (n, None, "after"))
    assert seen == {2, 3}
    # killed at every change of the root: opening (the lock), preparation, retention
    # (markers, manifest and file removals) and closing
    seen = _kill_sweep(root, root_calls, lambda n: (None, n, "before"))
    assert 3 in seen

"""Crash safety of an overwrite: I/O errors and process death at every point of a save.

For every mutating backend call N of a save over a committed checkpoint, the
save is made to fail at N (an ``OSError`` before the call, a torn write, a
disk that stays dead, the call taking effect and then failing) or the writer
process is killed there. Afterwards the checkpoint loads the old values or
the new ones, bit-exactly, never a mix and never an error; a failed save
raises a ``CheckpointError``; a retry succeeds.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import treeckpt
import treeckpt.api as api
from tests.adversarial.forge import SAVE_OPTIONS, same, sample_tree, template_of
from treeckpt import CheckpointError, CheckpointNotFoundError, IncompleteCheckpointError
from treeckpt.store.backends import open_backend
from treeckpt.testing.faults import FaultMode, FaultyBackend, InjectedFault

OLD = sample_tree(0)
NEW = sample_tree(1)

FAST = dataclasses.replace(SAVE_OPTIONS, sync=False)  # set-up and retries need no fsync
FORK_WARNING = "ignore:This process .* fork:DeprecationWarning"


@pytest.fixture(params=["local", "memory"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    name = f"treeckpt-crash-{uuid.uuid4().hex}"
    yield f"memory://{name}/ckpt"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _fresh(path: str) -> None:
    """``path`` holds exactly one committed checkpoint of OLD."""
    backend = open_backend(path)
    backend.remove_tree("")
    treeckpt.save(OLD, path, options=FAST)


def _save_through(
    monkeypatch: pytest.MonkeyPatch, path: str, tree: Any, **faults: Any
) -> tuple[FaultyBackend, Exception | None]:
    fb = FaultyBackend(open_backend(path), **faults)
    with monkeypatch.context() as m:
        m.setattr(api, "_backend", lambda p: fb)
        try:
            treeckpt.save(tree, path, options=SAVE_OPTIONS)
        except Exception as exc:
            return fb, exc
    return fb, None


def _loaded(path: str) -> Any:
    """What a reader sees now: OLD or NEW, checked bit-exactly via restore and a template load."""
    got = treeckpt.restore(path)
    for name, tree in (("old", OLD), ("new", NEW)):
        if same(tree, got):
            assert same(tree, treeckpt.load(template_of(tree), path)), name
            return name
    raise AssertionError(f"{path}: the checkpoint holds neither the old nor the new values")


def _data_dirs(path: str) -> list[str]:
    return [n for n in open_backend(path).listdir() if n.startswith("data-")]


def _probe(monkeypatch: pytest.MonkeyPatch, path: str) -> list[str]:
    """The mutating calls of one save of NEW over OLD, by operation."""
    _fresh(path)
    fb, err = _save_through(monkeypatch, path, NEW)
    assert err is None
    return [c.op + " " + c.name for c in fb.calls]


def _commit_index(calls: list[str]) -> int:
    (n,) = [i for i, c in enumerate(calls) if c == "commit_file manifest.json"]
    return n


@pytest.mark.parametrize(
    ("mode", "sticky"), [("before", False), ("torn", False), ("before", True), ("after", False)]
)
def test_fault_at_every_call_of_an_overwrite(
    monkeypatch: pytest.MonkeyPatch, target: str, mode: FaultMode, sticky: bool
) -> None:
    calls = _probe(monkeypatch, target)
    commit = _commit_index(calls)
    ops = {c.split()[0] for c in calls}
    assert {"makedirs", "open_writer", "write", "close", "commit_file", "remove_tree"} <= ops
    assert calls[-1].startswith("remove_tree data-")  # the old data goes last
    outcomes = []
    for n in range(len(calls) + 1):
        _fresh(target)
        fb, err = _save_through(monkeypatch, target, NEW, fail_at=n, mode=mode, sticky=sticky)
        where = f"fault at {fb.faults[0] if fb.faults else 'nothing'} ({mode}, sticky={sticky})"
        if n <= commit:
            assert isinstance(err, CheckpointError), f"{where}: {err!r}"
            assert "injected fault" in str(err), where
        elif n < len(calls):
            assert err is None, f"{where}: removing the old data is best-effort: {err!r}"
        # "after" at the manifest commit: the new manifest is live although the call failed
        committed = n > commit or (mode == "after" and n == commit)
        seen = _loaded(target)
        assert seen == ("new" if committed else "old"), where
        outcomes.append(seen)
        # a retry without faults succeeds
        treeckpt.save(NEW, target, options=FAST)
        assert _loaded(target) == "new", where
    assert "old" in outcomes and "new" in outcomes


def test_manifest_commit_that_fails_after_taking_effect(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The rename happened, then the directory fsync failed: the save reports the failure but
    must not delete the data the now-live manifest points to."""
    path = str(tmp_path / "ckpt")
    _fresh(path)
    _, err = _save_through(
        monkeypatch, path, NEW, fail_at=0, mode="after", ops={"commit_file"}
    )  # the manifest is the only file committed by rename
    assert isinstance(err, CheckpointError)
    assert _loaded(path) == "new"


def test_manifest_commit_failing_after_rename_is_detected_by_readers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Whatever the save reported, a reader gets old or new values, never a mix or garbage."""
    path = str(tmp_path / "ckpt")
    for mode in ("before", "torn", "after"):
        _fresh(path)
        _save_through(monkeypatch, path, NEW, fail_at=0, mode=mode, ops={"commit_file"})
        assert _loaded(path) in ("old", "new")


def test_failed_saves_leave_no_data_directories(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = str(tmp_path / "ckpt")
    calls = _probe(monkeypatch, path)
    leaks = []
    for mode in ("before", "after"):
        for n in range(_commit_index(calls)):
            _fresh(path)
            fb, err = _save_through(monkeypatch, path, NEW, fail_at=n, mode=mode)
            assert err is not None
            if len(_data_dirs(path)) != 1:
                leaks.append(f"{mode} {fb.faults[0]}")
    assert not leaks, leaks


def test_failing_reads_raise_checkpoint_errors(
    monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    _fresh(target)
    probe = FaultyBackend(open_backend(target))
    monkeypatch.setattr(api, "_backend", lambda p: probe)
    treeckpt.load(template_of(OLD), target)
    n_reads = len(probe.reads)
    assert n_reads >= 4
    for n in range(n_reads):
        fb = FaultyBackend(open_backend(target), fail_read_at=n)
        monkeypatch.setattr(api, "_backend", lambda p, fb=fb: fb)
        with pytest.raises(CheckpointError) as info:
            treeckpt.load(template_of(OLD), target)
        assert isinstance(info.value.__cause__, InjectedFault) or "injected" in str(info.value)
        call = fb.faults[0]
        assert os.path.basename(call.name) in str(info.value), (call, str(info.value))
    monkeypatch.undo()
    assert _loaded(target) == "old"


# --------------------------------------------------------- real process death


def _fork_save(tree: Any, path: str, **faults: Any) -> int:
    """Save ``tree`` in a forked child (optionally through a FaultyBackend); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            torch.set_num_threads(1)
            if faults:
                fb = FaultyBackend(open_backend(path), **faults)
                api._backend = lambda p: fb  # type: ignore[assignment]
            treeckpt.save(tree, path, options=SAVE_OPTIONS)
            code = 0
        finally:
            os._exit(code)
    return pid


@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("mode", ["before", "torn", "after"])
def test_process_killed_at_every_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: FaultMode
) -> None:
    """SIGKILL at each mutating call: no clean-up runs; old or new, never a mix."""
    path = str(tmp_path / "ckpt")
    calls = _probe(monkeypatch, path)
    commit = _commit_index(calls)
    for n in range(len(calls)):
        _fresh(path)
        pid = _fork_save(NEW, path, fail_at=n, mode=mode, crash=True)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (n, status)
        seen = _loaded(path)
        committed = n > commit or (n == commit and mode == "after")
        assert seen == ("new" if committed else "old"), (n, calls[n], mode)
        treeckpt.save(NEW, path, options=FAST)
        assert _loaded(path) == "new"


def leftovers(path: str) -> list[str]:
    """Entries of a checkpoint other than its manifest, its ``.metadata`` marker and the
    live save's data directory."""
    live = treeckpt.metadata(path).save_id
    keep = ("manifest.json", ".metadata", f"data-{live}")
    return [n for n in open_backend(path).listdir() if n not in keep]


def kill_sweep(
    monkeypatch: pytest.MonkeyPatch, path: str, *, fresh: bool, mode: FaultMode, every: int = 1
) -> dict[str, int]:
    """SIGKILL a saving child before (or halfway through, or just after) each mutating call.

    Afterwards: on an overwrite the old checkpoint loads bit-exactly, or the new
    one once its manifest was committed; on a fresh path the new one, or a
    clean "incomplete"/"not found" error. A retry then succeeds and leaves no
    file of the killed save behind. Returns the outcomes counted.
    """

    def reset() -> None:
        if fresh:
            open_backend(path).remove_tree("")
        else:
            _fresh(path)

    reset()
    probe, err = _save_through(monkeypatch, path, NEW)
    assert err is None
    calls = [f"{c.op} {c.name}" for c in probe.calls]
    commit = _commit_index(calls)
    outcomes: dict[str, int] = {}
    for n in range(0, len(calls), every):
        reset()
        pid = _fork_save(NEW, path, fail_at=n, mode=mode, crash=True)
        _, status = os.waitpid(pid, 0)
        where = f"killed at {calls[n]} ({mode}, {'fresh' if fresh else 'overwrite'})"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (where, status)
        committed = n > commit or (n == commit and mode == "after")
        if committed:
            seen = _loaded(path)
            assert seen == "new", where
        elif fresh:
            with pytest.raises((IncompleteCheckpointError, CheckpointNotFoundError)) as info:
                treeckpt.restore(path)
            with pytest.raises(CheckpointError):
                treeckpt.load(template_of(NEW), path)
            seen = type(info.value).__name__
        else:
            seen = _loaded(path)
            assert seen == "old", where
        outcomes[seen] = outcomes.get(seen, 0) + 1
        treeckpt.save(NEW, path, options=FAST)
        assert _loaded(path) == "new", where
        assert leftovers(path) == [], where
    return outcomes


@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("mode", ["before", "torn"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "overwrite"])
def test_sigkill_sweep_then_retry_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: bool, mode: FaultMode
) -> None:
    outcomes = kill_sweep(monkeypatch, str(tmp_path / "ckpt"), fresh=fresh, mode=mode)
    assert len(outcomes) >= 2, outcomes  # the sweep crossed the commit


@pytest.mark.filterwarnings(FORK_WARNING)
def test_torn_manifest_temp_file_of_a_killed_commit(tmp_path: Path) -> None:
    """A commit killed between writing its temporary manifest and the rename leaves a torn
    ``manifest.json.tmp-<pid>-<thread>``: readers ignore it, the next save removes it, and
    one of a live process is left alone."""
    path = str(tmp_path / "ckpt")
    _fresh(path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a process that is gone by the time anyone looks
        os._exit(0)
    os.waitpid(pid, 0)
    dead = f"manifest.json.tmp-{pid}-1"
    live = f"manifest.json.tmp-{os.getpid()}-2"
    torn = (Path(path) / "manifest.json").read_bytes()[:100]
    for name in (dead, live):
        (Path(path) / name).write_bytes(torn)
    assert _loaded(path) == "old"
    treeckpt.save(NEW, path, options=FAST)
    assert _loaded(path) == "new"
    assert leftovers(path) == [live]


@pytest.mark.filterwarnings(FORK_WARNING)
def test_sigkill_at_random_moments_of_a_large_overwrite(tmp_path: Path) -> None:
    """A child overwrites ~32 MB of tensors and is killed after a random delay."""
    path = str(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    base = {f"t{k}": torch.randn(1 << 21, generator=g) for k in range(4)}
    opts = treeckpt.SaveOptions(chunk_bytes=1 << 20, io_threads=2)

    def version(v: int) -> dict[str, Any]:
        return {**{k: t + v for k, t in base.items()}, "version": v}

    committed = version(0)
    treeckpt.save(committed, path, options=opts)
    start = time.monotonic()
    treeckpt.save(committed, str(tmp_path / "timing"), options=opts)
    duration = time.monotonic() - start

    rng = random.Random(1234)
    fractions = [0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.5]
    seen = []
    for trial, frac in enumerate(fractions, start=1):
        new = version(trial)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                torch.set_num_threads(1)
                treeckpt.save(new, path, options=opts)
            finally:
                os._exit(0)
        time.sleep(frac * duration * rng.uniform(0.8, 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = treeckpt.restore(path)
        assert got["version"] in (committed["version"], trial), (trial, got["version"])
        expected = committed if got["version"] == committed["version"] else new
        for k in base:
            assert torch.equal(got[k].view(torch.int32), expected[k].view(torch.int32)), (trial, k)
        seen.append("new" if expected is new else "old")
        committed = expected
    # whatever the kills left behind, the next save works and is the only one loaded
    final = version(99)
    treeckpt.save(final, path, options=opts)
    got = treeckpt.restore(path)
    assert got["version"] == 99 and all(torch.equal(got[k], final[k]) for k in base)
    assert "old" in seen or "new" in seen


# ---------------------------------------------------------------- concurrency


def _versions(n: int) -> list[dict[str, Any]]:
    return [
        {"a": torch.full((50_000,), float(v)), "b": torch.arange(20_000) * v, "v": v}
        for v in range(n)
    ]


def _check_version(got: Any, trees: list[dict[str, Any]]) -> None:
    want = trees[got["v"]]
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"]), got["v"]


def test_concurrent_readers_during_overwrites_never_see_a_mix(tmp_path: Path) -> None:
    """A load racing an overwrite returns one whole checkpoint or raises a CheckpointError
    (the old data may be removed under it; documented: retry)."""
    path = str(tmp_path / "ckpt")
    trees = _versions(3)
    opts = treeckpt.SaveOptions(chunk_bytes=1 << 16, sync=False)
    treeckpt.save(trees[0], path, options=opts)
    stop = threading.Event()
    outcomes: list[str] = []
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                _check_version(treeckpt.restore(path), trees)
                outcomes.append("ok")
            except CheckpointError:
                outcomes.append("error")
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for n in range(30):
            treeckpt.save(trees[n % 3], path, options=opts)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[0]
    assert "ok" in outcomes
    _check_version(treeckpt.restore(path), trees)


def test_concurrent_savers_last_commit_wins(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    trees = _versions(4)
    opts = treeckpt.SaveOptions(chunk_bytes=1 << 16, sync=False)
    treeckpt.save(trees[0], path, options=opts)
    errors: list[BaseException] = []

    def saver(k: int) -> None:
        try:
            for n in range(8):
                treeckpt.save(trees[1 + (k + n) % 3], path, options=opts)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    got = treeckpt.restore(path)
    _check_version(got, trees)
    # the committed checkpoint's data survived the other saver's clean-up
    assert f"data-{treeckpt.metadata(path).save_id}" in os.listdir(path)

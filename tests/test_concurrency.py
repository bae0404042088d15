"""Concurrency across processes: savers racing to one path, readers loading during saves.

Two processes save different trees to the same path at the same moment while
a third loads it in a loop. Every load returns exactly one saver's tree
(checked bit-exactly, tensor by tensor, so a mix of two saves would show) or
raises a ``CheckpointError``; each saver either returns (its save committed)
or raises a ``CheckpointError``, never another exception; the checkpoint left
at the end is the tree of a saver that returned. The next save leaves no file
of either racer behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any

import pytest
import torch

import treeckpt
from treeckpt import CheckpointError
from treeckpt.store.backends import open_backend

FORK_WARNING = "ignore:This process .* fork:DeprecationWarning"
OPTS = treeckpt.SaveOptions(chunk_bytes=4096, io_threads=2, sync=False)
ROUNDS = 6


def version(v: int) -> dict[str, Any]:
    """A tree whose every tensor says which version it is (over many chunks and two files)."""
    g = torch.Generator().manual_seed(v)
    return {
        "a": torch.full((6000,), float(v)),
        "b": torch.arange(3000, dtype=torch.int64) * (v + 1),
        "c": torch.randn(40, 40, generator=g),
        "v": v,
    }


def which(got: dict[str, Any], candidates: set[int]) -> int:
    """The version ``got`` is, bit-exactly; AssertionError for a mix or wrong values."""
    v = got["v"]
    assert v in candidates, f"version {v} was never saved here"
    want = version(v)
    for k in ("a", "b", "c"):
        assert got[k].dtype == want[k].dtype and torch.equal(
            got[k].view(torch.uint8), want[k].view(torch.uint8)
        ), f"tensor {k!r} is not version {v}'s: a mix of saves"
    return v


def _saver(path: str, v: int, start: Any, q: Any) -> None:
    torch.set_num_threads(1)
    try:
        start.wait(timeout=60)
        treeckpt.save(version(v), path, options=OPTS)
        q.put(("saver", v, "ok", ""))
    except CheckpointError as exc:
        q.put(("saver", v, "error", f"{type(exc).__name__}: {exc}"))
    except BaseException:
        q.put(("saver", v, "bad", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)


def _reader(path: str, candidates: list[int], start: Any, stop: Any, q: Any) -> None:
    torch.set_num_threads(1)
    seen: dict[str, int] = {}
    try:
        start.wait(timeout=60)
        while not stop.is_set() or not seen:
            try:
                v = which(treeckpt.restore(path), set(candidates))
                key = f"v{v}"
            except CheckpointError as exc:
                key = type(exc).__name__
            seen[key] = seen.get(key, 0) + 1
        q.put(("reader", -1, "ok", seen))
    except BaseException:
        q.put(("reader", -1, "bad", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)


def race(path: str, first: int, *, rounds: int = ROUNDS, clean_up: bool = True) -> dict[str, int]:
    """``rounds`` races of two savers and a reader on ``path`` (holding version ``first``).

    With ``clean_up``, one more save must leave no file of any racer behind.
    """
    ctx = mp.get_context("fork")
    committed = {first}
    reads: dict[str, int] = {}
    outcomes: list[tuple[str, ...]] = []
    for r in range(rounds):
        a, b = first + 1 + 2 * r, first + 2 + 2 * r
        q = ctx.Queue()
        start = ctx.Barrier(3)
        stop = ctx.Event()
        savers = [ctx.Process(target=_saver, args=(path, v, start, q)) for v in (a, b)]
        reader = ctx.Process(
            target=_reader, args=(path, sorted(committed | {a, b}), start, stop, q)
        )
        procs = [*savers, reader]
        for p in procs:
            p.start()
        results: dict[int, tuple[str, str]] = {}
        try:
            while len(results) < 2:
                who, v, status, detail = q.get(timeout=120)
                assert status != "bad", f"{who} {v} failed with a non-CheckpointError:\n{detail}"
                results[v] = (status, detail)
            stop.set()
            who, _, status, detail = q.get(timeout=120)
            assert status == "ok", f"reader:\n{detail}"
        finally:
            stop.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=10)
        for key, n in detail.items():  # type: ignore[union-attr]
            reads[key] = reads.get(key, 0) + n
        final = which(treeckpt.restore(path), committed | {a, b})
        if final in (a, b):
            assert results[final][0] == "ok", (final, results)  # a failed save never wins
        else:
            assert all(s == "error" for s, _ in results.values()), (final, results)
        outcomes.append(tuple(sorted(s for s, _ in results.values())))
        committed.add(final)
    if clean_up:
        assert_next_save_cleans_up(path)
    return reads


def assert_next_save_cleans_up(path: str) -> None:
    """One more save leaves only its own files."""
    treeckpt.save(version(0), path, options=OPTS)
    live = treeckpt.metadata(path).save_id
    keep = (".metadata", "manifest.json", f"data-{live}")
    extra = [n for n in open_backend(path).listdir() if n not in keep]
    assert extra == [], extra
    which(treeckpt.restore(path), {0})


@pytest.mark.filterwarnings(FORK_WARNING)
def test_two_savers_race_while_a_reader_loads(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    treeckpt.save(version(100), path, options=OPTS)
    reads = race(path, 100)
    assert any(k.startswith("v") for k in reads), reads


@pytest.mark.filterwarnings(FORK_WARNING)
def test_racing_savers_on_a_fresh_path(tmp_path: Any) -> None:
    """No checkpoint yet: readers see one saver's whole tree or get a CheckpointError."""
    path = str(tmp_path / "ckpt")
    reads = race(path, 200, rounds=1)
    # every other outcome is the name of a CheckpointError (the reader catches nothing else)
    assert {k for k in reads if k.startswith("v")} <= {"v201", "v202"}, reads


def test_save_whose_claim_is_taken_fails_before_writing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean-up that holds a new save's directory makes that save fail cleanly."""
    from treeckpt.shell import cleanup

    path = str(tmp_path / "ckpt")
    treeckpt.save(version(1), path, options=OPTS)

    def taken(backend: Any, save_id: str) -> Any:
        raise BlockingIOError(11, "claimed by a clean-up")

    monkeypatch.setattr(cleanup, "claim", taken)
    with pytest.raises(CheckpointError, match="claimed"):
        treeckpt.save(version(2), path, options=OPTS)
    monkeypatch.undo()
    which(treeckpt.restore(path), {1})
    assert len([n for n in os.listdir(path) if n.startswith("data-")]) == 1


def test_cleanup_never_removes_a_directory_a_live_save_holds(tmp_path: Any) -> None:
    """An unfinished save's directory, held by its claim, survives another save's clean-up;
    once the claim is gone (the process died) the next save removes it."""
    path = str(tmp_path / "ckpt")
    treeckpt.save(version(1), path, options=OPTS)
    backend = open_backend(path)
    backend.makedirs("data-00000000000000ab")
    hold = backend.hold_dir("data-00000000000000ab")
    assert hold is not None
    treeckpt.save(version(2), path, options=OPTS)
    assert "data-00000000000000ab" in os.listdir(path)
    hold.release()
    treeckpt.save(version(3), path, options=OPTS)
    assert "data-00000000000000ab" not in os.listdir(path)
    which(treeckpt.restore(path), {3})

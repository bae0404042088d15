"""async_save: returns once staged, saves what the state was then, errors on the future."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt.shell import save as save_mod
from treeckpt.shell.staging import StagingPool
from treeckpt.testing import assert_same_tree


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    return {"model": model, "optim": opt, "step": 1, "arr": np.arange(10.0)}


def _snapshot(tree: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": type(tree["model"].state_dict())(
            (k, v.clone()) for k, v in tree["model"].state_dict().items()
        ),
        "arr": tree["arr"].copy(),
    }


def _train_step(tree: dict[str, Any]) -> None:
    tree["model"](torch.randn(4, 32)).sum().backward()
    tree["optim"].step()
    tree["arr"] += 1.0


def test_saves_the_state_as_it_was_when_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = threading.Event()
    real = save_mod._write_rank

    def write_after_training(*args: Any, **kwargs: Any) -> Any:
        trained.wait(30)  # the bytes are read only after the state changed
        return real(*args, **kwargs)

    monkeypatch.setattr(save_mod, "_write_rank", write_after_training)
    tree = _state()
    before = _snapshot(tree)
    total = sum(v.numel() * v.element_size() for v in tree["model"].state_dict().values())
    fut = treeckpt.async_save(tree, tmp_path / "ck")
    _train_step(tree)  # training goes on while the save is written
    trained.set()
    res = fut.result(timeout=60)
    assert isinstance(res, treeckpt.SaveResult)
    assert fut.blocked_s > 0
    assert 0 < fut.copy_s <= fut.blocked_s
    # model + optimizer moments + step counters + the array, all copied once
    assert fut.staged_bytes >= total * 3 + tree["arr"].nbytes
    assert fut.host_bytes == fut.staged_bytes
    back = treeckpt.restore(tmp_path / "ck")
    assert_same_tree(back["model"], before["model"])
    np.testing.assert_array_equal(back["arr"], before["arr"])
    assert back["step"] == 1


def test_second_save_reuses_the_buffers_and_sees_new_values(tmp_path: Path) -> None:
    saver = treeckpt.AsyncSaver()
    tree = _state()
    f1 = saver.save(tree, tmp_path / "a")
    f1.result(timeout=60)
    held = saver.host_bytes
    buffers = dict(saver._pool._buffers)
    _train_step(tree)
    after = _snapshot(tree)
    f2 = saver.save(tree, tmp_path / "b")
    f2.result(timeout=60)
    assert saver.host_bytes == held
    assert all(saver._pool._buffers[k] is b for k, b in buffers.items())  # no new allocation
    assert_same_tree(treeckpt.restore(tmp_path / "b")["model"], after["model"])
    saver.close()
    assert saver.host_bytes == 0


def test_a_second_save_waits_for_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = save_mod._write_rank

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(save_mod, "_write_rank", slow_write)
    tree = {"w": torch.arange(1000.0)}
    f1 = treeckpt.async_save(tree, tmp_path / "ck")
    assert not f1.done()  # blocked in the background, not on the caller
    timer = threading.Timer(0.2, release.set)
    timer.start()
    f2 = treeckpt.async_save({"w": torch.arange(5.0)}, tmp_path / "ck")
    assert f1.done()  # staging the second waited for the first to finish
    f2.result(timeout=60)
    timer.join()
    np.testing.assert_array_equal(treeckpt.restore(tmp_path / "ck")["w"].numpy(), np.arange(5.0))


def test_planning_errors_are_on_the_future(tmp_path: Path) -> None:
    fut = treeckpt.async_save({"bad": object()}, tmp_path / "ck")
    assert fut.done()
    with pytest.raises(treeckpt.UnsupportedLeafError, match="bad"):
        fut.result()


def test_write_errors_are_on_the_future_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ck"
    treeckpt.save({"w": torch.ones(4)}, path)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(save_mod, "_write_rank", broken)
    fut = treeckpt.async_save({"w": torch.zeros(4)}, path)
    with pytest.raises(treeckpt.CheckpointError, match="disk full"):
        fut.result(timeout=60)
    assert torch.equal(treeckpt.restore(path)["w"], torch.ones(4))
    assert len([p for p in path.iterdir() if p.name.startswith("data-")]) == 1


def test_a_new_directory_is_made_durable_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from treeckpt import asyncsave
    from treeckpt.shell import ranks

    synced: list[str] = []
    committed_before: list[bool] = []

    def sync_then_record(backend: Any) -> None:
        committed_before.append((Path(backend.root) / "manifest.json").exists())
        synced.append(backend.root)
        ranks.sync_new_dir(backend)

    monkeypatch.setattr(asyncsave, "sync_new_dir", sync_then_record)
    fut = treeckpt.async_save({"w": torch.ones(4)}, tmp_path / "new")
    fut.result(timeout=60)
    assert len(synced) == 1 and committed_before == [False]
    fut = treeckpt.async_save({"w": torch.ones(4)}, tmp_path / "new")  # exists: no fsync
    fut.result(timeout=60)
    assert len(synced) == 1

    def broken(backend: Any) -> None:
        raise treeckpt.CheckpointError(f"{backend.root}: cannot create the checkpoint directory")

    monkeypatch.setattr(asyncsave, "sync_new_dir", broken)
    fut = treeckpt.async_save({"w": torch.ones(4)}, tmp_path / "other")
    with pytest.raises(treeckpt.CheckpointError, match="cannot create the checkpoint directory"):
        fut.result(timeout=60)
    assert not (tmp_path / "other" / "manifest.json").exists()


def test_staging_copies_only_what_the_rank_writes() -> None:
    """Replicas another rank writes are not copied (pure check on the pool)."""
    pool = StagingPool()
    tree = {"a": torch.arange(6.0), "b": torch.arange(4.0)}
    from treeckpt.core.options import SaveOptions
    from treeckpt.shell.coord import LocalCoordinator
    from treeckpt.store.backends import open_backend

    backend = open_backend("memory://treeckpt-staging-test")
    prepared = save_mod.prepare_save(tree, backend, options=SaveOptions(), coord=LocalCoordinator())
    only_a = tuple(i for i in prepared.items if i.fqn == "a")
    staged, nbytes = pool.stage(save_mod.PreparedSave(**{**_fields(prepared), "items": only_a}))
    assert nbytes == 24 and set(staged.local) == {"a"}
    assert staged.local["a"][0][1].data_ptr() != tree["a"].data_ptr()
    backend.close()


def _fields(p: save_mod.PreparedSave) -> dict[str, Any]:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


# --- many ranks -------------------------------------------------------------


def _fsdp_async(rank: int, world: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    fut = treeckpt.async_save({"model": model, "optim": opt, "step": 1}, path)
    saved = dict(model.state_dict())
    saved = {k: v.full_tensor() for k, v in saved.items()}
    # Training goes on, with collectives on the default group, during the write.
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    fut.result(timeout=60)
    return saved


def _replicated_async(rank: int, world: int, path: str) -> int:
    tree = {f"t{i}": torch.full((256,), float(i)) for i in range(8)}  # the same on every rank
    fut = treeckpt.async_save(tree, path)
    fut.result(timeout=60)
    return fut.staged_bytes


def _stage_fails_on_rank_1(rank: int, world: int, path: str) -> str:
    if rank == 1:

        def broken(self: Any, prepared: Any) -> Any:
            raise MemoryError("no pinned memory left")

        StagingPool.stage = broken  # type: ignore[method-assign]
    fut = treeckpt.async_save({"w": torch.zeros(8)}, path)
    err = fut.exception(timeout=60)
    assert isinstance(err, treeckpt.CheckpointError), err
    # The group is usable after the failure: a synchronous save goes through.
    treeckpt.save({"w": torch.ones(8)}, path)
    dist.barrier()
    return str(err)


@pytest.mark.distributed
def test_fsdp2_async_save_while_training(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    saved = run_ranks(2, _fsdp_async, tmp_path, path)[0]
    back = treeckpt.restore(path)
    assert back["step"] == 1
    assert_same_tree(dict(back["model"]), saved)


@pytest.mark.distributed
def test_replicas_are_staged_by_one_rank_only(tmp_path: Path) -> None:
    staged = run_ranks(2, _replicated_async, tmp_path, str(tmp_path / "ck"))
    assert sum(staged) == 8 * 256 * 4  # each tensor staged once across the ranks
    assert min(staged) > 0  # and the work is shared


@pytest.mark.distributed
def test_a_rank_failing_to_stage_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    errors = run_ranks(2, _stage_fails_on_rank_1, tmp_path, path)
    assert all("no pinned memory left" in e for e in errors), errors
    assert torch.equal(treeckpt.restore(path)["w"], torch.ones(8))

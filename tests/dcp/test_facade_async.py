"""``dcp.async_save``: staged copy saved in the background, THREAD and PROCESS,
stagers, the returned Future / AsyncSaveResponse, errors through the future."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

import treeckpt
import treeckpt.dcp as dcp
from treeckpt.dcp.staging import BlockingAsyncStager, DefaultStager, StagingOptions
from treeckpt.dcp.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse


def _load(path: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(v) for k, v in like.items()}
    dcp.load(out, checkpoint_id=path)
    return out


def test_thread_saves_the_staged_copy(tmp_ckpt: str) -> None:
    w = torch.arange(6.0)
    fut = dcp.async_save({"w": w, "step": 4}, checkpoint_id=tmp_ckpt)
    assert isinstance(fut, Future)
    w.fill_(-1.0)  # changed right after staging: the checkpoint keeps the staged values
    md = fut.result(timeout=60)
    assert isinstance(md, dcp.Metadata)
    assert torch.equal(_load(tmp_ckpt, {"w": w})["w"], torch.arange(6.0))
    assert treeckpt.restore(tmp_ckpt)["step"] == 4


def test_async_stager_gives_staging_and_upload_futures(tmp_ckpt: str) -> None:
    stager = DefaultStager(StagingOptions(use_async_staging=True))
    try:
        resp = dcp.async_save({"w": torch.ones(3)}, checkpoint_id=tmp_ckpt, async_stager=stager)
        assert isinstance(resp, AsyncSaveResponse)
        assert resp.staging_completion.result(timeout=60) is None
        assert isinstance(resp.upload_completion.result(timeout=60), dcp.Metadata)
    finally:
        stager.close()
    assert torch.equal(_load(tmp_ckpt, {"w": torch.ones(3)})["w"], torch.ones(3))


def test_blocking_stager_reuses_buffers_across_saves(tmp_path: Path) -> None:
    stager = BlockingAsyncStager(cache_staged_state_dict=True)
    src = {"w": torch.arange(4.0)}
    first = stager.stage(src)
    src["w"].add_(1.0)
    second = stager.stage(src)
    assert second["w"].data_ptr() == first["w"].data_ptr()
    assert torch.equal(second["w"], torch.arange(4.0) + 1)
    fut = dcp.async_save(src, checkpoint_id=str(tmp_path / "c"), async_stager=stager)
    assert isinstance(fut, Future)
    fut.result(timeout=60)


def test_repeated_async_saves_through_one_writer(tmp_ckpt: str) -> None:
    writer = dcp.FileSystemWriter(tmp_ckpt, cache_staged_state_dict=True)
    for step in range(2):
        fut = dcp.async_save({"w": torch.full((2,), float(step))}, storage_writer=writer)
        assert isinstance(fut, Future)
        fut.result(timeout=60)
    assert torch.equal(_load(tmp_ckpt, {"w": torch.zeros(2)})["w"], torch.full((2,), 1.0))


def test_process_checkpointer(tmp_ckpt: str) -> None:
    fut = dcp.async_save(
        {"w": torch.arange(5.0), "note": "hi"},
        checkpoint_id=tmp_ckpt,
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    )
    assert isinstance(fut, Future)
    assert isinstance(fut.result(timeout=120), dcp.Metadata)
    assert treeckpt.restore(tmp_ckpt)["note"] == "hi"
    assert torch.equal(_load(tmp_ckpt, {"w": torch.zeros(5)})["w"], torch.arange(5.0))
    # An error in the checkpoint process reaches the caller's future.
    failing = dcp.async_save(
        {"w": torch.zeros(5)},
        storage_writer=dcp.FileSystemWriter(tmp_ckpt, overwrite=False),
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    )
    assert isinstance(failing, Future)
    with pytest.raises(dcp.CheckpointException, match="overwrite=False") as info:
        failing.result(timeout=120)
    assert 0 in info.value.failures


def test_a_failed_async_save_raises_from_result(tmp_ckpt: str) -> None:
    dcp.save({"w": torch.ones(1)}, checkpoint_id=tmp_ckpt)
    writer = dcp.FileSystemWriter(tmp_ckpt, overwrite=False)
    fut = dcp.async_save({"w": torch.zeros(1)}, storage_writer=writer)
    assert isinstance(fut, Future)
    with pytest.raises(dcp.CheckpointException, match="overwrite=False"):
        fut.result(timeout=60)
    assert torch.equal(_load(tmp_ckpt, {"w": torch.zeros(1)})["w"], torch.ones(1))

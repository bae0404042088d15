"""``async_save(async_checkpointer_type=PROCESS)`` on 2 gloo ranks: each rank's save runs
in a checkpoint process of its own (another PID, its own process group), the state
crosses in shared memory, the checkpoint loads bit for bit, and a failure in the
checkpoint process reaches the caller's future naming the rank."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import treeckpt.dcp as dcp
from tests.dist_utils import run_ranks
from treeckpt.dcp import _process
from treeckpt.dcp.staging import DefaultStager, StagingOptions

pytestmark = pytest.mark.distributed

PROCESS = AsyncCheckpointerType.PROCESS


def _state(step: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4) * (step + 1)
    return {
        "sharded": distribute_tensor(full, mesh, [Shard(0)]),
        "replicated": torch.linspace(0, 1, 5, dtype=torch.float64) + step,
        "own": torch.full((3,), float(dist.get_rank() + 10 * step)),
        "step": step,
    }


def _bits(t: torch.Tensor) -> bytes:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _process_saves(rank: int, world: int, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 1. the default stager: staged into shared memory, saved by the checkpoint process.
    state = _state(1)
    fut = dcp.async_save(
        {k: v for k, v in state.items() if k != "own"},
        checkpoint_id=root / "a",
        async_checkpointer_type=PROCESS,
    )
    md = fut.result(timeout=120)
    out["metadata"] = isinstance(md, dcp.Metadata)
    [proc] = [p for k, p in _process._PROCESSES.items() if k[0] == os.getpid()]
    out["pid_differs"] = proc.pid != os.getpid()
    back = {
        "sharded": distribute_tensor(torch.zeros(6, 4), state["sharded"].device_mesh, [Shard(0)]),
        "replicated": torch.zeros(5, dtype=torch.float64),
        "step": 0,
    }
    dcp.load(back, checkpoint_id=root / "a")
    out["a_bits"] = all(_bits(back[k]) == _bits(state[k]) for k in ("sharded", "replicated"))
    out["a_step"] = back["step"]

    # 2. a second save reuses the same checkpoint process; a stager with async
    # staging gives both futures.
    stager = DefaultStager(StagingOptions(use_async_staging=True))
    state2 = _state(2)
    resp = dcp.async_save(
        {f"own{rank}": state2["own"]},
        checkpoint_id=root / "b",
        async_checkpointer_type=PROCESS,
        async_stager=stager,
    )
    out["response"] = isinstance(resp, AsyncSaveResponse)
    assert isinstance(resp, AsyncSaveResponse)
    assert resp.staging_completion.result(timeout=60) is None
    resp.upload_completion.result(timeout=120)
    stager.close()
    [again] = [p for k, p in _process._PROCESSES.items() if k[0] == os.getpid()]
    out["same_process"] = again is proc and again.pid == proc.pid
    got = {f"own{r}": torch.zeros(3) for r in range(world)}
    dcp.load(got, checkpoint_id=root / "b")
    out["b_bits"] = [_bits(got[f"own{r}"]) for r in range(world)] == [
        _bits(torch.full((3,), float(r + 20))) for r in range(world)
    ]

    # 3. a failure in the checkpoint process (rank 1's writer refuses to overwrite).
    writer = dcp.FileSystemWriter(root / "a", overwrite=rank != 1)
    failing = dcp.async_save(
        {k: v for k, v in _state(3).items() if k != "own"},
        storage_writer=writer,
        async_checkpointer_type=PROCESS,
    )
    try:
        failing.result(timeout=120)
        out["error"] = None
    except dcp.CheckpointException as exc:
        out["error"] = str(exc)
        out["failed_ranks"] = sorted(exc.failures)
    # The checkpoint of step 1 is intact.
    dcp.load(back, checkpoint_id=root / "a")
    out["still_a"] = all(_bits(back[k]) == _bits(state[k]) for k in ("sharded", "replicated"))
    return out


def test_process_async_save_on_two_ranks(tmp_path: Path) -> None:
    results = run_ranks(2, _process_saves, tmp_path, tmp_path, timeout=300, group_timeout=120)
    for rank, res in enumerate(results):
        assert res["failed_ranks"] == [1], res
        assert res["error"].startswith(f"rank {rank}'s checkpoint process (pid "), res
    print(results[0]["error"])
    for rank, res in enumerate(results):
        assert res["metadata"] and res["pid_differs"], (rank, res)
        assert res["a_bits"] and res["a_step"] == 1, (rank, res)
        assert res["response"] and res["same_process"] and res["b_bits"], (rank, res)
        assert res["still_a"], (rank, res)
        assert res["error"] is not None and "overwrite=False" in res["error"], (rank, res)
        assert "rank 1" in res["error"], (rank, res)


class DyingWriter(dcp.FileSystemWriter):
    """A writer whose checkpoint process exits on rank 1 while the save sets up."""

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("rank", 0 if is_coordinator else 1) == 1:
            os._exit(3)
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)


def _process_dies(rank: int, world: int, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state = {"w": torch.full((4,), float(rank))}
    failing = dcp.async_save(
        {f"w{rank}": state["w"]},
        storage_writer=DyingWriter(root / "x"),
        async_checkpointer_type=PROCESS,
    )
    try:
        failing.result(timeout=120)
    except dcp.CheckpointException as exc:
        out["error"] = str(exc)
        out["failed_ranks"] = sorted(exc.failures)
    [first] = [p for k, p in _process._PROCESSES.items() if k[0] == os.getpid()]
    # The next save starts new checkpoint processes (on every rank) and succeeds.
    fut = dcp.async_save(
        {f"w{rank}": state["w"]}, checkpoint_id=root / "y", async_checkpointer_type=PROCESS
    )
    fut.result(timeout=120)
    [second] = [p for k, p in _process._PROCESSES.items() if k[0] == os.getpid()]
    out["restarted"] = second is not first and second.pid != first.pid
    got = {f"w{r}": torch.zeros(4) for r in range(world)}
    dcp.load(got, checkpoint_id=root / "y")
    out["bits"] = all(torch.equal(got[f"w{r}"], torch.full((4,), float(r))) for r in range(world))
    return out


def test_a_checkpoint_process_dying_fails_the_save_and_the_next_save_restarts(
    tmp_path: Path,
) -> None:
    results = run_ranks(2, _process_dies, tmp_path, tmp_path, timeout=300, group_timeout=120)
    assert results[1]["error"].startswith("rank 1's checkpoint process (pid ")
    assert results[1]["error"].endswith("the checkpoint process exited (exit code 3)")
    assert results[1]["failed_ranks"] == [1]
    # Rank 0's checkpoint process finds its peer gone in the save's first agreement.
    assert "rank(s) 1 did not reach it" in results[0]["error"], results[0]
    for res in results:
        assert res["restarted"] and res["bits"], res


def test_packing_puts_many_tensors_in_few_slabs_and_round_trips_bit_for_bit() -> None:
    arena = _process.SharedArena()
    staged = {
        "many": [arena.alloc(torch.Size([3, 5]), torch.float32).fill_(i) for i in range(2000)],
        "bf16": arena.alloc(torch.Size([7]), torch.bfloat16).copy_(torch.arange(7.0)),
        "empty": arena.alloc(torch.Size([0, 4]), torch.float64),
        "step": 9,
    }
    outside = torch.arange(10, dtype=torch.int64)  # not staged in the arena: copied in
    staged["outside"] = outside
    pack = _process.packed(staged, arena)
    assert len(pack.slabs) == 1 and pack.slabs[0].is_shared()
    back = _process.unpacked(pack)
    for i, t in enumerate(back["many"]):
        assert t.data_ptr() == staged["many"][i].data_ptr()  # the same memory, not a copy
        assert torch.equal(t, torch.full((3, 5), float(i)))
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], staged["bf16"])
    assert back["empty"].shape == (0, 4) and back["empty"].dtype == torch.float64
    assert back["step"] == 9
    assert torch.equal(back["outside"], outside)
    assert back["outside"].data_ptr() != outside.data_ptr()


def test_a_tensor_larger_than_a_slab_gets_its_own() -> None:
    arena = _process.SharedArena()
    small = arena.alloc(torch.Size([4]), torch.uint8)
    big = arena.alloc(torch.Size([_process.SLAB_BYTES + 1]), torch.uint8)
    assert len(arena.slabs) == 2 and arena.slabs[1].numel() == _process.SLAB_BYTES + 1
    assert arena.place(small) == (0, 0) and arena.place(big) == (1, 0)

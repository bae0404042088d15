"""CUDA state through treeckpt: bit-exact round trips, pinned buffers reused, async saves.

Skipped without a CUDA device (the ``gpu`` marker); ``benchmarks/gpu_suite.sh``
runs them on a machine with one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import treeckpt
import treeckpt.dcp as tdcp
from treeckpt.shell.transfer import HOST_POOL

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _state() -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        "bf16": torch.randn(300, 257, device="cuda", generator=g).to(torch.bfloat16),
        "fp32": torch.randn(1000, 33, device="cuda", generator=g),
        "view": torch.randn(64, 48, device="cuda", generator=g).t(),  # not contiguous
        "i8": torch.randint(-128, 127, (5000,), dtype=torch.int8, device="cuda", generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64, device="cuda"),
        "mask": torch.arange(77, device="cuda") % 3 == 0,
        "empty": torch.zeros(0, 4, device="cuda"),
        "cpu": torch.arange(10.0),
        "step": 7,
    }


def _template(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: torch.full_like(v, 3) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()
    }


def _assert_same(got: dict[str, Any], want: dict[str, bytes | int]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert (_bits(got[k]) if isinstance(got[k], torch.Tensor) else got[k]) == v, k


def _expected(state: dict[str, Any]) -> dict[str, bytes | int]:
    return {k: _bits(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


OPTS = treeckpt.SaveOptions(chunk_bytes=64 << 10, io_threads=2)


def test_cuda_state_round_trips_bit_exact(tmp_path: Path) -> None:
    state = _state()
    want = _expected(state)
    treeckpt.save(state, tmp_path / "ck", options=OPTS)
    template = _template(state)
    ptrs = {k: v.data_ptr() for k, v in template.items() if isinstance(v, torch.Tensor)}
    treeckpt.load(template, tmp_path / "ck")
    _assert_same(template, want)
    assert {k: template[k].data_ptr() for k in ptrs} == ptrs  # filled in place
    assert all(template[k].device == state[k].device for k in ptrs)
    _assert_same(treeckpt.restore(tmp_path / "ck"), want)  # on the CPU


def test_sync_saves_reuse_the_pinned_lane_buffers(tmp_path: Path) -> None:
    state = _state()
    HOST_POOL.clear()
    made = HOST_POOL.allocated
    one_lane = treeckpt.SaveOptions(chunk_bytes=64 << 10, io_threads=1)
    treeckpt.save(state, tmp_path / "a", options=one_lane)
    first = HOST_POOL.allocated - made
    assert first == 2  # the lane's two buffers
    assert all(b.is_pinned() and b.numel() <= 64 << 10 for _, b, _ in HOST_POOL._free)
    treeckpt.save(state, tmp_path / "b", options=one_lane)
    assert HOST_POOL.allocated - made == first  # the second save allocated nothing
    _assert_same(treeckpt.restore(tmp_path / "b"), _expected(state))


def _changed(t: torch.Tensor) -> torch.Tensor:
    return t.logical_not() if t.dtype == torch.bool else t * -1


def _change_(t: torch.Tensor) -> None:
    """In place, queued on the current stream: the same values as ``_changed``."""
    if t.dtype == torch.bool:
        t.logical_not_()
    else:
        t.mul_(-1)


def test_async_save_keeps_the_values_of_when_it_was_called(tmp_path: Path) -> None:
    state = _state()
    saver = treeckpt.AsyncSaver()
    try:
        cuda = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_cuda]
        want = _expected({k: _changed(v) if k in cuda else v for k, v in state.items()})
        # (that synchronised: the stream is idle here)
        # Work queued on the current stream before the save must be in it: a long
        # kernel, then new values, both still queued when async_save is called.
        torch.cuda._sleep(200_000_000)
        for k in cuda:
            _change_(state[k])
        fut = saver.save(state, tmp_path / "a", options=OPTS)
        for v in state.values():
            if isinstance(v, torch.Tensor):
                _change_(v)  # training goes on
        fut.result(timeout=120)
        assert all(b.is_pinned() for k, b in saver._pool._buffers.items() if k[0] != "cpu")
        _assert_same(treeckpt.restore(tmp_path / "a"), want)
        buffers = dict(saver._pool._buffers)
        want2 = _expected(state)
        saver.save(state, tmp_path / "b", options=OPTS).result(timeout=120)
        assert all(saver._pool._buffers[k] is b for k, b in buffers.items())  # reused
        _assert_same(treeckpt.restore(tmp_path / "b"), want2)
    finally:
        saver.close()


def test_dcp_facade_round_trips_cuda_state(tmp_path: Path) -> None:
    state = {k: v for k, v in _state().items() if isinstance(v, torch.Tensor)}
    want = _expected(state)
    tdcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    template = _template(state)
    tdcp.load(template, checkpoint_id=str(tmp_path / "ck"))
    _assert_same(template, want)


def test_nccl_default_group_under_torchrun(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += [str(REPO / "tests" / "gpu" / "nccl_job.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"backend": "nccl", "sync_ok": True, "async_ok": True}

"""treeckpt consolidate: one torch.load-able file, bit-exact, under a memory budget."""

from __future__ import annotations

import collections
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import treeckpt
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, OptionsError
from treeckpt.tools.consolidate import consolidate
from treeckpt.tools.consolidate.writer import slabs as _slabs


def _tree() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "state_dict": {
            "big": torch.randn(37, 11, 5, generator=g),
            "bf16": torch.randn(64, 3, generator=g).bfloat16(),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.zeros(0, 4),
            "ints": torch.arange(100, dtype=torch.int64),
            "mask": torch.rand(9, generator=g) > 0.5,
        },
        "optimizer_states": [{"state": {"big": {"step": torch.tensor(3.0)}}, "param_groups": []}],
        "epoch": 3,
        "name": "run-1",
        "ratio": float("nan"),
        "pair": (1, None),
        "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
        "od": collections.OrderedDict(b=1, a=2),
        "nt": collections.namedtuple("NT", ["x", "y"])(1, 2),
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    treeckpt.save(_tree(), path, options=treeckpt.SaveOptions(chunk_bytes=256))
    return path


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("max_memory", [None, 1, 100, 1000])
def test_output_loads_with_weights_only_and_is_bit_exact(
    ckpt: Path, max_memory: int | None
) -> None:
    report = consolidate(ckpt, max_memory=max_memory)
    assert report.dst == f"{ckpt}.consolidated"
    out = torch.load(report.dst, weights_only=True)
    src = _tree()
    assert list(out) == list(src)
    for k, v in src["state_dict"].items():
        assert _same(out["state_dict"][k], v), k
    assert _same(out["optimizer_states"][0]["state"]["big"]["step"], torch.tensor(3.0))
    assert out["epoch"] == 3 and out["name"] == "run-1" and math.isnan(out["ratio"])
    assert out["pair"] == (1, None)
    # numpy arrays become torch tensors; namedtuples plain tuples (weights_only can load them).
    assert torch.equal(out["arr"], torch.arange(6, dtype=torch.int16).reshape(2, 3))
    assert out["od"] == collections.OrderedDict(b=1, a=2) and list(out["od"]) == ["b", "a"]
    assert out["nt"] == (1, 2)
    assert report.tensors == 8
    assert (
        report.tensor_bytes
        == sum(t.nbytes for t in [*src["state_dict"].values(), torch.tensor(3.0)])
        + src["arr"].nbytes
    )
    if max_memory is not None and max_memory >= 8:
        assert report.largest_read <= max_memory


def test_refuses_to_overwrite(ckpt: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"out\.pt exists"):
        consolidate(ckpt, dst)
    assert dst.read_bytes() == b"keep me"
    consolidate(ckpt, dst, overwrite=True)
    assert torch.load(dst, weights_only=True)["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out.pt"]  # no temporary file left


def test_pickled_leaf_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    treeckpt.save({"x": torch.ones(2), "obj": range(1, 3)}, path, allow_pickle=True)
    with pytest.raises(CheckpointError, match="'obj' was saved with pickle"):
        consolidate(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        consolidate(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        consolidate(tmp_path / "nothing", tmp_path / "no" / "out.pt")
    with pytest.raises(OptionsError, match="max_memory"):
        consolidate(tmp_path / "nothing", max_memory=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_written_like_lightning(tmp_path: Path) -> None:
    """The layout Lightning's ModelParallelStrategy writes with DCP: state_dict and
    optimizer_0 in the DCP files, everything else in meta.pt."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(1)
    model = {"w": torch.randn(33, 7, generator=g), "b": torch.randn(7, generator=g).half()}
    optim = {
        "state": {"w": {"exp_avg": torch.randn(33, 7, generator=g), "step": torch.tensor(4.0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w", "b"]}],
    }
    path = tmp_path / "ckpt"
    dcp.save({"state_dict": model, "optimizer_0": optim}, checkpoint_id=str(path), no_dist=True)
    torch.save({"epoch": 1, "global_step": 7, "loops": {"a": 1}}, path / "meta.pt")

    report = consolidate(path, max_memory=64)
    assert report.source_format == "dcp"
    out = torch.load(report.dst, weights_only=True)
    assert set(out) == {"epoch", "global_step", "loops", "state_dict", "optimizer_states"}
    assert out["global_step"] == 7 and out["loops"] == {"a": 1}
    assert set(out["state_dict"]) == {"w", "b"}
    for k, v in model.items():
        assert _same(out["state_dict"][k], v)
    (opt,) = out["optimizer_states"]
    assert _same(opt["state"]["w"]["exp_avg"], optim["state"]["w"]["exp_avg"])
    assert _same(opt["state"]["w"]["step"], torch.tensor(4.0))
    assert opt["param_groups"] == optim["param_groups"]


@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(1, 400),
)
def test_slabs_tile_the_tensor_in_order_within_the_budget(
    shape: tuple[int, ...], itemsize: int, budget: int
) -> None:
    n = math.prod(shape)
    covered = np.zeros(n, dtype=np.int64)
    pos = 0
    for box, offset in _slabs(shape, itemsize, budget):
        assert offset == pos * itemsize  # in row-major order, one after another
        size = math.prod(box.sizes)
        assert size * itemsize <= budget or size == 1 or n == 0
        idx = np.zeros(shape, dtype=bool)
        idx[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes, strict=True))] = True
        flat = np.flatnonzero(idx.reshape(-1))
        assert list(flat) == list(range(pos, pos + size))  # contiguous in memory
        covered[flat] += 1
        pos += size
    assert (covered == 1).all() and pos == n


def test_command_line(ckpt: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "treeckpt", "consolidate", str(ckpt), "--max-memory", "1K"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {ckpt}.consolidated" in done.stdout
    assert torch.load(f"{ckpt}.consolidated", weights_only=True)["epoch"] == 3
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2
    assert "exists" in again.stderr and "--overwrite" in again.stderr


_RSS_CHILD = """
import resource, sys, torch, treeckpt
import torch._subclasses.fake_tensor
from treeckpt.tools.consolidate import consolidate
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = consolidate(sys.argv[1], sys.argv[2], max_memory=int(sys.argv[3]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, report.tensor_bytes)
"""


@pytest.mark.slow
def test_peak_memory_stays_near_the_budget_not_the_checkpoint_size(tmp_path: Path) -> None:
    """256 MiB of incompressible tensors, consolidated with an 8 MiB budget: the peak
    grows by the budget plus the chunks being read, well under half the checkpoint."""
    g = torch.Generator().manual_seed(0)
    tree = {"state_dict": {f"w{i}": torch.randn(2048, 2048, generator=g) for i in range(16)}}
    treeckpt.save(tree, tmp_path / "big")
    del tree
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", _RSS_CHILD, str(tmp_path / "big"), str(tmp_path / "o"), "8388608"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    grown, total = (int(x) for x in done.stdout.split())
    assert total == 256 << 20
    assert grown < total // 2, f"peak RSS grew by {grown >> 20} MiB"

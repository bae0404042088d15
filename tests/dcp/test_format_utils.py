"""``treeckpt.dcp.format_utils``: conversions, the broadcasting reader and the command line."""

from __future__ import annotations

import collections
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as tdcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save as torch_dcp_to_torch_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import treeckpt
import treeckpt.dcp as dcp
import treeckpt.formats.torch_dcp.writer as tw
from tests.dist_utils import run_ranks
from treeckpt import CheckpointError, CheckpointNotFoundError
from treeckpt.dcp.format_utils import (
    BroadcastingTorchSaveReader,
    DynamicMetaLoadPlanner,
    dcp_to_torch_save,
    main,
    torch_save_to_dcp,
)
from treeckpt.testing import assert_same_tree

Pair = collections.namedtuple("Pair", ["a", "b"])


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(64, 32), "b": torch.randn(32).to(torch.bfloat16)},
        "optim": {
            "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 32)}},
            "param_groups": [{"lr": 0.1, "params": ["w"]}],
        },
        "ints": torch.arange(10, dtype=torch.int64),
        "f8": torch.randn(3, 2).to(torch.float8_e4m3fn),  # no typed storage class
        "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16),
        "empty": torch.zeros(0, 3),
        "pair": Pair(torch.ones(2), 5),
        "meta": {"step": 7, "name": "run", "blob": b"\x00\x01", "none": None},
    }


def test_dcp_to_torch_save_from_treeckpt(tmp_path: Path) -> None:
    state = _state()
    treeckpt.save(state, tmp_path / "ckpt")
    dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=True, mmap=True)
    want = {**state, "pair": (state["pair"].a, 5)}  # namedtuples become tuples
    assert_same_tree(want, got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out.pt"]  # no temporary left


def test_dcp_to_torch_save_from_torch_dcp_matches_torch(tmp_path: Path) -> None:
    state = _state()
    del state["pair"]
    tdcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "ours.pt")
    torch_dcp_to_torch_save(tmp_path / "dcp", tmp_path / "theirs.pt")
    assert_same_tree(
        torch.load(tmp_path / "theirs.pt", weights_only=False),
        torch.load(tmp_path / "ours.pt", weights_only=True),
    )


def test_dcp_to_torch_save_holds_one_tensor_at_a_time(tmp_path: Path, monkeypatch: Any) -> None:
    treeckpt.save({f"t{i}": torch.full((256,), float(i)) for i in range(6)}, tmp_path / "ckpt")
    real = tw.open_lazy
    alive: list[weakref.ref[torch.Tensor]] = []

    def spy(path: Any) -> Any:
        cm = real(path)
        tree, fetch = cm.__enter__()

        def fetch_one(fqn: str) -> torch.Tensor:
            gc.collect()
            assert all(r() is None for r in alive), "an earlier tensor is still held"
            t = fetch(fqn)
            alive.append(weakref.ref(t))
            return t

        class _CM:
            def __enter__(self) -> Any:
                return tree, fetch_one

            def __exit__(self, *exc: Any) -> None:
                cm.__exit__(*exc)

        return _CM()

    monkeypatch.setattr("treeckpt.dcp.format_utils.open_lazy", spy)
    dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "out.pt")
    assert len(alive) == 6
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert [float(got[f"t{i}"][0]) for i in range(6)] == [0, 1, 2, 3, 4, 5]


def test_torch_save_to_dcp_and_errors(tmp_path: Path) -> None:
    state = {**_state(), "pair": (torch.ones(2), 5)}  # weights_only reads no namedtuple
    torch.save(state, tmp_path / "in.pt")
    torch_save_to_dcp(tmp_path / "in.pt", tmp_path / "ckpt")
    assert_same_tree(state, treeckpt.restore(tmp_path / "ckpt"))

    torch.save({"obj": Pair}, tmp_path / "evil.pt")  # a class reference needs pickle
    with pytest.raises(CheckpointError, match=r"evil\.pt: holds objects that need pickle.*Pair"):
        torch_save_to_dcp(tmp_path / "evil.pt", tmp_path / "c2")
    assert not (tmp_path / "c2").exists()
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pt"):
        torch_save_to_dcp(tmp_path / "nope.pt", tmp_path / "c3")


def test_command_line(tmp_path: Path, capsys: Any) -> None:
    state = {"w": torch.randn(3, 3), "step": 2}
    torch.save(state, tmp_path / "m.pt")
    assert main(["torch_to_dcp", str(tmp_path / "m.pt"), str(tmp_path / "ckpt")]) == 0
    assert main(["dcp_to_torch", str(tmp_path / "ckpt"), str(tmp_path / "back.pt")]) == 0
    assert_same_tree(state, torch.load(tmp_path / "back.pt", weights_only=True))
    assert main(["treeckpt_to_dcp", str(tmp_path / "ckpt"), str(tmp_path / "dcp")]) == 0
    assert main(["dcp_to_treeckpt", str(tmp_path / "dcp"), str(tmp_path / "again")]) == 0
    assert_same_tree(state, treeckpt.restore(tmp_path / "again"))
    assert main(["dcp_to_torch", str(tmp_path / "missing"), str(tmp_path / "x.pt")]) == 1
    assert "missing" in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "treeckpt.dcp.format_utils",
            "dcp_to_torch",
            str(tmp_path / "dcp"),
            str(tmp_path / "cli.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert_same_tree(state, torch.load(tmp_path / "cli.pt", weights_only=True))


def _broadcast_load(rank: int, world: int, cases: list[tuple[str, bool]]) -> list[Any]:
    """Load each (file, wrong model shape) case into an FSDP2 model; a value or the error text."""
    from torch.distributed.fsdp import fully_shard

    out: list[Any] = []
    for path, bad in cases:
        model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 4 if bad else 3))
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        sd = {"model": model.state_dict()}
        try:
            tdcp.load(
                sd,
                storage_reader=BroadcastingTorchSaveReader(),
                planner=DynamicMetaLoadPlanner(),
                checkpoint_id=path,
            )
        except BaseException as exc:  # torch wraps the CheckpointError in its CheckpointException
            out.append(str(exc))
            continue
        assert isinstance(sd["model"]["0.weight"], DTensor)
        out.append({k: v.full_tensor() for k, v in model.state_dict().items()})
    return out


@pytest.mark.distributed
def test_broadcasting_reader_into_a_sharded_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 3))
    torch.save({"model": src.state_dict()}, tmp_path / "m.pt")
    evil = {"model": {**src.state_dict(), "extra": Pair}}  # a class: needs pickle to load
    torch.save(evil, tmp_path / "evil.pt")
    good, wrong, refused = zip(
        *run_ranks(
            2,
            _broadcast_load,
            tmp_path,
            [
                (str(tmp_path / "m.pt"), False),
                (str(tmp_path / "m.pt"), True),
                (str(tmp_path / "evil.pt"), False),
            ],
        ),
        strict=True,
    )
    for got in good:
        assert_same_tree(dict(src.state_dict()), got)
    for e in wrong:  # every rank fails the same way, naming the tensors
        assert "model.1.weight (file torch.float32[3, 5], model torch.float32[4, 5])" in e
    for e in refused:
        assert "evil.pt" in e and "holds objects that need pickle" in e and "Pair" in e


def _facade_broadcast_load(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    """The same reader and planner through ``treeckpt.dcp.load`` into an FSDP2 model."""
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 3))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    sd = {"model": model.state_dict()}
    dcp.load(
        sd,
        storage_reader=BroadcastingTorchSaveReader(),
        planner=DynamicMetaLoadPlanner(),
        checkpoint_id=path,
    )
    assert isinstance(model.state_dict()["0.weight"], DTensor)
    assert model.state_dict()["0.weight"].to_local().shape == ((3, 2)[rank], 8)
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


@pytest.mark.distributed
def test_broadcasting_reader_through_the_facade(tmp_path: Path) -> None:
    """A ``torch.save`` file written by one process loads into FSDP2 shards on 2 ranks."""
    torch.manual_seed(4)
    src = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 3))
    torch.save({"model": src.state_dict()}, tmp_path / "m.pt")
    for got in run_ranks(2, _facade_broadcast_load, tmp_path, str(tmp_path / "m.pt")):
        assert_same_tree(dict(src.state_dict()), got)

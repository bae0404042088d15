"""``load`` updates the caller's state in place (RELIABILITY.md 13), and meta tensors
are refused on both sides before anything changes."""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt.errors import LoadMismatchError, RankFailureError, UnsupportedLeafError


@dataclasses.dataclass
class Config:
    lr: float
    name: str
    betas: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Frozen:
    seed: int
    tag: str


class Pair(NamedTuple):
    a: int
    b: torch.Tensor


class Counter:
    """A user Stateful object."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]


def _state(k: int) -> dict[str, Any]:
    return {
        "step": 100 * k,
        "lr": 0.5 / (k + 1),
        "tag": f"run-{k}",
        "flag": k % 2 == 0,
        "none_or_int": None if k == 0 else k,
        "w": torch.full((3,), float(k)),
        "np": np.full((2,), k, dtype=np.int32),
        "np_scalar": np.float32(k + 0.25),
        "list": [k, [k + 1, "x" * k], torch.tensor([k])],
        "odict": collections.OrderedDict(b=k, a=str(k)),
        "ddict": collections.defaultdict(list, {"x": [k, k]}),
        "deque": collections.deque([k, k + 1], maxlen=4),
        "tuple": (k, f"t{k}"),
        "pair": Pair(k, torch.tensor([float(k)])),
        "cfg": Config(lr=0.1 * k, name=f"c{k}", betas=(0.9, 0.9 + k / 100)),
        "frozen": Frozen(seed=k, tag=f"f{k}"),
        "counter": Counter(k),
    }


def test_load_updates_every_container_in_place(tmp_path: Path) -> None:
    treeckpt.save(_state(3), tmp_path / "c")
    tree = _state(0)
    ids = {k: id(v) for k, v in tree.items()}
    inner_list = tree["list"][1]
    w = tree["w"]
    out = treeckpt.load(tree, tmp_path / "c")

    assert out is tree
    # Mutable containers keep their identity; immutable ones are new objects in place.
    for key in ("w", "np", "list", "odict", "ddict", "deque", "cfg", "counter"):
        assert id(tree[key]) == ids[key], key
    assert tree["list"][1] is inner_list and tree["w"] is w
    assert tree["ddict"].default_factory is list and tree["deque"].maxlen == 4

    want = _state(3)
    assert tree["step"] == 300 and tree["lr"] == want["lr"] and tree["tag"] == "run-3"
    assert tree["flag"] is False and tree["none_or_int"] == 3
    assert torch.equal(tree["w"], want["w"])
    assert np.array_equal(tree["np"], want["np"])
    assert type(tree["np_scalar"]) is np.float32 and tree["np_scalar"] == np.float32(3.25)
    assert tree["list"][:2] == [3, [4, "xxx"]] and torch.equal(tree["list"][2], torch.tensor([3]))
    assert list(tree["odict"].items()) == [("b", 3), ("a", "3")]
    assert tree["ddict"] == {"x": [3, 3]} and list(tree["deque"]) == [3, 4]
    assert tree["tuple"] == (3, "t3")
    assert type(tree["pair"]) is Pair and tree["pair"].a == 3
    assert torch.equal(tree["pair"].b, torch.tensor([3.0]))
    assert tree["cfg"] == want["cfg"]
    assert type(tree["frozen"]) is Frozen and tree["frozen"] == Frozen(seed=3, tag="f3")
    assert tree["counter"].n == 3


def test_dcp_style_caller_reads_its_own_dict(tmp_path: Path) -> None:
    """The pattern every DCP user writes: load, then read the same dict."""
    model = torch.nn.Linear(2, 2)
    treeckpt.save({"model": model, "step": 41, "lr": 3e-4}, tmp_path / "c")
    state = {"model": torch.nn.Linear(2, 2), "step": 0, "lr": 1e-3}
    treeckpt.load(state, tmp_path / "c")
    assert state["step"] == 41 and state["lr"] == 3e-4
    assert torch.equal(state["model"].weight, model.weight)


def test_immutable_root_is_returned_new(tmp_path: Path) -> None:
    treeckpt.save((1, {"x": 2}, torch.ones(2)), tmp_path / "c")
    inner: dict[str, int] = {"x": 0}
    t = torch.zeros(2)
    tree = (0, inner, t)
    out = treeckpt.load(tree, tmp_path / "c")
    assert out == (1, {"x": 2}, t) and out is not tree
    assert out[1] is inner and inner == {"x": 2} and out[2] is t and torch.equal(t, torch.ones(2))


def test_nothing_changes_when_the_template_does_not_match(tmp_path: Path) -> None:
    treeckpt.save({"step": 5, "w": torch.ones(2), "extra": 1}, tmp_path / "c")
    tree = {"step": 0, "w": torch.zeros(2)}
    with pytest.raises(LoadMismatchError, match=r"not in template \(1\): extra"):
        treeckpt.load(tree, tmp_path / "c")
    assert tree["step"] == 0 and torch.equal(tree["w"], torch.zeros(2))


# ---------------------------------------------------------------- meta tensors


def test_save_refuses_a_meta_tensor_before_writing(tmp_path: Path) -> None:
    treeckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    before = sorted(os.listdir(tmp_path / "c"))
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(
        UnsupportedLeafError,
        match=r"^'model\.weight': a tensor on the meta device holds no data to save; "
        r"materialise it first",
    ):
        treeckpt.save({"model": model}, tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == before
    assert torch.equal(treeckpt.restore(tmp_path / "c")["w"], torch.ones(2))


def test_load_refuses_a_meta_template_listing_every_fqn(tmp_path: Path) -> None:
    src = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    treeckpt.save({"model": src, "w": torch.ones(2), "step": 7}, tmp_path / "c")
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    tree = {"model": model, "w": torch.zeros(2), "step": 0}
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load(tree, tmp_path / "c")
    assert [m.split(" ")[0] for m in info.value.mismatched] == [
        "model.0.weight",
        "model.0.bias",
        "model.1.weight",
        "model.1.bias",
    ]
    assert all("template tensor is on the meta device" in m for m in info.value.mismatched)
    assert "strict=False" not in str(info.value)
    assert torch.equal(tree["w"], torch.zeros(2)) and tree["step"] == 0


def _save_meta_on_rank_1(rank: int, world: int, path: str) -> str:
    w = torch.empty(4, device="meta") if rank == 1 else torch.ones(4)
    try:
        treeckpt.save({"w": w}, path)
    except RankFailureError as exc:
        return str(exc)
    return "saved"


def test_meta_tensor_on_one_rank_names_rank_and_fqn(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    got = run_ranks(2, _save_meta_on_rank_1, tmp_path, path)
    assert got[0] == got[1]
    assert got[0].startswith("describe failed on rank(s) 1: rank 1: UnsupportedLeafError: 'w': ")
    assert not os.path.exists(os.path.join(path, "manifest.json"))

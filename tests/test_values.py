"""Typed values, defaultdict factories, nn.Parameter and requires_grad through save/restore/load.

Exact or refused: every value comes back with the same type and bits (enum
members in the template's own type on ``load``), or the save refuses it
naming the FQN.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import enum
import json
import pathlib
import struct
import zoneinfo
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import treeckpt
from treeckpt.core.values import canonical, encode_value
from treeckpt.errors import LoadMismatchError, UnsupportedLeafError
from treeckpt.store import layout
from treeckpt.tools.diff import diff


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


def config() -> dict[str, Any]:
    """A config dict with every kind of typed value."""
    return {
        "counter": collections.Counter({"a": 2, (1, 2): 1}),
        "set": {3, "x", (1, b"y")},
        "frozenset": frozenset({1.5, -0.0}),
        "dtype": torch.bfloat16,
        "size": torch.Size([4, 0, 2]),
        "device": torch.device("cuda", 3),
        "pure_posix": pathlib.PurePosixPath("/data/x"),
        "pure_windows": pathlib.PureWindowsPath("C:\\data\\x"),
        "path": pathlib.Path("runs/1"),
        "when": dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        "when_offset": dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5), "X")),
        "day": dt.date(2024, 2, 29),
        "clock": dt.time(12, 0, 1, 5, tzinfo=dt.timezone.utc),
        "span": dt.timedelta(days=-1, seconds=5),
        "z": complex(struct.unpack(">d", bytes.fromhex("7ff8000000000abc"))[0], -0.0),
        "args": argparse.Namespace(lr=0.1, scale=torch.ones(2), mode=Mode.EVAL),
        "mode": Mode.TRAIN,
        "level": Level.HIGH,
        "modes": {Mode.TRAIN, Mode.EVAL},
        "np_str": np.str_("r\u00e9sum\u00e9"),
        "np_bytes": np.bytes_(b"\x01\x02"),
        "np_when": np.datetime64("2024-01-01T00:00:00.123", "ms"),
        "np_span": np.timedelta64(90, "10s"),
        "np_nat": np.datetime64("NaT"),
    }


def _key(v: Any) -> str:
    return canonical(encode_value(v))


def _check_exact(expected: Any, got: Any, path: str, *, template_enums: bool) -> None:
    if isinstance(expected, enum.Enum):
        if template_enums:
            assert got is expected, path
        else:
            assert type(got).__name__ == type(expected).__name__, path
            assert got.name == expected.name and _key(got.value) == _key(expected.value), path
        return
    if isinstance(expected, torch.Tensor):
        assert type(got) is type(expected) and torch.equal(got, expected), path
        return
    if isinstance(expected, argparse.Namespace):
        assert type(got) is argparse.Namespace and list(vars(got)) == list(vars(expected)), path
        for k, v in vars(expected).items():
            _check_exact(v, getattr(got, k), f"{path}.{k}", template_enums=template_enums)
        return
    if type(expected) is dict:
        assert type(got) is dict and list(got) == list(expected), path
        for k, v in expected.items():
            _check_exact(v, got[k], f"{path}.{k}", template_enums=template_enums)
        return
    assert type(got) is type(expected), f"{path}: {type(got)} is not {type(expected)}"
    if template_enums or not _holds_enum(expected):
        assert _key(got) == _key(expected), path
        assert got == expected or _key(got) == _key(expected), path


def _holds_enum(v: Any) -> bool:
    return isinstance(v, set | frozenset) and any(isinstance(x, enum.Enum) for x in v)


def test_config_of_every_kind_restores_exactly(tmp_ckpt: str) -> None:
    treeckpt.save({"cfg": config()}, tmp_ckpt)
    out = treeckpt.restore(tmp_ckpt)
    _check_exact(config(), out["cfg"], "cfg", template_enums=False)
    modes = out["cfg"]["modes"]
    assert {m.name for m in modes} == {"TRAIN", "EVAL"}
    # One made-up type per class name: the same type for every member of Mode.
    assert {type(m) for m in modes} == {type(out["cfg"]["mode"])} == {type(out["cfg"]["args"].mode)}
    assert isinstance(out["cfg"]["level"], enum.IntEnum) and out["cfg"]["level"] == 2
    manifest = json.loads((Path(tmp_ckpt) / layout.MANIFEST).read_bytes())
    kinds = {r["kind"] for r in manifest["body"]["leaves"].values()}
    assert {
        "counter",
        "set",
        "frozenset",
        "torch-dtype",
        "torch-size",
        "torch-device",
        "path",
    } <= kinds
    assert "pickle" not in kinds


def test_config_loads_into_a_template_with_its_own_enums(tmp_ckpt: str) -> None:
    treeckpt.save({"cfg": config()}, tmp_ckpt)
    template = {"cfg": {k: None for k in config()}}
    template["cfg"]["args"] = argparse.Namespace(lr=0.0, scale=torch.zeros(2), mode=Mode.TRAIN)
    template["cfg"]["mode"] = Mode.EVAL
    template["cfg"]["level"] = Level.LOW
    template["cfg"]["modes"] = {Mode.EVAL}
    args = template["cfg"]["args"]
    out = treeckpt.load(template, tmp_ckpt)
    assert out is template and out["cfg"]["args"] is args  # in place, the namespace too
    _check_exact(config(), out["cfg"], "cfg", template_enums=True)
    assert out["cfg"]["mode"] is Mode.TRAIN and out["cfg"]["level"] is Level.HIGH
    assert out["cfg"]["modes"] == {Mode.TRAIN, Mode.EVAL}
    assert out["cfg"]["args"].mode is Mode.EVAL


def test_load_refuses_an_enum_the_template_cannot_hold(tmp_ckpt: str) -> None:
    class Mode(enum.Enum):  # the template's type: no EVAL member
        TRAIN = "train"

    class Renamed(enum.Enum):  # the member exists with another value
        TRAIN = "train"
        EVAL = 2

    treeckpt.save({"mode": globals()["Mode"].EVAL, "w": torch.ones(2)}, tmp_ckpt)
    w = torch.zeros(2)
    with pytest.raises(
        LoadMismatchError, match=r"mode \(template enum .*Mode has no member 'EVAL'\)"
    ):
        treeckpt.load({"mode": Mode.TRAIN, "w": w}, tmp_ckpt)
    assert torch.equal(w, torch.zeros(2))  # refused before any byte of the template changed
    with pytest.raises(
        LoadMismatchError,
        match=r"mode \(template .*Renamed\.EVAL = 2, checkpoint Mode\.EVAL = 'eval'\)",
    ):
        treeckpt.load({"mode": Renamed.TRAIN, "w": w}, tmp_ckpt)


def test_restored_values_are_fresh_copies(tmp_ckpt: str) -> None:
    treeckpt.save({"s": {1, 2}, "c": collections.Counter(a=1)}, tmp_ckpt)
    with treeckpt.open(tmp_ckpt) as ckpt:
        a, b = ckpt["s"], ckpt["s"]
        assert a == b == {1, 2} and a is not b


# ------------------------------------------------------------ real state dicts


def test_multisteplr_state_round_trips(tmp_ckpt: str) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 80, 80], gamma=0.1)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert type(state["milestones"]) is collections.Counter
    treeckpt.save({"sched": sched}, tmp_ckpt)
    restored = treeckpt.restore(tmp_ckpt)["sched"]
    assert type(restored["milestones"]) is collections.Counter
    assert restored == state and list(restored["milestones"].items()) == [(30, 1), (80, 2)]

    opt2 = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[1])
    treeckpt.load({"sched": sched2}, tmp_ckpt)
    assert sched2.state_dict() == state
    assert type(sched2.milestones) is collections.Counter


def test_dtype_in_a_state_dict_round_trips(tmp_ckpt: str) -> None:
    state = {"param_groups": [{"lr": 0.1, "momentum_dtype": torch.bfloat16}], "step": 3}
    treeckpt.save(state, tmp_ckpt)
    assert treeckpt.restore(tmp_ckpt)["param_groups"][0]["momentum_dtype"] is torch.bfloat16
    template = {"param_groups": [{"lr": 0.0, "momentum_dtype": torch.float32}], "step": 0}
    assert treeckpt.load(template, tmp_ckpt)["param_groups"][0]["momentum_dtype"] is torch.bfloat16


def test_values_show_in_metadata_and_diff(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    treeckpt.save({"cfg": config()}, a)
    changed = config()
    changed["modes"] = {Mode.TRAIN}
    treeckpt.save({"cfg": changed}, b)
    info = treeckpt.metadata(a)
    assert info.values["cfg.dtype"] is torch.bfloat16
    assert "cfg.counter = Counter(" in str(info)
    report = diff(a, b)
    status = {e.fqn: e.status for e in report.entries}
    assert status["cfg.modes"] == "different"
    # Enum members of two checkpoints (two made-up types) compare by class and member name.
    assert status["cfg.mode"] == status["cfg.counter"] == status["cfg.z"] == "same"
    with treeckpt.open(a) as ckpt:
        assert "dtype = torch.bfloat16" in repr(ckpt["cfg"])


# ---------------------------------------------------------------- defaultdicts


def test_defaultdicts_with_builtin_factories_round_trip(tmp_ckpt: str) -> None:
    tree = {
        name: collections.defaultdict(f, {"k": 1})
        for name, f in [("list", list), ("int", int), ("none", None), ("tuple", tuple)]
    }
    treeckpt.save(tree, tmp_ckpt)
    out = treeckpt.restore(tmp_ckpt)
    for name, dd in tree.items():
        assert type(out[name]) is collections.defaultdict
        assert out[name].default_factory is dd.default_factory and out[name] == dd


def _user_factory() -> int:
    return 0


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize(
    ("factory", "name"), [(lambda: 0, "<lambda>"), (_user_factory, "_user_factory")]
)
def test_defaultdicts_with_other_factories_are_refused(
    tmp_ckpt: str, factory: Any, name: str, allow_pickle: bool
) -> None:
    treeckpt.save({"x": 1}, tmp_ckpt)
    tree = {"opt": {"state": collections.defaultdict(factory, {"k": torch.ones(2)})}}
    with pytest.raises(
        UnsupportedLeafError,
        match=rf"'opt\.state': the factory {name} of a defaultdict cannot be stored \(only list, "
        r"dict, set, int, float, str, bool, tuple or None can\); convert it to a dict",
    ):
        treeckpt.save(tree, tmp_ckpt, allow_pickle=allow_pickle)
    assert treeckpt.restore(tmp_ckpt) == {"x": 1}  # the previous checkpoint is untouched
    assert len([p for p in Path(tmp_ckpt).iterdir() if p.name.startswith("data-")]) == 1


def test_load_keeps_the_templates_defaultdict(tmp_ckpt: str) -> None:
    treeckpt.save({"d": {"k": torch.ones(2), "n": 3}}, tmp_ckpt)
    factory = lambda: -1  # noqa: E731
    template = {"d": collections.defaultdict(factory, {"k": torch.zeros(2), "n": 0})}
    out = treeckpt.load(template, tmp_ckpt)
    assert type(out["d"]) is collections.defaultdict and out["d"].default_factory is factory
    assert out["d"]["n"] == 3 and torch.equal(out["d"]["k"], torch.ones(2))


# ------------------------------------------------------- parameters and grads


def test_parameters_and_requires_grad_round_trip(tmp_ckpt: str) -> None:
    tree = {
        "param": torch.nn.Parameter(torch.arange(3.0)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "leaf": torch.arange(2.0).requires_grad_(),
        "plain": torch.arange(2.0),
        "model": torch.nn.Linear(2, 1),
    }
    treeckpt.save(tree, tmp_ckpt)
    out = treeckpt.restore(tmp_ckpt)
    assert type(out["param"]) is torch.nn.Parameter and out["param"].requires_grad
    assert type(out["frozen"]) is torch.nn.Parameter and not out["frozen"].requires_grad
    assert type(out["leaf"]) is torch.Tensor and out["leaf"].requires_grad
    assert out["leaf"].is_leaf and out["leaf"].grad_fn is None
    assert type(out["plain"]) is torch.Tensor and not out["plain"].requires_grad
    # A module's state_dict holds detached tensors: they come back as they were given.
    assert type(out["model"]["weight"]) is torch.Tensor
    for k in ("param", "frozen", "leaf", "plain"):
        assert torch.equal(out[k].detach(), tree[k].detach())
    leaves = json.loads((Path(tmp_ckpt) / layout.MANIFEST).read_bytes())["body"]["leaves"]
    assert leaves["param"] == {
        "kind": "tensor",
        "lib": "torch",
        "dtype": "float32",
        "shape": [3],
        "requires_grad": True,
        "parameter": True,
    }
    assert "requires_grad" not in leaves["plain"] and "parameter" not in leaves["plain"]


def test_load_fills_the_templates_own_tensors(tmp_ckpt: str) -> None:
    treeckpt.save({"p": torch.nn.Parameter(torch.ones(2)), "t": torch.ones(2)}, tmp_ckpt)
    p, t = torch.nn.Parameter(torch.zeros(2)), torch.zeros(2)
    out = treeckpt.load({"p": p, "t": t}, tmp_ckpt)
    assert out["p"] is p and out["t"] is t and not t.requires_grad
    assert torch.equal(p.detach(), torch.ones(2)) and p.grad is None


def test_async_save_snapshots_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sets and Counters are copied when async_save returns: later changes are not saved."""
    import threading

    from treeckpt.shell import save as save_mod

    changed = threading.Event()
    real = save_mod._write_rank

    def write_after_change(*args: Any, **kwargs: Any) -> Any:
        changed.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(save_mod, "_write_rank", write_after_change)
    tree = {"milestones": collections.Counter({30: 1}), "seen": {1}, "w": torch.ones(2)}
    fut = treeckpt.async_save(tree, tmp_path / "ck")
    tree["milestones"][80] += 1
    tree["seen"].add(2)
    changed.set()
    fut.result(timeout=60)
    back = treeckpt.restore(tmp_path / "ck")
    assert back["milestones"] == collections.Counter({30: 1}) and back["seen"] == {1}


def test_enums_inside_a_stateful_come_back_in_its_own_types(tmp_path: Path) -> None:
    """A Stateful's current state is the template of its values: its own enum types."""

    class Phase(enum.Enum):
        WARMUP = 1
        DECAY = 2

    class Schedule:
        def __init__(self, phase: Phase) -> None:
            self.phase = phase

        def state_dict(self) -> dict[str, Any]:
            return {"phase": self.phase}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            self.phase = sd["phase"]

    treeckpt.save({"sched": Schedule(Phase.DECAY)}, tmp_path / "c")
    sched = Schedule(Phase.WARMUP)
    treeckpt.load({"sched": sched}, tmp_path / "c")
    assert sched.phase is Phase.DECAY

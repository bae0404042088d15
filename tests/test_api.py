"""The public API end to end: save, load, restore, metadata.

Every comparison is bit-exact: tensors and arrays are compared as raw bytes
(NaN payloads, -0.0 and non-canonical encodings included), floats by their
IEEE-754 bits, containers by type, key order and key types.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
import math
import os
import pickle
import pkgutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pytest
import torch

import treeckpt
import treeckpt.api as api
from treeckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    Compression,
    FQNCollisionError,
    IncompleteCheckpointError,
    LoadMismatchError,
    SaveOptions,
    UnsupportedLeafError,
)
from treeckpt.core.dtypes import DTYPES, torch_dtype
from treeckpt.store.backends import open_backend
from treeckpt.testing.faults import FaultyBackend

COMPLEX_HALF_WARNING = "ignore:ComplexHalf support is experimental"


def _torch_codes() -> list[str]:
    codes = []
    for code in DTYPES:
        try:
            torch_dtype(code)
        except KeyError:
            continue
        codes.append(code)
    return codes


TORCH_CODES = _torch_codes()
NUMPY_CODES = [c for c, info in DTYPES.items() if info.numpy is not None]


# ------------------------------------------------------------------ helpers


def raw_bytes(x: Any) -> bytes:
    """The bytes of a tensor, array or numpy scalar in logical row-major order."""
    if isinstance(x, torch.Tensor):
        t = x.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def float_bits(v: float) -> bytes:
    return struct.pack(">d", v)


def assert_same(expected: Any, got: Any, path: str = "<root>", *, exact_types: bool = True) -> None:
    """Bit-exact, structure-exact comparison.

    ``exact_types=False`` accepts namedtuple and dataclass types of the same
    name and fields (what ``restore`` builds with no template).
    """
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got)} is not a tensor"
        assert got.dtype == expected.dtype, f"{path}: dtype {got.dtype} != {expected.dtype}"
        assert got.shape == expected.shape, f"{path}: shape {got.shape} != {expected.shape}"
        assert torch.equal(u8(got), u8(expected)), f"{path}: bytes differ"
        return
    if isinstance(expected, np.ndarray):
        assert type(got) is np.ndarray, f"{path}: {type(got)} is not an ndarray"
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        assert raw_bytes(got) == raw_bytes(expected), f"{path}: bytes differ"
        return
    if isinstance(expected, np.generic):
        assert type(got) is type(expected), f"{path}: {type(got)} != {type(expected)}"
        assert raw_bytes(got) == raw_bytes(expected), f"{path}: bytes differ"
        return
    if isinstance(expected, float):
        assert type(got) is float and float_bits(got) == float_bits(expected), path
        return
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        assert dataclasses.is_dataclass(got), path
        if exact_types:
            assert type(got) is type(expected), path
        assert type(got).__name__ == type(expected).__name__, path
        names = [f.name for f in dataclasses.fields(expected)]
        assert [f.name for f in dataclasses.fields(got)] == names, path
        for n in names:
            assert_same(
                getattr(expected, n), getattr(got, n), f"{path}.{n}", exact_types=exact_types
            )
        return
    if isinstance(expected, tuple) and hasattr(type(expected), "_fields"):
        assert isinstance(got, tuple) and hasattr(type(got), "_fields"), f"{path}: not a namedtuple"
        if exact_types:
            assert type(got) is type(expected), path
        assert type(got).__name__ == type(expected).__name__, path
        assert got._fields == expected._fields, path
        for n, a, b in zip(expected._fields, expected, got, strict=True):
            assert_same(a, b, f"{path}.{n}", exact_types=exact_types)
        return
    assert type(got) is type(expected), f"{path}: {type(got)} != {type(expected)}"
    if isinstance(expected, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in expected], f"{path}: keys"
        if isinstance(expected, collections.defaultdict):
            assert got.default_factory is expected.default_factory, path
        for k in expected:
            assert_same(expected[k], got[k], f"{path}.{k}", exact_types=exact_types)
        return
    if isinstance(expected, list | tuple | collections.deque):
        assert len(got) == len(expected), f"{path}: length"
        for n, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_same(a, b, f"{path}.{n}", exact_types=exact_types)
        return
    assert got == expected, f"{path}: {got!r} != {expected!r}"


def random_tensor(code: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``code`` with random bits (NaN payloads and all), or 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    dt = torch_dtype(code)
    n = math.prod(shape)
    if dt == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).bool().reshape(shape)
    k = DTYPES[code].itemsize
    raw = torch.randint(0, 256, (n * k,), generator=g, dtype=torch.uint8)
    return raw.view(dt).reshape(shape)


def random_array(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(DTYPES[code].numpy)
    n = math.prod(shape)
    if dt == np.bool_:
        return rng.integers(0, 2, n).astype(np.bool_).reshape(shape)
    return rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8).view(dt).reshape(shape)


def zeros_like_tree(tree: Any) -> Any:
    """A template of the same structure with zeroed tensors (same strides pattern not kept)."""
    if isinstance(tree, torch.Tensor):
        return torch.zeros(tree.shape, dtype=tree.dtype)
    if isinstance(tree, np.ndarray):
        return np.zeros(tree.shape, dtype=tree.dtype)
    if isinstance(tree, dict):
        return {k: zeros_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [zeros_like_tree(v) for v in tree]
    return tree


def snapshot(tree: Any) -> Any:
    """A deep, bit-exact copy of the tensors of a tree (for 'unchanged' checks)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [snapshot(v) for v in tree]
    return tree


def data_dirs(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("data-"))


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"treeckpt-api-{uuid.uuid4().hex}"
    yield f"memory://{name}/ckpt"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


# ------------------------------------------------------------------ dtypes


@pytest.mark.filterwarnings(COMPLEX_HALF_WARNING)
@pytest.mark.parametrize("code", TORCH_CODES)
def test_every_torch_dtype_round_trips(code: str, tmp_ckpt: str) -> None:
    big = random_tensor(code, (6, 8), seed=1)
    tree = {
        "plain": random_tensor(code, (3, 5), seed=2),
        "scalar": random_tensor(code, (), seed=3),
        "empty": random_tensor(code, (0, 4)),
        "empty_mid": random_tensor(code, (2, 0, 3)),
        "transposed": big.t(),
        "strided": big[::2, 1::3],
        "row": big[1],
        "expanded": random_tensor(code, (1, 3), seed=4).expand(4, 3),
        "one_elem": random_tensor(code, (1, 1, 1), seed=5),
    }
    assert not tree["transposed"].is_contiguous() and not tree["strided"].is_contiguous()
    treeckpt.save(tree, tmp_ckpt)
    assert_same(tree, treeckpt.restore(tmp_ckpt))
    template = zeros_like_tree(tree)
    out = treeckpt.load(template, tmp_ckpt)
    assert_same(tree, out)
    for k in tree:
        assert out[k] is template[k]  # filled in place
    # non-contiguous templates are filled in place too
    big2 = torch.zeros(6, 8, dtype=big.dtype)
    t2 = {
        **zeros_like_tree(tree),
        "transposed": big2.t(),
        "strided": torch.zeros(6, 8, dtype=big.dtype)[::2, 1::3],
    }
    out2 = treeckpt.load(t2, tmp_ckpt)
    assert_same(tree, out2)
    assert torch.equal(u8(big2.t()), u8(tree["transposed"]))
    info = treeckpt.metadata(tmp_ckpt)
    assert info.tensors["plain"].dtype == code
    assert info.tensors["plain"].raw_bytes == 15 * DTYPES[code].itemsize


def test_float_special_values_bit_exact(tmp_ckpt: str) -> None:
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 1.7976931348623157e308]
    nan_payloads = [0x7FF0000000000001, 0x7FF8DEADBEEF0001, 0xFFF0000000000ABC, 0xFFFFFFFFFFFFFFFF]
    f64 = torch.tensor(specials, dtype=torch.float64)
    f64 = torch.cat([f64, torch.tensor(nan_payloads, dtype=torch.uint64).view(torch.float64)])
    f32 = torch.tensor([0x7FC00001, 0xFF800001, 0x80000000, 0x00000001], dtype=torch.int64)
    f32 = f32.to(torch.int32).view(torch.float32)
    bf16 = torch.tensor([0x7FC1, 0xFF81, 0x8000, 0x0001], dtype=torch.int32)
    bf16 = bf16.to(torch.uint16).view(torch.bfloat16)
    tree = {"f64": f64, "f32": f32, "bf16": bf16}
    for mode in ("never", "always"):
        treeckpt.save(tree, tmp_ckpt, options=SaveOptions(compression=Compression(mode=mode)))
        assert_same(tree, treeckpt.restore(tmp_ckpt))
        assert_same(tree, treeckpt.load(zeros_like_tree(tree), tmp_ckpt))


def test_views_sharing_storage(tmp_ckpt: str) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tree = {"base": base, "row": base[1], "col": base[:, 2], "t": base.t(), "flat": base.view(-1)}
    treeckpt.save(tree, tmp_ckpt)
    back = treeckpt.restore(tmp_ckpt)
    assert_same(tree, back)
    # a template made of views of one storage is filled consistently
    tbase = torch.zeros(4, 6)
    template = {
        "base": tbase,
        "row": tbase[1],
        "col": tbase[:, 2],
        "t": tbase.t(),
        "flat": tbase.view(-1),
    }
    out = treeckpt.load(template, tmp_ckpt)
    assert_same(tree, out)
    assert torch.equal(tbase, base)


def test_parameters_and_requires_grad(tmp_ckpt: str) -> None:
    p = torch.nn.Parameter(torch.randn(3, 4))
    tree = {"p": p, "grad_leaf": torch.randn(2, requires_grad=True)}
    treeckpt.save(tree, tmp_ckpt)
    back = treeckpt.restore(tmp_ckpt)
    assert_same(p.detach(), back["p"].detach())
    tp = torch.nn.Parameter(torch.zeros(3, 4))
    t2 = torch.zeros(2, requires_grad=True)
    out = treeckpt.load({"p": tp, "grad_leaf": t2}, tmp_ckpt)
    assert out["p"] is tp and isinstance(out["p"], torch.nn.Parameter)
    assert tp.requires_grad and tp.grad is None
    assert torch.equal(u8(tp), u8(p))
    assert torch.equal(u8(t2), u8(tree["grad_leaf"]))


def test_conjugate_and_negative_views(tmp_ckpt: str) -> None:
    z = torch.complex(torch.randn(5), torch.randn(5))
    conj = z.conj()
    assert conj.is_conj()
    neg = torch._neg_view(torch.randn(4))
    assert neg.is_neg()
    tree = {"conj": conj, "conj128": z.to(torch.complex128).conj(), "neg": neg}
    treeckpt.save(tree, tmp_ckpt)
    back = treeckpt.restore(tmp_ckpt)
    assert_same(tree, back)
    assert torch.equal(back["conj"], z.conj_physical())
    # loading into a template that carries the conj bit writes through it correctly
    tz = torch.zeros(5, dtype=torch.complex64)
    template = {
        "conj": tz.conj(),
        "conj128": torch.zeros(5, dtype=torch.complex128),
        "neg": torch.zeros(4),
    }
    out = treeckpt.load(template, tmp_ckpt)
    assert torch.equal(out["conj"], conj)
    assert torch.equal(tz, z)


@pytest.mark.parametrize("code", NUMPY_CODES)
def test_every_numpy_dtype_round_trips(code: str, tmp_ckpt: str) -> None:
    big = random_array(code, (6, 8), seed=1)
    scalar = random_array(code, (1,), seed=7)[0]
    assert isinstance(scalar, np.generic)
    tree = {
        "plain": random_array(code, (3, 5), seed=2),
        "zero_d": random_array(code, (), seed=3),
        "empty": random_array(code, (0, 4)),
        "transposed": big.T,
        "strided": big[::2, 1::3],
        "fortran": np.asfortranarray(random_array(code, (3, 4), seed=4)),
        "scalar": scalar,
    }
    assert not tree["transposed"].flags.c_contiguous
    treeckpt.save(tree, tmp_ckpt)
    assert_same(tree, treeckpt.restore(tmp_ckpt))
    template: dict[str, Any] = zeros_like_tree(tree)
    template["scalar"] = np.zeros((), dtype=scalar.dtype)[()]
    template["fortran"] = np.asfortranarray(np.zeros((3, 4), dtype=big.dtype))
    template["strided"] = np.zeros((6, 8), dtype=big.dtype)[::2, 1::3]
    out = treeckpt.load(template, tmp_ckpt)
    assert_same(tree, out)
    assert out["plain"] is template["plain"]
    assert out["fortran"] is template["fortran"] and out["strided"] is template["strided"]


def test_numpy_and_torch_do_not_mix(tmp_ckpt: str) -> None:
    tree = {"np": np.arange(4, dtype=np.float32), "pt": torch.arange(4, dtype=torch.float32)}
    treeckpt.save(tree, tmp_ckpt)
    back = treeckpt.restore(tmp_ckpt)
    assert type(back["np"]) is np.ndarray and isinstance(back["pt"], torch.Tensor)
    info = treeckpt.metadata(tmp_ckpt)
    assert info.tensors["np"].lib == "numpy" and info.tensors["pt"].lib == "torch"


def test_unsupported_dtypes_and_layouts_refused(tmp_ckpt: str) -> None:
    cases = {
        "big_endian": np.arange(3, dtype=">f4"),
        "strings": np.array(["a", "b"]),
        "objects": np.array([object()], dtype=object),
        "sparse": torch.eye(3).to_sparse(),
    }
    for name, leaf in cases.items():
        with pytest.raises(UnsupportedLeafError, match=name):
            treeckpt.save({"x": {name: leaf}}, tmp_ckpt)
    assert not os.path.exists(os.path.join(tmp_ckpt, "manifest.json"))


# ------------------------------------------------------------------ values


NAN_PAYLOAD = struct.unpack(">d", bytes.fromhex("7ff80000deadbeef"))[0]
NEG_NAN = struct.unpack(">d", bytes.fromhex("fff8000000000001"))[0]

VALUES: dict[str, Any] = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "neg": -7,
    "big": 2**200,
    "negbig": -(2**200) + 3,
    "huge": 10**4000,
    "float": 0.1,
    "negzero": -0.0,
    "inf": math.inf,
    "ninf": -math.inf,
    "nan": math.nan,
    "nan_payload": NAN_PAYLOAD,
    "neg_nan": NEG_NAN,
    "tiny": 5e-324,
    "empty_str": "",
    "unicode": "h\u00e9llo w\u00f6rld \u2603 \U0001f600 \u4e2d\u6587 \u202e rtl",
    "nul": "a\x00b",
    "lone_surrogate": "x\ud800y\udfffz",
    "newline": 'line1\nline2\t"quoted"\\',
    "empty_bytes": b"",
    "bytes": bytes(range(256)),
}


def test_typed_values_round_trip(tmp_ckpt: str) -> None:
    treeckpt.save({"v": VALUES}, tmp_ckpt)
    assert_same({"v": VALUES}, treeckpt.restore(tmp_ckpt))
    # values come from the checkpoint into the returned tree of a load
    template = {"v": {k: None for k in VALUES}}
    out = treeckpt.load(template, tmp_ckpt)
    assert_same({"v": VALUES}, out)
    info = treeckpt.metadata(tmp_ckpt)
    assert info.values["v.big"] == 2**200
    assert float_bits(info.values["v.nan_payload"]) == float_bits(NAN_PAYLOAD)


def test_value_subclasses_are_not_silently_flattened(tmp_ckpt: str) -> None:
    class Level(int):  # an int subclass (not an enum: those are stored typed)
        pass

    with pytest.raises(UnsupportedLeafError, match=r"'color': cannot store a .*Level"):
        treeckpt.save({"color": Level(1)}, tmp_ckpt)


def test_int_too_large_for_the_format_is_refused_naming_fqn(
    tmp_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader accepts ints of at most 4300 digits, so a save must never commit a larger one,
    even where this interpreter's own limit was lifted (or the checkpoint would not load)."""
    import sys

    for limit in (4300, 0):
        old = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(limit)
        try:
            with pytest.raises(UnsupportedLeafError, match=r"'x\.too_big'"):
                treeckpt.save({"x": {"too_big": 10**4300}, "t": torch.ones(3)}, tmp_ckpt)
        finally:
            sys.set_int_max_str_digits(old)
        assert not os.path.exists(os.path.join(tmp_ckpt, "manifest.json"))
        assert data_dirs(tmp_ckpt) == []
    edge = -(10**4300 - 1)  # 4300 digits: the largest that fits
    treeckpt.save({"x": edge}, tmp_ckpt)
    assert treeckpt.restore(tmp_ckpt)["x"] == edge


def test_int_too_large_is_refused_before_any_data_is_written(
    tmp_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fb = FaultyBackend(open_backend(tmp_ckpt))
    monkeypatch.setattr(api, "_backend", lambda path: fb)
    with pytest.raises(UnsupportedLeafError, match="'too_big'"):
        treeckpt.save({"too_big": 10**5000, "t": torch.ones(3)}, tmp_ckpt)
    assert not [c for c in fb.calls if c.op == "open_writer"], fb.mutating_ops


# -------------------------------------------------------------- containers


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass
class Config:
    name: str
    weights: Any
    extra: Any = None


def _nested() -> Any:
    dd_list: collections.defaultdict[str, Any] = collections.defaultdict(list)
    dd_list["a"] = [1, 2]
    dd_int: collections.defaultdict[int, Any] = collections.defaultdict(int)
    dd_int[3] = torch.arange(3)
    return {
        "str_keys": {"b": 1, "a": 2, "": 3, "with space": 4},
        "int_keys": {3: "three", -1: "minus one", 0: torch.zeros(2), 2**70: "big key"},
        "mixed_keys": {1: "int", "x": "str"},
        "list": [1, [2, [3, []]], ()],
        "tuple": (torch.ones(2), "a", (None,)),
        "namedtuple": Point(x=torch.arange(3), y=Point(x=1, y=(2, 3))),
        "odict": collections.OrderedDict([("z", 1), ("a", torch.ones(1))]),
        "ddict": dd_list,
        "ddict_int": dd_int,
        "dataclass": Config(name="cfg", weights=torch.randn(2, 2), extra={"k": [1.5]}),
        "deque": collections.deque([1, torch.zeros(1)], maxlen=5),
        "empty_dict": {},
        "empty_list": [],
        "empty_tuple": (),
        "empty_odict": collections.OrderedDict(),
        "empty_nt": Point(x=(), y={}),
        "deep": {"a": {"b": {"c": {"d": {"e": [[[torch.tensor(1.5)]]]}}}}},
        "unicode_key_\u00e9\u2603": 1,
    }


def test_nested_containers_restore_identical_structure(tmp_ckpt: str) -> None:
    tree = _nested()
    treeckpt.save(tree, tmp_ckpt)
    back = treeckpt.restore(tmp_ckpt)
    assert_same(tree, back, exact_types=False)
    assert type(back["namedtuple"]).__name__ == "Point"
    assert back["namedtuple"]._fields == ("x", "y")
    assert (
        dataclasses.is_dataclass(back["dataclass"]) and type(back["dataclass"]).__name__ == "Config"
    )
    # a template of the real types gets the real types back
    out = treeckpt.load(_nested(), tmp_ckpt)
    assert_same(tree, out)


def test_top_level_leaf_and_top_level_list(tmp_ckpt: str, tmp_path: Path) -> None:
    t = torch.arange(5)
    treeckpt.save(t, tmp_ckpt)
    assert_same(t, treeckpt.restore(tmp_ckpt))
    other = str(tmp_path / "other")
    treeckpt.save([t, 1, "x"], other)
    assert_same([t, 1, "x"], treeckpt.restore(other))


def test_fqn_collision_refused(tmp_ckpt: str) -> None:
    with pytest.raises(FQNCollisionError, match=r"'a\.b'"):
        treeckpt.save({"a.b": 1, "a": {"b": 2}}, tmp_ckpt)
    with pytest.raises(FQNCollisionError, match="'1'"):
        treeckpt.save({1: torch.ones(1), "1": torch.zeros(1)}, tmp_ckpt)
    assert not os.path.exists(os.path.join(tmp_ckpt, "manifest.json"))


def test_unsupported_keys_and_leaves_name_the_fqn(tmp_ckpt: str) -> None:
    with pytest.raises(UnsupportedLeafError, match=r"'outer'.*tuple"):
        treeckpt.save({"outer": {(1, 2): 3}}, tmp_ckpt)

    class Opaque:
        pass

    with pytest.raises(UnsupportedLeafError, match=r"'model\.cfg\.thing'.*Opaque"):
        treeckpt.save({"model": {"cfg": {"thing": Opaque()}}}, tmp_ckpt)
    with pytest.raises(UnsupportedLeafError, match=r"'s': cannot store a .*Opaque: the elements"):
        treeckpt.save({"s": {1, Opaque()}}, tmp_ckpt)
    assert not os.path.exists(tmp_ckpt) or data_dirs(tmp_ckpt) == []


# ------------------------------------------------------------ training state


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    y = torch.randn(32, 4, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sched.step()


def _make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def test_training_resumes_bit_exactly(tmp_ckpt: str) -> None:
    model, opt, sched = _make(0)
    for step in range(3):
        _train_step(model, opt, sched, step)
    treeckpt.save({"model": model, "optim": opt, "sched": sched, "step": 3}, tmp_ckpt)
    _train_step(model, opt, sched, 3)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _make(1)  # different init, optimizer with no state yet
    assert not opt2.state
    state = treeckpt.load({"model": model2, "optim": opt2, "sched": sched2, "step": 0}, tmp_ckpt)
    assert state["step"] == 3
    assert state["model"] is model2 and state["optim"] is opt2 and state["sched"] is sched2
    assert sched2.last_epoch == 3
    assert opt2.state_dict()["param_groups"][0]["lr"] == pytest.approx(5e-3)
    assert len(opt2.state) == len(list(model2.parameters()))
    _train_step(model2, opt2, sched2, 3)
    for k, v in model2.state_dict().items():
        assert torch.equal(u8(v), u8(expected[k])), k
    assert sched2.get_last_lr() == sched.get_last_lr()
    for (_, s1), (_, s2) in zip(opt.state.items(), opt2.state.items(), strict=True):
        for key in s1:
            assert torch.equal(u8(s1[key]), u8(s2[key])), key


def test_restore_training_state_gives_state_dicts(tmp_ckpt: str) -> None:
    model, opt, sched = _make(0)
    _train_step(model, opt, sched, 0)
    treeckpt.save({"model": model, "optim": opt}, tmp_ckpt)
    back = treeckpt.restore(tmp_ckpt)
    assert_same(model.state_dict(), back["model"], exact_types=False)
    sd = opt.state_dict()
    assert back["optim"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert back["optim"]["param_groups"][0]["params"] == sd["param_groups"][0]["params"]
    assert_same(sd["state"], back["optim"]["state"])


class Counter:
    """A user Stateful object."""

    def __init__(self, n: int = 0) -> None:
        self.n = n
        self.loaded: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "hist": torch.full((3,), self.n)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(state)
        self.n = state["n"]


def test_user_stateful_gets_load_state_dict(tmp_ckpt: str) -> None:
    treeckpt.save({"c": Counter(4), "nested": [Counter(2)]}, tmp_ckpt)
    c, c2 = Counter(), Counter()
    out = treeckpt.load({"c": c, "nested": [c2]}, tmp_ckpt)
    assert out["c"] is c and c.n == 4 and c2.n == 2
    assert torch.equal(c.loaded[0]["hist"], torch.full((3,), 4))


# -------------------------------------------------------------- strictness


def _strict_ckpt(path: str) -> dict[str, Any]:
    tree = {
        "same": torch.arange(6, dtype=torch.float32),
        "only_ckpt": torch.ones(2),
        "shape": torch.ones(2, 3),
        "dtype": torch.ones(4, dtype=torch.float32),
        "value": 7,
    }
    treeckpt.save(tree, path)
    return tree


def _mismatched_template() -> dict[str, Any]:
    return {
        "same": torch.full((6,), -1.0),
        "only_template": torch.full((3,), -2.0),
        "shape": torch.full((3, 2), -3.0),
        "dtype": torch.full((4,), -4.0, dtype=torch.float16),  # float32 -> float16 loses bits
        "value": 0,
    }


def test_strict_load_reports_everything_together_and_changes_nothing(tmp_ckpt: str) -> None:
    _strict_ckpt(tmp_ckpt)
    template = _mismatched_template()
    before = snapshot(template)
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load(template, tmp_ckpt)
    err = info.value
    assert err.missing == ("only_template",)
    assert err.unexpected == ("only_ckpt",)
    assert len(err.mismatched) == 2
    msg = str(err)
    for word in (
        "only_template",
        "only_ckpt",
        "shape",
        "dtype",
        "float16",
        "float32",
        "[3, 2]",
        "[2, 3]",
    ):
        assert word in msg, word
    assert isinstance(err, CheckpointError) and isinstance(err, ValueError)
    assert_same(before, template)


def test_non_strict_loads_the_intersection(tmp_ckpt: str) -> None:
    tree = _strict_ckpt(tmp_ckpt)
    template = {"same": torch.zeros(6), "only_template": torch.full((3,), -2.0), "value": 0}
    out = treeckpt.load(template, tmp_ckpt, strict=False)
    assert torch.equal(out["same"], tree["same"]) and out["same"] is template["same"]
    assert torch.equal(out["only_template"], torch.full((3,), -2.0))
    assert out["value"] == 7
    assert set(out) == set(template)


@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_non_strict_still_refuses_dtype_and_shape_mismatch(tmp_ckpt: str, bad: str) -> None:
    _strict_ckpt(tmp_ckpt)
    template = {"same": torch.zeros(6), bad: _mismatched_template()[bad]}
    before = snapshot(template)
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load(template, tmp_ckpt, strict=False)
    assert info.value.mismatched and bad in info.value.mismatched[0]
    assert not info.value.missing and not info.value.unexpected
    assert_same(before, template)


def test_kind_mismatch_tensor_vs_value(tmp_ckpt: str) -> None:
    treeckpt.save({"a": torch.ones(2), "b": 3}, tmp_ckpt)
    template = {"a": 1, "b": torch.zeros(1)}
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load(template, tmp_ckpt, strict=False)
    assert len(info.value.mismatched) == 2


def test_module_strict_load_mismatch(tmp_ckpt: str) -> None:
    treeckpt.save({"model": _model(0)}, tmp_ckpt)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    before = snapshot(dict(other.state_dict()))
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load({"model": other}, tmp_ckpt)
    assert "model.3.weight" in info.value.unexpected
    assert_same(before, dict(other.state_dict()))


# ---------------------------------------------------------------- chunking


def _chunk_tree(rows: int = 100) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "smooth": torch.linspace(0, 1, rows * 100, dtype=torch.float32).reshape(rows, 100),
        "random": torch.randn(rows // 2, 40, generator=g, dtype=torch.float64),
        "zeros_bf16": torch.zeros(3, 7, 11, dtype=torch.bfloat16),
        "ints": torch.arange(rows * 10, dtype=torch.int64),
        "odd": torch.randint(0, 255, (333,), generator=g, dtype=torch.uint8),
        "np": np.arange(777, dtype=np.int16).reshape(7, 111),
    }


@pytest.mark.parametrize("compress", ["auto", "always", "never"])
@pytest.mark.parametrize("chunk_bytes", [7, 100, 4096, 1 << 20])
def test_chunked_round_trip(tmp_ckpt: str, compress: str, chunk_bytes: int) -> None:
    tree = _chunk_tree(4 if chunk_bytes < 100 else 100)  # tiny chunks: a small tree
    opts = SaveOptions(
        chunk_bytes=chunk_bytes, compression=Compression(mode=compress), io_threads=3
    )  # type: ignore[arg-type]
    treeckpt.save(tree, tmp_ckpt, options=opts)
    assert_same(tree, treeckpt.restore(tmp_ckpt))
    assert_same(tree, treeckpt.load(zeros_like_tree(tree), tmp_ckpt))
    info = treeckpt.metadata(tmp_ckpt)
    for fqn, t in info.tensors.items():
        itemsize = DTYPES[t.dtype].itemsize
        per_chunk = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
        assert t.chunks >= math.ceil(t.raw_bytes / per_chunk), fqn
        if chunk_bytes >= t.raw_bytes:
            assert t.chunks == 1, fqn
        if compress == "never":
            assert set(t.codecs) == {"raw"}, fqn
    if compress != "never" and chunk_bytes >= 4096:
        assert "planes" in info.tensors["zeros_bf16"].codecs
        assert info.tensors["zeros_bf16"].stored_bytes < info.tensors["zeros_bf16"].raw_bytes
    if compress == "auto":
        # random bytes stay raw; so do random doubles: only their sign-and-exponent
        # planes compress, and the chunk as a whole shrinks less than min_ratio
        assert set(info.tensors["odd"].codecs) == {"raw"}
        assert set(info.tensors["random"].codecs) == {"raw"}


@pytest.mark.parametrize("io_threads", [1, 4])
@pytest.mark.parametrize("load_threads", [1, 4])
def test_io_threads(tmp_ckpt: str, io_threads: int, load_threads: int) -> None:
    tree = _chunk_tree()
    treeckpt.save(tree, tmp_ckpt, options=SaveOptions(chunk_bytes=1000, io_threads=io_threads))
    (d,) = data_dirs(tmp_ckpt)
    bins = [n for n in os.listdir(os.path.join(tmp_ckpt, d)) if n.endswith(".bin")]
    assert len(bins) == io_threads
    lo = treeckpt.LoadOptions(io_threads=load_threads)
    assert_same(tree, treeckpt.restore(tmp_ckpt, options=lo))
    assert_same(tree, treeckpt.load(zeros_like_tree(tree), tmp_ckpt, options=lo))


def test_options_validated() -> None:
    for bad in (
        {"chunk_bytes": 0},
        {"compression": Compression},
        {"io_threads": 0},
    ):
        with pytest.raises(ValueError):
            SaveOptions(**bad)  # type: ignore[arg-type]
    for bad in ({"mode": "maybe"}, {"level": 99}):
        with pytest.raises(ValueError):
            Compression(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        treeckpt.LoadOptions(io_threads=0)


def test_no_fsync_option_still_round_trips(tmp_ckpt: str) -> None:
    tree = _chunk_tree()
    treeckpt.save(
        tree, tmp_ckpt, options=SaveOptions(sync=False, compression=Compression(level=19))
    )
    assert_same(tree, treeckpt.restore(tmp_ckpt))


# --------------------------------------------------------------- overwrite


def test_overwrite_replaces_and_removes_old_data(tmp_ckpt: str) -> None:
    treeckpt.save({"a": torch.zeros(10), "old_only": 1}, tmp_ckpt)
    (old_dir,) = data_dirs(tmp_ckpt)
    old_id = treeckpt.metadata(tmp_ckpt).save_id
    assert old_dir == f"data-{old_id}"
    res = treeckpt.save({"a": torch.ones(10), "b": torch.arange(3)}, tmp_ckpt)
    assert data_dirs(tmp_ckpt) == [f"data-{res.save_id}"]
    assert res.save_id != old_id
    assert sorted(os.listdir(tmp_ckpt)) == sorted(
        [".metadata", "manifest.json", f"data-{res.save_id}"]
    )
    back = treeckpt.restore(tmp_ckpt)
    assert_same({"a": torch.ones(10), "b": torch.arange(3)}, back)
    # overwrite many times: always exactly one data dir
    for n in range(3):
        treeckpt.save({"n": torch.full((5,), n)}, tmp_ckpt)
        assert len(data_dirs(tmp_ckpt)) == 1
    assert torch.equal(treeckpt.restore(tmp_ckpt)["n"], torch.full((5,), 2))


def test_overwrite_over_a_damaged_manifest(tmp_ckpt: str) -> None:
    treeckpt.save({"a": torch.zeros(10)}, tmp_ckpt)
    with open(os.path.join(tmp_ckpt, "manifest.json"), "r+b") as f:
        f.write(b"garbage")
    treeckpt.save({"a": torch.ones(10)}, tmp_ckpt)
    assert torch.equal(treeckpt.restore(tmp_ckpt)["a"], torch.ones(10))


def test_save_result(tmp_ckpt: str) -> None:
    res = treeckpt.save({"a": torch.zeros(10)}, tmp_ckpt)
    assert res.path == os.path.abspath(tmp_ckpt)
    assert len(res.save_id) == 16
    assert "1 tensors" in res.plan.report()


# ------------------------------------------------------------------ pickle


class Custom:
    def __init__(self, v: int) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.v == self.v

    __hash__ = None  # type: ignore[assignment]


def test_unsupported_object_refused_by_default(tmp_ckpt: str) -> None:
    with pytest.raises(UnsupportedLeafError) as info:
        treeckpt.save({"cfg": {"obj": Custom(1)}}, tmp_ckpt)
    assert "'cfg.obj'" in str(info.value) and "Custom" in str(info.value)
    assert "allow_pickle" in str(info.value)
    assert not os.path.exists(os.path.join(tmp_ckpt, "manifest.json"))


def test_pickle_is_opt_in_on_both_sides(tmp_ckpt: str) -> None:
    tree = {"t": torch.arange(4.0), "cfg": {"obj": Custom(5)}}
    treeckpt.save(tree, tmp_ckpt, allow_pickle=True)
    template = {"t": torch.zeros(4), "cfg": {"obj": None}}
    before = snapshot(template)
    with pytest.raises(UnsupportedLeafError) as info:
        treeckpt.load(template, tmp_ckpt)
    assert "'cfg.obj'" in str(info.value) and "allow_pickle" in str(info.value)
    assert_same(before, template)  # nothing changed
    with pytest.raises(UnsupportedLeafError, match=r"'cfg\.obj'"):
        treeckpt.restore(tmp_ckpt)
    info2 = treeckpt.metadata(tmp_ckpt)  # never unpickles
    assert "pickled object" in str(info2.values["cfg.obj"])
    out = treeckpt.load(template, tmp_ckpt, allow_pickle=True)
    assert out["cfg"]["obj"] == Custom(5)
    assert treeckpt.restore(tmp_ckpt, allow_pickle=True)["cfg"]["obj"] == Custom(5)


def test_pickle_not_needed_for_keys_outside_a_non_strict_template(tmp_ckpt: str) -> None:
    treeckpt.save({"t": torch.arange(4.0), "obj": Custom(5)}, tmp_ckpt, allow_pickle=True)
    out = treeckpt.load({"t": torch.zeros(4)}, tmp_ckpt, strict=False)
    assert torch.equal(out["t"], torch.arange(4.0))


# ---------------------------------------------------------------- metadata


def test_metadata(tmp_ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = {
        "w": torch.zeros(64, 32, dtype=torch.bfloat16),
        # random bits: nothing to compress
        "r": torch.randint(
            -(2**31),
            2**31 - 1,
            (100,),
            generator=torch.Generator().manual_seed(0),
            dtype=torch.int32,
        ).view(torch.float32),
        "e": torch.empty(0, 5),
        "n": np.arange(10, dtype=np.int32),
        "s": np.float64(2.5),
        "step": 12,
        "name": "run-1",
    }
    opts = SaveOptions(chunk_bytes=1024, compression=Compression(mode="auto"), io_threads=2)
    treeckpt.save(tree, tmp_ckpt, options=opts, user_metadata={"epoch": 3, "tags": ["a", "b"]})

    backends: list[FaultyBackend] = []

    def counting(path: Any) -> FaultyBackend:
        b = FaultyBackend(open_backend(str(path)))
        backends.append(b)
        return b

    monkeypatch.setattr(api, "_backend", counting)
    info = treeckpt.metadata(tmp_ckpt)
    (b,) = backends
    assert not b.calls, "metadata() must not change anything"
    read_names = {c.name for c in b.reads if c.op in ("read_file", "readinto")}
    assert all(not n.endswith(".bin") for n in read_names), read_names
    assert "manifest.json" in read_names

    assert info.path == os.path.abspath(tmp_ckpt)
    assert info.world_size == 1 and len(info.save_id) == 16
    assert info.user_metadata == {"epoch": 3, "tags": ["a", "b"]}
    assert info.values == {"step": 12, "name": "run-1"}
    w = info.tensors["w"]
    assert (w.dtype, w.shape, w.lib, w.raw_bytes) == ("bfloat16", (64, 32), "torch", 4096)
    assert w.chunks == 4 and w.codecs == {"planes": 4}
    assert w.stored_bytes < w.raw_bytes and w.ratio > 1
    r = info.tensors["r"]
    assert (r.dtype, r.shape, r.raw_bytes, r.chunks, r.codecs) == (
        "float32",
        (100,),
        400,
        1,
        {"raw": 1},
    )
    assert r.stored_bytes == 400 and r.ratio == 1.0
    e = info.tensors["e"]
    assert (e.shape, e.raw_bytes, e.chunks, e.stored_bytes) == ((0, 5), 0, 0, 0)
    assert info.tensors["n"].lib == "numpy" and info.tensors["s"].lib == "numpy-scalar"
    assert info.tensors["s"].shape == ()
    assert info.raw_bytes == 4096 + 400 + 40 + 8
    assert info.stored_bytes == sum(info.files.values())
    assert info.stored_bytes == sum(t.stored_bytes for t in info.tensors.values())
    assert len(info.files) == 2
    (d,) = data_dirs(tmp_ckpt)
    for name, size in info.files.items():
        assert os.path.getsize(os.path.join(tmp_ckpt, name)) == size
        assert name.startswith(d + "/")
    text = str(info)
    assert "w: bfloat16[64, 32]" in text and "step = 12" in text
    assert info.structure["type"] == "dict"


def test_metadata_needs_no_data_bytes(tmp_ckpt: str) -> None:
    """Data files may be replaced by same-size garbage: metadata() still works."""
    treeckpt.save({"w": torch.randn(100)}, tmp_ckpt)
    (d,) = data_dirs(tmp_ckpt)
    for n in os.listdir(os.path.join(tmp_ckpt, d)):
        if n.endswith(".bin"):
            p = os.path.join(tmp_ckpt, d, n)
            size = os.path.getsize(p)
            with open(p, "wb") as f:
                f.write(b"\xff" * size)
    assert treeckpt.metadata(tmp_ckpt).tensors["w"].shape == (100,)
    with pytest.raises(treeckpt.CorruptChunkError):
        treeckpt.restore(tmp_ckpt)


# ----------------------------------------------------------------- fsspec


def test_memory_url_round_trip(memory_url: str) -> None:
    tree = _nested()
    tree["chunky"] = _chunk_tree()
    treeckpt.save(tree, memory_url, options=SaveOptions(chunk_bytes=500, io_threads=2))
    assert_same(tree, treeckpt.restore(memory_url), exact_types=False)
    assert_same(
        tree, treeckpt.load(_nested() | {"chunky": zeros_like_tree(_chunk_tree())}, memory_url)
    )
    info = treeckpt.metadata(memory_url)
    assert info.tensors["chunky.smooth"].shape == (100, 100)
    # overwrite on an object store
    fs = fsspec.filesystem("memory")
    root = memory_url.removeprefix("memory://")
    before = [p for p in fs.ls(root, detail=False) if "data-" in p]
    treeckpt.save({"x": torch.ones(3)}, memory_url)
    after = [p for p in fs.ls(root, detail=False) if "data-" in p]
    assert len(before) == len(after) == 1 and before != after
    assert_same({"x": torch.ones(3)}, treeckpt.restore(memory_url))


def test_memory_url_not_found(memory_url: str) -> None:
    with pytest.raises(CheckpointNotFoundError):
        treeckpt.restore(memory_url)


def test_file_url(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/ckpt"
    treeckpt.save({"a": torch.arange(3)}, url)
    assert os.path.exists(tmp_path / "ckpt" / "manifest.json")
    assert_same({"a": torch.arange(3)}, treeckpt.restore(url))


# ---------------------------------------------------------- missing things


def test_not_found(tmp_ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        treeckpt.restore(tmp_ckpt)  # does not exist
    assert not isinstance(info.value, IncompleteCheckpointError)
    os.makedirs(tmp_ckpt)
    for call in (
        lambda: treeckpt.restore(tmp_ckpt),
        lambda: treeckpt.load({}, tmp_ckpt),
        lambda: treeckpt.metadata(tmp_ckpt),
    ):
        with pytest.raises(CheckpointNotFoundError) as info:
            call()
        assert not isinstance(info.value, IncompleteCheckpointError)
        assert "manifest.json" in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"not a directory")
    with pytest.raises(CheckpointNotFoundError):
        treeckpt.restore(str(f))
    with pytest.raises(CheckpointError):
        treeckpt.save({"a": 1}, str(f))


def test_incomplete(tmp_ckpt: str) -> None:
    treeckpt.save({"a": torch.ones(3)}, tmp_ckpt)
    os.remove(os.path.join(tmp_ckpt, "manifest.json"))
    for call in (
        lambda: treeckpt.restore(tmp_ckpt),
        lambda: treeckpt.load({"a": torch.zeros(3)}, tmp_ckpt),
        lambda: treeckpt.metadata(tmp_ckpt),
    ):
        with pytest.raises(IncompleteCheckpointError) as info:
            call()
        assert "incomplete" in str(info.value) and "data-" in str(info.value)


def test_incomplete_with_only_an_empty_data_dir(tmp_ckpt: str) -> None:
    os.makedirs(os.path.join(tmp_ckpt, "data-0123456789abcdef"))
    with pytest.raises(IncompleteCheckpointError):
        treeckpt.restore(tmp_ckpt)


#: Exception classes the package defines that are not CheckpointErrors, and why.
NOT_CHECKPOINT_ERRORS = {
    # Internal: a writer thread stopped because another failed; the root failure is
    # what store/chunks.py re-raises, so this never reaches a caller.
    "treeckpt.store.chunks._Aborted",
    # Fault injection stands for a storage failure: it must be the OSError a real
    # backend raises, or the tests would not see what a real failure does.
    "treeckpt.testing.faults.InjectedFault",
}


def _package_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package (warnings are not errors)."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(treeckpt.__path__, "treeckpt."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and not issubclass(obj, Warning)
                and obj.__module__ == module.__name__
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_errors_are_one_hierarchy() -> None:
    found = _package_exceptions()
    # Not only errors.py: the manager's lock and the DCP facade define their own.
    assert {"treeckpt.manager.lock.RootLockedError", "treeckpt.dcp.api.CheckpointException"} <= set(
        found
    )
    assert {f"treeckpt.errors.{n}" for n in treeckpt.errors.__all__} <= set(found)
    assert set(found) >= NOT_CHECKPOINT_ERRORS, "a justified exception no longer exists"
    strays = [
        name
        for name, cls in found.items()
        if name not in NOT_CHECKPOINT_ERRORS and not issubclass(cls, CheckpointError)
    ]
    assert not strays, f"exceptions outside the CheckpointError family: {strays}"


def test_pickle_module_untouched_on_plain_load(
    tmp_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A default save and load never call pickle."""

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "dumps", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    model, opt, sched = _make(0)
    _train_step(model, opt, sched, 0)
    treeckpt.save({"model": model, "optim": opt, "v": VALUES}, tmp_ckpt)
    treeckpt.restore(tmp_ckpt)
    treeckpt.load({"model": model, "optim": opt, "v": VALUES}, tmp_ckpt)


def test_staged_loads_hold_few_staging_buffers_at_once(tmp_ckpt: str) -> None:
    """Tensors that cannot be filled in place (on a GPU, or non-contiguous views) are
    staged in host memory one at a time, not all together: each staging buffer is
    copied out and dropped as soon as its last chunk has landed."""
    import tracemalloc

    n, side = 24, 256  # 24 tensors of 256 KiB
    g = torch.Generator().manual_seed(3)
    tree = {f"t{k}": torch.randn(side, side, generator=g) for k in range(n)}
    treeckpt.save(tree, tmp_ckpt, options=SaveOptions(chunk_bytes=64 << 10))
    bases = {k: torch.zeros(side, side) for k in tree}
    template = {k: b.t() for k, b in bases.items()}  # transposed views: staged
    assert not any(t.is_contiguous() for t in template.values())
    tracemalloc.start()
    try:
        treeckpt.load(template, tmp_ckpt, options=treeckpt.LoadOptions(io_threads=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for k, t in tree.items():
        assert torch.equal(template[k].view(torch.int32), t.view(torch.int32)), k
        assert bases[k].data_ptr() == template[k].data_ptr()  # filled in place
    one = side * side * 4
    # at least one buffer was seen (staging is traced), far fewer than all of them
    assert one <= peak < 8 * one, f"peak staging {peak} bytes for {n} tensors of {one}"

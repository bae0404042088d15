"""The committed golden checkpoints of format version 1 still load, value for value.

``v1/`` was written once by ``make_golden.py`` and is never regenerated: if a
change to treeckpt makes this test fail, it broke every checkpoint users have
already written. The expected values are spelled out here, independently of
the script.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import enum
import json
import math
import pathlib
import shutil
import struct
import zoneinfo
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import treeckpt

GOLDEN = Path(__file__).resolve().parent / "v1"
SAVE_ID = "79dda21be53b617e"


class Pair(NamedTuple):
    a: Any
    b: Any


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _expected_weights() -> dict[str, torch.Tensor]:
    return {
        "f32": torch.tensor(
            [[0.0, 0.125, 0.25, 0.375], [0.5, 0.625, 0.75, 0.875], [1.0, 1.125, 1.25, 1.375]],
            dtype=torch.float32,
        ),
        "bf16": torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], dtype=torch.bfloat16),
        "f16": torch.tensor([0.5, -2.0, math.inf, -0.0], dtype=torch.float16),
        "f64_t": torch.tensor([[0.0, 3.75], [1.25, 5.0], [2.5, 6.25]], dtype=torch.float64),
        "i64": torch.tensor([-3, -2, -1, 0, 1, 2], dtype=torch.int64) * 1099511627776,
        "u8": torch.tensor([0, 37, 74, 111, 148, 185, 222], dtype=torch.uint8),
        "u8_zeros": torch.zeros(1000, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.tensor([complex(1, 2), complex(-0.0, -0.5)], dtype=torch.complex64),
        "big": torch.arange(2048, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }


def _check(tree: Any, *, template_types: bool) -> None:
    expected = _expected_weights()
    assert list(tree["weights"]) == list(expected)
    for k, e in expected.items():
        got = tree["weights"][k]
        assert isinstance(got, torch.Tensor), k
        assert got.dtype == e.dtype and got.shape == e.shape, k
        assert _bits(got) == _bits(e), k
    pair = tree["pair"]
    assert type(pair).__name__ == "Pair" and pair._fields == ("a", "b")
    if template_types:
        assert type(pair) is Pair
    assert pair.a.dtype == torch.int32 and pair.a.shape == () and int(pair.a) == 7
    assert pair.b == (1, "two", None) and type(pair.b) is tuple
    assert type(tree["np"]) is np.ndarray and tree["np"].dtype == np.int16
    assert tree["np"].tolist() == [0, 1, 2, 3, 4]
    assert type(tree["np_scalar"]) is np.float64 and tree["np_scalar"] == 0.25
    values = tree["values"]
    assert list(values) == ["step", "big", "lr", "negzero", "name", "blob", "flag", "none"]
    assert values["step"] == 1234 and type(values["step"]) is int
    assert values["big"] == 1267650600228229401496703205376
    assert struct.pack(">d", values["lr"]) == struct.pack(">d", 3e-4)
    assert struct.pack(">d", values["negzero"]) == bytes.fromhex("8000000000000000")
    assert values["name"] == "golden \u2603"
    assert values["blob"] == b"\x00\xff"
    assert values["flag"] is True and values["none"] is None
    assert list(tree["int_keys"]) == [1, 2]
    assert tree["int_keys"][1] == "one"
    assert _bits(tree["int_keys"][2]) == _bits(torch.tensor([2.0]))
    assert tree["empty"] == []
    assert list(tree) == ["weights", "pair", "np", "np_scalar", "values", "int_keys", "empty"]


def _template() -> dict[str, Any]:
    w = {k: torch.full(v.shape, 9, dtype=v.dtype) for k, v in _expected_weights().items()}
    w["f64_t"] = torch.zeros(2, 3, dtype=torch.float64).t()  # non-contiguous, filled in place
    return {
        "weights": w,
        "pair": Pair(a=torch.zeros((), dtype=torch.int32), b=(0, "", None)),
        "np": np.zeros(5, dtype=np.int16),
        "np_scalar": np.float64(0),
        "values": {
            k: None for k in ["step", "big", "lr", "negzero", "name", "blob", "flag", "none"]
        },
        "int_keys": {1: None, 2: torch.zeros(1)},
        "empty": [],
    }


@pytest.fixture
def golden(tmp_path: Path) -> str:
    """A read-only copy, so no test can touch the committed files."""
    dst = tmp_path / "v1"
    shutil.copytree(GOLDEN, dst)
    for p in dst.rglob("*"):
        p.chmod(0o555 if p.is_dir() else 0o444)
    dst.chmod(0o555)
    return str(dst)


def test_golden_files_are_small_and_committed() -> None:
    files = [p for p in GOLDEN.rglob("*") if p.is_file()]
    names = sorted(str(p.relative_to(GOLDEN)) for p in files)
    assert names == [
        f"data-{SAVE_ID}/index-r0.json",
        f"data-{SAVE_ID}/r0-0.bin",
        f"data-{SAVE_ID}/r0-1.bin",
        "manifest.json",
    ]
    assert sum(p.stat().st_size for p in files) < 50_000
    doc = json.loads((GOLDEN / "manifest.json").read_bytes())
    assert doc["magic"] == "treeckpt" and doc["format_version"] == 1


def test_golden_restore(golden: str) -> None:
    _check(treeckpt.restore(golden), template_types=False)


def test_golden_load_into_template(golden: str) -> None:
    template = _template()
    out = treeckpt.load(template, golden)
    _check(out, template_types=True)
    assert out["weights"]["big"] is template["weights"]["big"]
    assert _bits(template["weights"]["f64_t"]) == _bits(_expected_weights()["f64_t"])


def test_golden_metadata(golden: str) -> None:
    info = treeckpt.metadata(golden)
    assert info.save_id == SAVE_ID and info.world_size == 1
    assert info.user_metadata == {"golden": "v1"}
    codecs = {fqn: t.codecs for fqn, t in info.tensors.items()}
    assert codecs["weights.big"] == {"shuffle-zstd": 2}
    assert codecs["weights.u8_zeros"] == {"zstd": 1}
    assert codecs["weights.bf16"] == {"raw": 1}
    assert codecs["weights.empty"] == {}
    assert info.tensors["weights.bf16"].dtype == "bfloat16"
    assert info.tensors["np_scalar"].lib == "numpy-scalar"
    assert info.values["values.step"] == 1234


# ------------------------------------------------------------ the planes codec

GOLDEN_PLANES = Path(__file__).resolve().parent / "v1-planes"


def _expected_planes() -> dict[str, torch.Tensor]:
    ramp = [((i % 97) - 48) / 64 for i in range(4096)]
    noise_bits = [0x3F800000 | (i * 2654435761 % (1 << 23)) for i in range(3000)]
    return {
        "f32": torch.tensor(ramp, dtype=torch.float32).reshape(64, 64),
        "bf16": torch.tensor(ramp, dtype=torch.float32).to(torch.bfloat16),
        "i64": torch.tensor([3 * i for i in range(3000)], dtype=torch.int64),
        "u8": torch.tensor([i % 3 for i in range(5000)], dtype=torch.uint8),
        "f32_noise": torch.tensor(noise_bits, dtype=torch.int32).view(torch.float32),
    }


def test_golden_planes_chunks_still_load(tmp_path: Path) -> None:
    dst = tmp_path / "v1-planes"
    shutil.copytree(GOLDEN_PLANES, dst)
    (index,) = dst.glob("data-*/index-r0.json")
    chunks = json.loads(index.read_bytes())["body"]["chunks"]
    assert {c[6] for c in chunks} == {"planes"}
    kinds = {c[9][2] for c in chunks}
    assert any("r" in k for k in kinds) and all("z" in k for k in kinds)
    assert any(len(c[9][1]) > 1 for c in chunks)  # chunks of several blocks
    want = _expected_planes()
    for got in (treeckpt.restore(str(dst)), treeckpt.load(_zeros_like(want), str(dst))):
        assert list(got) == list(want)
        for k, t in want.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape
            assert _bits(got[k]) == _bits(t), k
    # a slice decodes only the blocks it needs, to the same values
    row = treeckpt.read_tensor(str(dst), "f32", (slice(40, 41),))
    assert _bits(row) == _bits(want["f32"][40:41])


def _zeros_like(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in tree.items()}


# ------------------------------------------------- typed values and tensor flags

GOLDEN_VALUES = Path(__file__).resolve().parent / "v1-values"
VALUES_SAVE_ID = "78a960a026c85a1e"


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.IntFlag):
    R = 4
    W = 2


def _expected_values() -> dict[str, Any]:
    return {
        "complex": complex(struct.unpack(">d", bytes.fromhex("7ff8000000000000"))[0], -0.0),
        "set": {3, "x", (1, b"y"), None},
        "frozenset": frozenset({1.5, -0.0}),
        "counter": collections.Counter({30: 1, 80: 2}),
        "dtype": torch.bfloat16,
        "size": torch.Size([4, 0, 2]),
        "device": torch.device("cuda:1"),
        "pure_posix": pathlib.PurePosixPath("/data/x"),
        "pure_windows": pathlib.PureWindowsPath("C:\\data\\x"),
        "posix": pathlib.PosixPath("runs/1"),
        "datetime": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
        "datetime_offset": dt.datetime(
            2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(seconds=-17999), "X")
        ),
        "datetime_zone": dt.datetime(
            2024, 10, 27, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")
        ),
        "date": dt.date(2024, 2, 29),
        "time": dt.time(12, 0, 1, 5, tzinfo=dt.timezone.utc),
        "timedelta": dt.timedelta(days=-1, seconds=5, microseconds=7),
        "mode": Mode.TRAIN,
        "modes": {Mode.TRAIN, Mode.EVAL},
        "level": Level.HIGH,
        "perm": Perm.W,
        "np_str": np.str_("r\u00e9sum\u00e9"),
        "np_bytes": np.bytes_(b"\x01\x02"),
        "np_datetime": np.datetime64(30, "s").astype("M8[10s]"),
        "np_timedelta": np.timedelta64(-5, "ns"),
        "np_nat": np.datetime64("NaT"),
    }


def _record(v: Any) -> str:
    from treeckpt.core.values import canonical, encode_value

    return canonical(encode_value(v))


def _check_values(tree: Any, *, template: bool) -> None:
    assert list(tree) == ["values", "args", "param", "frozen", "grad", "ddict"]
    values = tree["values"]
    expected = _expected_values()
    assert list(values) == list(expected)
    for k, e in expected.items():
        got = values[k]
        if isinstance(e, enum.Enum):
            assert (got is e) if template else (type(got).__name__ == type(e).__name__), k
            assert got.name == e.name and got.value == e.value, k
        elif k == "modes":
            assert type(got) is set and {(type(m).__name__, m.name) for m in got} == {
                ("Mode", "TRAIN"),
                ("Mode", "EVAL"),
            }
            assert (got == e) is template
        else:
            assert type(got) is type(e), k
            assert _record(got) == _record(e), k
    if not template:  # one made-up type per class name
        assert {type(m) for m in values["modes"]} == {type(values["mode"])}
        assert isinstance(values["level"], enum.IntEnum) and isinstance(
            values["perm"], enum.IntFlag
        )
    args = tree["args"]
    assert type(args) is argparse.Namespace and list(vars(args)) == ["lr", "scale"]
    assert args.lr == 0.5 and _bits(args.scale) == _bits(torch.arange(3, dtype=torch.float32))
    assert type(tree["param"]) is torch.nn.Parameter and tree["param"].requires_grad
    assert _bits(tree["param"]) == _bits(torch.tensor([1.0, -2.0]))
    assert type(tree["frozen"]) is torch.nn.Parameter and not tree["frozen"].requires_grad
    assert type(tree["grad"]) is torch.Tensor and tree["grad"].requires_grad
    assert _bits(tree["grad"]) == _bits(torch.tensor([0.5, 0.25]))
    dd = tree["ddict"]
    assert type(dd) is collections.defaultdict and dd.default_factory is list and dd == {"a": [1]}


def _zone_known(key: str) -> bool:
    try:
        zoneinfo.ZoneInfo(key)
    except zoneinfo.ZoneInfoNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _zone_known("Europe/Paris"), reason="no time zone database")
def test_golden_values_restore_and_load(tmp_path: Path) -> None:
    dst = tmp_path / "v1-values"
    shutil.copytree(GOLDEN_VALUES, dst)
    names = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert names == [
        f"data-{VALUES_SAVE_ID}/index-r0.json",
        f"data-{VALUES_SAVE_ID}/r0-0.bin",
        "manifest.json",
    ]
    leaves = json.loads((dst / "manifest.json").read_bytes())["body"]["leaves"]
    kinds = {r["kind"] for r in leaves.values()}
    from treeckpt.core.values import VALUE_KINDS

    assert kinds == (VALUE_KINDS - {"none", "bool", "int", "float", "str", "bytes", "tuple"}) | {
        "tensor",
        "int",  # the defaultdict's list
        "float",  # args.lr
    }
    assert leaves["param"]["requires_grad"] is True and leaves["param"]["parameter"] is True
    _check_values(treeckpt.restore(str(dst)), template=False)

    template = {
        "values": {k: None for k in _expected_values()},
        "args": argparse.Namespace(lr=0.0, scale=torch.zeros(3)),
        "param": torch.nn.Parameter(torch.zeros(2)),
        "frozen": torch.nn.Parameter(torch.zeros(1), requires_grad=False),
        "grad": torch.zeros(2).requires_grad_(),
        "ddict": collections.defaultdict(list, {"a": [0]}),
    }
    for k in ("mode", "level", "perm"):
        template["values"][k] = _expected_values()[k]
    template["values"]["modes"] = {Mode.EVAL}
    param = template["param"]
    out = treeckpt.load(template, str(dst))
    _check_values(out, template=True)
    assert out["param"] is param


GOLDEN_IDX = Path(__file__).resolve().parent / "v1-idx"
IDX_SAVE_ID = "e4b9e5592183efb4"


def test_golden_binary_index_still_loads(tmp_path: Path) -> None:
    """``v1-idx``: the golden tree with a binary chunk index (raw chunks with blocks, planes)."""
    dst = tmp_path / "v1-idx"
    shutil.copytree(GOLDEN_IDX, dst)
    names = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert names == [
        f"data-{IDX_SAVE_ID}/index-r0.idx",
        f"data-{IDX_SAVE_ID}/r0-0.bin",
        f"data-{IDX_SAVE_ID}/r0-1.bin",
        "manifest.json",
    ]
    _check(treeckpt.restore(str(dst)), template_types=False)
    _check(treeckpt.load(_template(), str(dst)), template_types=True)
    part = treeckpt.read_tensor(str(dst), "weights.big", (slice(1500, 1700),))
    assert _bits(part) == _bits(_expected_weights()["big"][1500:1700])
    info = treeckpt.metadata(str(dst))
    assert info.tensors["weights.big"].codecs == {"planes": 1, "raw": 1}

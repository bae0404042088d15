"""Write the golden checkpoints ``tests/golden/v1/``, ``v1-planes/``, ``v1-values/`` and ``v1-idx/`` (format 1).

Each is written only when missing: commit the output and never regenerate it for a format change:
``test_golden.py`` loads it and checks every value, so a change that breaks
reading old checkpoints fails there. A new format version gets a new
directory (``v2/``) beside this one.

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import enum
import math
import pathlib
import shutil
import zoneinfo
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import treeckpt

OUT = Path(__file__).resolve().parent / "v1"
OUT_PLANES = Path(__file__).resolve().parent / "v1-planes"
OUT_VALUES = Path(__file__).resolve().parent / "v1-values"
OUT_IDX = Path(__file__).resolve().parent / "v1-idx"


class Pair(NamedTuple):
    a: Any
    b: Any


def golden_tree() -> dict[str, Any]:
    return {
        "weights": {
            "f32": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8,
            "bf16": (torch.arange(6, dtype=torch.float32) - 2.5).to(torch.bfloat16),
            "f16": torch.tensor([0.5, -2.0, math.inf, -0.0], dtype=torch.float16),
            "f64_t": (torch.arange(6, dtype=torch.float64).reshape(2, 3) * 1.25).t(),
            "i64": torch.arange(-3, 3, dtype=torch.int64) * 2**40,
            "u8": torch.arange(0, 256, 37, dtype=torch.uint8),
            "u8_zeros": torch.zeros(1000, dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "c64": torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64),
            "big": torch.arange(2048, dtype=torch.float32),
            "empty": torch.zeros(0, 3, dtype=torch.float32),
        },
        "pair": Pair(a=torch.tensor(7, dtype=torch.int32), b=(1, "two", None)),
        "np": np.arange(5, dtype=np.int16),
        "np_scalar": np.float64(0.25),
        "values": {
            "step": 1234,
            "big": 2**100,
            "lr": 3e-4,
            "negzero": -0.0,
            "name": "golden \u2603",
            "blob": b"\x00\xff",
            "flag": True,
            "none": None,
        },
        "int_keys": {1: "one", 2: torch.tensor([2.0])},
        "empty": [],
    }


def planes_tree() -> dict[str, Any]:
    """Chunks of the ``planes`` codec: several blocks, mixed ``r``/``z`` planes."""
    ramp = (torch.arange(4096) % 97 - 48).to(torch.float32) / 64
    return {
        "f32": ramp.reshape(64, 64),
        "bf16": ramp.to(torch.bfloat16),
        "i64": torch.arange(3000, dtype=torch.int64) * 3,
        "u8": (torch.arange(5000) % 3).to(torch.uint8),
        # values in [1, 2) with scrambled mantissas: "rrzz"-like planes
        "f32_noise": (0x3F800000 | (torch.arange(3000) * 2654435761 % (1 << 23)))
        .to(torch.int32)
        .view(torch.float32),
    }


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.IntFlag):
    R = 4
    W = 2


def values_tree() -> dict[str, Any]:
    """Every typed value kind, namespaces, parameters and grads, defaultdict factories."""
    nan = math.nan
    return {
        "values": {
            "complex": complex(nan, -0.0),
            "set": {3, "x", (1, b"y"), None},
            "frozenset": frozenset({1.5, -0.0}),
            "counter": collections.Counter({30: 1, 80: 2}),
            "dtype": torch.bfloat16,
            "size": torch.Size([4, 0, 2]),
            "device": torch.device("cuda", 1),
            "pure_posix": pathlib.PurePosixPath("/data/x"),
            "pure_windows": pathlib.PureWindowsPath("C:/data/x"),
            "posix": pathlib.PosixPath("runs/1"),
            "datetime": dt.datetime(2024, 1, 2, 3, 4, 5, 6),
            "datetime_offset": dt.datetime(
                2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-5, seconds=1), "X")
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
            "np_datetime": np.datetime64(3, "10s"),
            "np_timedelta": np.timedelta64(-5, "ns"),
            "np_nat": np.datetime64("NaT"),
        },
        "args": argparse.Namespace(lr=0.5, scale=torch.arange(3, dtype=torch.float32)),
        "param": torch.nn.Parameter(torch.tensor([1.0, -2.0])),
        "frozen": torch.nn.Parameter(torch.tensor([3.0]), requires_grad=False),
        "grad": torch.tensor([0.5, 0.25]).requires_grad_(),
        "ddict": collections.defaultdict(list, {"a": [1]}),
    }


def main_values() -> None:
    """Write ``v1-values/`` (value records and tensor flags, added to format version 1 later)."""
    treeckpt.save(
        values_tree(),
        str(OUT_VALUES),
        options=treeckpt.SaveOptions(io_threads=1),
        user_metadata={"golden": "v1-values"},
    )


def main_planes() -> None:
    """Write ``v1-planes/`` (the ``planes`` codec, added to format version 1 later)."""
    if OUT_PLANES.exists():
        shutil.rmtree(OUT_PLANES)
    treeckpt.save(
        planes_tree(),
        str(OUT_PLANES),
        options=treeckpt.SaveOptions(
            chunk_bytes=8192,
            compression=treeckpt.Compression(mode="auto", block_bytes=2048, min_ratio=1.1),
            io_threads=1,
        ),
        user_metadata={"golden": "v1-planes"},
    )


def main_binary_index() -> None:
    """Write ``v1-idx/`` (the binary chunk index, added to format version 1 later)."""
    treeckpt.save(
        golden_tree(),
        str(OUT_IDX),
        options=treeckpt.SaveOptions(
            chunk_bytes=4096,
            io_threads=2,
            compression=treeckpt.Compression(
                mode="auto", block_bytes=512, raw_chunk_block_bytes=1024, min_ratio=4.0
            ),
        ),
        user_metadata={"golden": "v1-idx"},
    )


def main() -> None:
    if not OUT_IDX.exists():
        main_binary_index()
    if not OUT_PLANES.exists():
        main_planes()
    if not OUT_VALUES.exists():
        main_values()
    if OUT.exists():
        return  # never regenerated: see the module docs
    treeckpt.save(
        golden_tree(),
        str(OUT),
        options=treeckpt.SaveOptions(
            chunk_bytes=4096, io_threads=2, compression=treeckpt.Compression(mode="auto")
        ),
        user_metadata={"golden": "v1"},
    )
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()

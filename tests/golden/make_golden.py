"""Write the golden checkpoints ``tests/golden/v1/`` and ``v1-planes/`` (format version 1).

Each is written only when missing: commit the output and never regenerate it for a format change:
``test_golden.py`` loads it and checks every value, so a change that breaks
reading old checkpoints fails there. A new format version gets a new
directory (``v2/``) beside this one.

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import treeckpt

OUT = Path(__file__).resolve().parent / "v1"
OUT_PLANES = Path(__file__).resolve().parent / "v1-planes"


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


def main_planes() -> None:
    """Write ``v1-planes/`` (the ``planes`` codec, added to format version 1 later)."""
    if OUT_PLANES.exists():
        shutil.rmtree(OUT_PLANES)
    treeckpt.save(
        planes_tree(),
        str(OUT_PLANES),
        options=treeckpt.SaveOptions(
            chunk_bytes=8192, compressed_block_bytes=2048, io_threads=1, min_ratio=1.1
        ),
        user_metadata={"golden": "v1-planes"},
    )


def main() -> None:
    if not OUT_PLANES.exists():
        main_planes()
    if OUT.exists():
        return  # never regenerated: see the module docs
    treeckpt.save(
        golden_tree(),
        str(OUT),
        options=treeckpt.SaveOptions(chunk_bytes=4096, io_threads=2, compress="auto"),
        user_metadata={"golden": "v1"},
    )
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()

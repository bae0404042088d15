"""QuantizedHuggingFaceStorageReader: FP8 block-scaled and MXFP4 weights dequantized on load,
bit for bit against references computed here with plain torch ops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import treeckpt.dcp as dcp
from tests.dist_utils import run_ranks

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _write(path: Path, files: dict[str, dict[str, torch.Tensor]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def _fp8_case(rows: int = 300, cols: int = 260, bs: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(rows, cols, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(rows / bs), math.ceil(cols / bs), generator=g) + 0.01
    return w, s


def _fp8_reference(w: torch.Tensor, s: torch.Tensor, bs: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=dtype)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].to(torch.float32) * s[i, j]
            out[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs] = blk.to(dtype)
    return out


def _mx_reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    *prefix, g, b = blocks.shape
    out = torch.empty((*prefix, g, 2 * b), dtype=torch.float32)
    flat_b = blocks.reshape(-1, b)
    flat_s = scales.reshape(-1)
    flat_o = out.reshape(-1, 2 * b)
    for r in range(flat_b.shape[0]):
        factor = 2.0 ** (int(flat_s[r]) - 127)
        for k in range(b):
            byte = int(flat_b[r, k])
            flat_o[r, 2 * k] = FP4[byte & 0x0F] * factor
            flat_o[r, 2 * k + 1] = FP4[byte >> 4] * factor
    return out.reshape(*prefix, g * 2 * b).to(dtype)


def _mx_case() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (2, 3, 4, 8), dtype=torch.uint8, generator=g)
    scales = torch.randint(115, 140, (2, 3, 4), dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_and_mxfp4_dequantized_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    w, s = _fp8_case()
    blocks, scales = _mx_case()
    norm = torch.randn(7, dtype=torch.bfloat16)
    _write(
        tmp_path,
        {
            "model-00001-of-00002.safetensors": {"l.weight": w, "norm": norm, "e.w_blocks": blocks},
            "model-00002-of-00002.safetensors": {"l.weight_scale_inv": s, "e.w_scales": scales},
        },
    )
    target = {
        "l.weight": torch.zeros(w.shape, dtype=dtype),
        "norm": torch.zeros(7, dtype=torch.bfloat16),
        "e.w_blocks": torch.zeros(2, 3, 64, dtype=dtype),
    }
    reader = dcp.QuantizedHuggingFaceStorageReader(str(tmp_path), target_dtype=dtype)
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["l.weight"], _fp8_reference(w, s, 128, dtype))
    assert torch.equal(target["norm"], norm)
    assert torch.equal(target["e.w_blocks"], _mx_reference(blocks, scales, dtype))


def test_fp8_partial_block_size(tmp_path: Path) -> None:
    w, s = _fp8_case(rows=70, cols=33, bs=16)
    _write(tmp_path, {"model.safetensors": {"a.weight": w, "a.weight_scale_inv": s}})
    target = {"a.weight": torch.zeros(70, 33)}
    dcp.load(
        target,
        storage_reader=dcp.QuantizedHuggingFaceStorageReader(str(tmp_path), block_size=16),
        no_dist=True,
    )
    assert torch.equal(target["a.weight"], _fp8_reference(w, s, 16, torch.float32))


def _sharded_load(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    sd = {
        "l.weight": distribute_tensor(torch.zeros(300, 260), mesh, [Shard(1)]),
        "e.w_blocks": distribute_tensor(torch.zeros(2, 3, 64), mesh, [Shard(2)]),
    }
    reader = dcp.QuantizedHuggingFaceStorageReader(path)
    dcp.load(sd, storage_reader=reader)
    assert all(isinstance(v, DTensor) for v in sd.values())
    return {k: v.full_tensor() for k, v in sd.items()}


@pytest.mark.distributed
def test_quantized_regions_on_3_ranks(tmp_path: Path) -> None:
    w, s = _fp8_case()
    blocks, scales = _mx_case()
    folder = tmp_path / "q"
    _write(
        folder,
        {
            "model.safetensors": {
                "l.weight": w,
                "l.weight_scale_inv": s,
                "e.w_blocks": blocks,
                "e.w_scales": scales,
            }
        },
    )
    for got in run_ranks(3, _sharded_load, tmp_path, str(folder), timeout=180):
        assert torch.equal(got["l.weight"], _fp8_reference(w, s, 128, torch.float32))
        assert torch.equal(got["e.w_blocks"], _mx_reference(blocks, scales, torch.float32))

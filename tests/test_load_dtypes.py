"""Loading into another dtype: exact conversions are made and reported, lossy ones need a name.

Every value is compared bit for bit with torch's own conversion of the
stored tensor (``bf16.float()``), which for an exact conversion is the value
itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt import Box, Compression, LoadMismatchError, LoadOptions, SaveOptions
from treeckpt.core.box import full_box
from treeckpt.manager import CheckpointManager
from treeckpt.shell.load import read_regions, read_stored
from treeckpt.store.backends import open_backend
from treeckpt.store.reader import read_manifest


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _specials_bf16() -> torch.Tensor:
    """Every bfloat16 bit pattern: zeros of both signs, subnormals, infinities, NaNs."""
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(dtype)


def test_bf16_checkpoint_into_fp32_model_is_exact_and_reported(
    tmp_ckpt: str, caplog: pytest.LogCaptureFixture
) -> None:
    saved = _model(torch.bfloat16)
    specials = _specials_bf16()
    treeckpt.save({"model": saved, "specials": specials, "step": 3}, tmp_ckpt)
    model = _model(torch.float32, seed=1)
    params = {k: v for k, v in model.state_dict().items()}
    tree = {"model": model, "specials": torch.zeros(1 << 16), "step": 0}
    with caplog.at_level(logging.INFO, logger="treeckpt.load"):
        out = treeckpt.load(tree, tmp_ckpt)
    assert out is tree and tree["step"] == 3
    for k, v in saved.state_dict().items():
        got = model.state_dict()[k]
        assert got.dtype == torch.float32 and got.data_ptr() == params[k].data_ptr()  # in place
        assert _bits(got) == _bits(v.float()), k
    assert _bits(tree["specials"]) == _bits(specials.float())
    assert caplog.messages == [f"{tmp_ckpt}: the load converts 7 tensors: 7 bfloat16 -> float32"]


def test_fp32_into_bf16_is_refused_naming_fqn_and_dtypes(tmp_ckpt: str) -> None:
    treeckpt.save({"w": torch.randn(4, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, tmp_ckpt)
    template = {"w": torch.zeros(4, 3, dtype=torch.bfloat16), "b": torch.zeros(3)}
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load(template, tmp_ckpt)
    assert info.value.mismatched == (
        "w (template bfloat16[4, 3], checkpoint float32[4, 3]: converting float32 to bfloat16 "
        "can lose bits; allow it by name: allow_lossy_cast={'w'})",
    )
    assert str(info.value) == (
        "template does not match checkpoint; mismatched (1): w (template bfloat16[4, 3], "
        "checkpoint float32[4, 3]: converting float32 to bfloat16 can lose bits; allow it by "
        "name: allow_lossy_cast={'w'})"
    )
    # Nothing changed, not even the tensor that would have widened exactly.
    assert torch.equal(template["b"], torch.zeros(3))
    assert torch.equal(template["w"], torch.zeros(4, 3, dtype=torch.bfloat16))


def test_shape_and_dtype_differences_are_reported_together(tmp_ckpt: str) -> None:
    treeckpt.save({"a": torch.ones(2), "c": torch.ones(2, dtype=torch.complex64)}, tmp_ckpt)
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load(
            {"a": torch.zeros(3, dtype=torch.float64), "c": torch.zeros(2, dtype=torch.float64)},
            tmp_ckpt,
            options=LoadOptions(allow_lossy_cast={"*"}),
        )
    assert info.value.mismatched == (
        "a (template float64[3], checkpoint float32[2])",
        "c (template float64[2], checkpoint complex64[2]: complex64 cannot be converted to "
        "float64 (the imaginary part would be dropped))",
    )


def test_lossy_cast_allowed_by_name_is_made_and_reported(
    tmp_ckpt: str, caplog: pytest.LogCaptureFixture
) -> None:
    w = torch.randn(64, 5) * 1e3
    ids = torch.tensor([-(2**40), 3, 2**53 + 1], dtype=torch.int64)
    treeckpt.save({"w": w, "ids": ids, "k": torch.ones(2)}, tmp_ckpt)
    tree = {
        "w": torch.zeros(64, 5, dtype=torch.bfloat16),
        "ids": torch.zeros(3, dtype=torch.float64),
        "k": torch.zeros(2, dtype=torch.float64),
    }
    opts = LoadOptions(allow_lossy_cast=lambda fqn: fqn in ("w", "ids"))
    with caplog.at_level(logging.INFO, logger="treeckpt.load"):
        treeckpt.load(tree, tmp_ckpt, options=opts)
    assert _bits(tree["w"]) == _bits(w.to(torch.bfloat16))
    assert _bits(tree["ids"]) == _bits(ids.to(torch.float64))
    assert tree["ids"][2].item() == 2.0**53  # the bit it lost
    assert caplog.messages == [
        f"{tmp_ckpt}: the load converts 3 tensors: 1 float32 -> bfloat16 (lossy, allowed by "
        "name: w), 1 float32 -> float64, 1 int64 -> float64 (lossy, allowed by name: ids)"
    ]


def test_patterns_name_the_tensors(tmp_ckpt: str) -> None:
    treeckpt.save({"m": {"a.w": torch.randn(3), "b": torch.randn(3)}}, tmp_ckpt)
    tree = {
        "m": {"a.w": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(3, dtype=torch.float16)}
    }
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load(tree, tmp_ckpt, options=LoadOptions(allow_lossy_cast=["m.a*"]))
    assert [m.split(" ")[0] for m in info.value.mismatched] == ["m.b"]
    treeckpt.load(tree, tmp_ckpt, options=LoadOptions(allow_lossy_cast=["m.a*", "m.b"]))
    assert tree["m"]["b"].dtype == torch.float16


@pytest.mark.parametrize("block_bytes", [0, 512])
def test_planes_codec_decodes_into_a_wider_target(tmp_ckpt: str, block_bytes: int) -> None:
    """bfloat16 chunks stored byte-plane compressed, decoded, then widened."""
    # Smooth values compress: the codec really runs (checked in the chunk index below).
    x = (torch.linspace(-3, 3, 96 * 40).reshape(96, 40) ** 3).to(torch.bfloat16)
    opts = SaveOptions(
        chunk_bytes=96 * 40 * 2 // 3,
        compression=Compression(mode="always", block_bytes=block_bytes),
    )
    treeckpt.save({"x": x}, tmp_ckpt, options=opts)
    backend = open_backend(tmp_ckpt)
    try:
        stored = read_stored(backend, read_manifest(backend))
    finally:
        backend.close()
    assert {c.codec for c in stored["x"].chunks} == {"planes"}
    whole = {"x": torch.zeros(96, 40)}
    treeckpt.load(whole, tmp_ckpt)
    assert _bits(whole["x"]) == _bits(x.float())
    as_f64 = {"x": torch.zeros(96, 40, dtype=torch.float64)}
    treeckpt.load(as_f64, tmp_ckpt)
    assert _bits(as_f64["x"]) == _bits(x.double())


@pytest.mark.parametrize("mode", ["never", "always"])
def test_a_box_read_into_part_of_a_bigger_target(tmp_ckpt: str, mode: str) -> None:
    """A region of the checkpoint widened into a non-contiguous window of a larger tensor."""
    x = torch.randn(50, 30).to(torch.bfloat16)
    opts = SaveOptions(
        chunk_bytes=50 * 30 * 2 // 4,
        compression=Compression(mode=mode, block_bytes=256, raw_chunk_block_bytes=256),
    )
    treeckpt.save({"x": x}, tmp_ckpt, options=opts)
    big = torch.full((60, 40), -7.0)
    window = big[5:28, 3:20]  # not contiguous
    box = Box(offsets=(11, 9), sizes=(23, 17))
    backend = open_backend(tmp_ckpt)
    try:
        manifest = read_manifest(backend)
        plan = read_regions(
            backend, manifest, read_stored(backend, manifest), {"x": [(box, window)]}, LoadOptions()
        )
    finally:
        backend.close()
    assert plan.converted == {"x": ("bfloat16", "float32")} and plan.lossy == ()
    assert plan.needed_bytes == 23 * 17 * 2  # counted in the stored dtype
    assert plan.report().endswith("; converts 1 tensor: 1 bfloat16 -> float32")
    expected = torch.full((60, 40), -7.0)
    expected[5:28, 3:20] = x[11:34, 9:26].float()
    assert _bits(big) == _bits(expected)


def test_plan_refuses_a_lossy_region_without_consent(tmp_ckpt: str) -> None:
    treeckpt.save({"x": torch.randn(4)}, tmp_ckpt)
    backend = open_backend(tmp_ckpt)
    try:
        manifest = read_manifest(backend)
        stored = read_stored(backend, manifest)
        out = torch.zeros(4, dtype=torch.int32)
        with pytest.raises(
            treeckpt.PlanError,
            match=r"^x: checkpoint has dtype float32 shape \[4\], request has dtype int32 shape "
            r"\[4\] \(converting float32 to int32 can lose bits; allow it by name: "
            r"allow_lossy_cast=\{'x'\}\)$",
        ):
            read_regions(backend, manifest, stored, {"x": [(full_box((4,)), out)]}, LoadOptions())
    finally:
        backend.close()
    assert torch.equal(out, torch.zeros(4, dtype=torch.int32))


def test_scalars_empty_and_complex_tensors_widen(tmp_ckpt: str) -> None:
    saved = {
        "s": torch.tensor(-0.0, dtype=torch.bfloat16),
        "e": torch.zeros(0, 3, dtype=torch.float16),
        "c": torch.tensor([1 + 2j, float("nan") - 1j], dtype=torch.complex64),
        "r": torch.tensor([0.1, -3.0]),
        "m": torch.tensor([True, False, True]),
    }
    treeckpt.save(saved, tmp_ckpt)
    tree = {
        "s": torch.tensor(5.0, dtype=torch.float64),
        "e": torch.ones(0, 3),
        "c": torch.zeros(2, dtype=torch.complex128),
        "r": torch.zeros(2, dtype=torch.complex64),
        "m": torch.zeros(3, dtype=torch.uint8),
    }
    treeckpt.load(tree, tmp_ckpt)
    assert _bits(tree["s"]) == _bits(torch.tensor(-0.0, dtype=torch.float64))
    assert tree["e"].shape == (0, 3) and tree["e"].dtype == torch.float32
    assert _bits(tree["c"]) == _bits(saved["c"].to(torch.complex128))
    assert _bits(tree["r"]) == _bits(saved["r"].to(torch.complex64))
    assert tree["m"].tolist() == [1, 0, 1]


def test_numpy_arrays_widen_in_place(tmp_ckpt: str) -> None:
    h = np.linspace(-2, 2, 33, dtype=np.float16)
    i = np.arange(-5, 5, dtype=np.int16)
    treeckpt.save({"h": h, "i": i, "u": np.arange(4, dtype=np.uint8)}, tmp_ckpt)
    tree = {
        "h": np.zeros(33, np.float32),
        "i": np.zeros(10, np.int64),
        "u": np.zeros(4, np.uint32),
    }
    target = tree["h"]
    treeckpt.load(tree, tmp_ckpt)
    assert tree["h"] is target and tree["h"].tobytes() == h.astype(np.float32).tobytes()
    assert tree["i"].tobytes() == i.astype(np.int64).tobytes()
    assert tree["u"].tobytes() == np.arange(4, dtype=np.uint32).tobytes()


def test_numpy_scalar_dtype_difference_stays_an_error(tmp_ckpt: str) -> None:
    """A numpy scalar is rebuilt, not filled: it would come back in the stored dtype."""
    treeckpt.save({"s": np.float32(1.5)}, tmp_ckpt)
    with pytest.raises(LoadMismatchError) as info:
        treeckpt.load({"s": np.float64(0.0)}, tmp_ckpt)
    assert info.value.mismatched == ("s (template float64[], checkpoint float32[])",)


def test_manager_restore_widens_and_takes_the_options(tmp_path: Path) -> None:
    w = torch.randn(6, 2).to(torch.bfloat16)
    with CheckpointManager(str(tmp_path / "root")) as mgr:
        mgr.save(1, {"w": w, "v": torch.randn(3)}, force=True)
    tree = {"w": torch.zeros(6, 2), "v": torch.zeros(3, dtype=torch.bfloat16)}
    with CheckpointManager(str(tmp_path / "root")) as mgr, pytest.raises(LoadMismatchError):
        mgr.restore(tree=tree)
    assert torch.equal(tree["w"], torch.zeros(6, 2))
    opts = LoadOptions(allow_lossy_cast={"v"})
    with CheckpointManager(str(tmp_path / "root"), load_options=opts) as mgr:
        mgr.restore(tree=tree)
    assert _bits(tree["w"]) == _bits(w.float())


# --------------------------------------------------- resharding, FSDP2 on 2 ranks


def _fsdp_save(rank: int, world: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(torch.bfloat16, seed=5)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    treeckpt.save({"model": model}, path)
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def _fsdp_load(rank: int, world: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(torch.float32, seed=9)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    treeckpt.load({"model": model}, path)
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def test_fsdp2_bf16_on_two_ranks_widens_into_one_fp32_process(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    full, _ = run_ranks(2, _fsdp_save, tmp_path, path, timeout=180)
    model = _model(torch.float32, seed=3)
    treeckpt.load({"model": model}, path)
    got = model.state_dict()
    assert set(got) == set(full)
    for k, v in full.items():
        assert v.dtype == torch.bfloat16 and got[k].dtype == torch.float32
        assert _bits(got[k]) == _bits(v.float()), k


def test_one_bf16_process_widens_into_fsdp2_fp32_shards(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    saved = _model(torch.bfloat16, seed=4)
    treeckpt.save({"model": saved}, path)
    full, full1 = run_ranks(2, _fsdp_load, tmp_path, path, timeout=180)
    for k, v in saved.state_dict().items():
        assert _bits(full[k]) == _bits(v.float()) == _bits(full1[k]), k


@pytest.mark.gpu
def test_widening_into_cuda_tensors(tmp_ckpt: str) -> None:
    """Regions are converted as they land on the device, contiguous or not."""
    x = _specials_bf16().reshape(256, 256)
    treeckpt.save({"x": x, "y": x[:16]}, tmp_ckpt, options=SaveOptions(chunk_bytes=1 << 14))
    big = torch.full((20, 300), -1.0, device="cuda")
    tree = {"x": torch.zeros(256, 256, device="cuda"), "y": big[2:18, 10:266]}
    treeckpt.load(tree, tmp_ckpt)
    assert tree["x"].device.type == "cuda"
    assert _bits(tree["x"].cpu()) == _bits(x.float())
    expected = torch.full((20, 300), -1.0)
    expected[2:18, 10:266] = x[:16].float()
    assert _bits(big.cpu()) == _bits(expected)

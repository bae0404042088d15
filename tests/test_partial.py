"""Reading one region of one tensor, and dry-run resharding reports."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import treeckpt
from treeckpt import Box, ShardSpec
from treeckpt.core.box import full_box


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor]:
    path = str(tmp_path_factory.mktemp("partial") / "ckpt")
    x = torch.randn(50, 13, generator=torch.Generator().manual_seed(3)).bfloat16()
    treeckpt.save({"x": x, "v": 1}, path, options=treeckpt.SaveOptions(chunk_bytes=100))
    return path, x


@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 50), b=st.integers(0, 50), c=st.integers(0, 13), d=st.integers(0, 13))
def test_read_slice_matches_indexing(
    ckpt: tuple[str, torch.Tensor], a: int, b: int, c: int, d: int
) -> None:
    path, x = ckpt
    lo0, hi0 = sorted((a, b))
    lo1, hi1 = sorted((c, d))
    got = treeckpt.read_tensor(path, "x", (slice(lo0, hi0), slice(lo1, hi1)))
    assert torch.equal(got.view(torch.uint8), x[lo0:hi0, lo1:hi1].contiguous().view(torch.uint8))


def test_read_reads_only_covering_chunks(ckpt: tuple[str, torch.Tensor]) -> None:
    path, _ = ckpt
    (plan,) = treeckpt.plan_reshard(
        path,
        [
            [
                ShardSpec(
                    fqn="x",
                    dtype="bfloat16",
                    shape=(50, 13),
                    boxes=(Box(offsets=(0, 0), sizes=(1, 13)),),
                )
            ]
        ],
    )
    info = treeckpt.metadata(path)
    assert len(plan.chunks) == 1 < info.tensors["x"].chunks
    assert plan.read_raw_bytes < info.tensors["x"].raw_bytes


def test_read_whole_tensor_and_errors(ckpt: tuple[str, torch.Tensor]) -> None:
    path, x = ckpt
    assert torch.equal(treeckpt.read_tensor(path, "x"), x)
    with pytest.raises(KeyError, match="'v' is not a tensor"):
        treeckpt.read_tensor(path, "v")
    with pytest.raises(treeckpt.PlanError, match="outside"):
        treeckpt.read_tensor(path, "x", Box(offsets=(40, 0), sizes=(20, 13)))
    with pytest.raises(treeckpt.PlanError, match="unit-step"):
        treeckpt.read_tensor(path, "x", (slice(0, 10, 2),))


def test_dry_run_report_for_three_ranks(ckpt: tuple[str, torch.Tensor]) -> None:
    path, _ = ckpt
    specs = [
        [
            ShardSpec(
                fqn="x",
                dtype="bfloat16",
                shape=(50, 13),
                boxes=(Box(offsets=(r * 17, 0), sizes=(min(17, 50 - r * 17), 13)),),
            )
        ]
        for r in range(3)
    ]
    plans = treeckpt.plan_reshard(path, specs)
    assert sum(p.needed_bytes for p in plans) == 50 * 13 * 2
    for p in plans:
        assert p.read_amplification >= 1.0
        assert "read amplification" in p.report()
    # A float32 destination widens bfloat16 exactly: the dry run shows the conversion.
    (wide,) = treeckpt.plan_reshard(
        path, [[ShardSpec(fqn="x", dtype="float32", shape=(50, 13), boxes=(full_box((50, 13)),))]]
    )
    assert wide.converted == {"x": ("bfloat16", "float32")} and wide.lossy == ()
    assert wide.needed_bytes == 50 * 13 * 2  # counted in the stored dtype
    assert wide.report().endswith("; converts 1 tensor: 1 bfloat16 -> float32")
    # float16 cannot hold every bfloat16 value: refused unless allowed by name.
    half = [[ShardSpec(fqn="x", dtype="float16", shape=(50, 13), boxes=())]]
    with pytest.raises(
        treeckpt.PlanError,
        match=r"^x: checkpoint has dtype bfloat16 shape \[50, 13\], request has dtype float16 "
        r"shape \[50, 13\] \(converting bfloat16 to float16 can lose bits; allow it by name: "
        r"allow_lossy_cast=\{'x'\}\)$",
    ):
        treeckpt.plan_reshard(path, half)
    (opted,) = treeckpt.plan_reshard(
        path, half, options=treeckpt.LoadOptions(allow_lossy_cast={"x"})
    )
    assert opted.converted == {"x": ("bfloat16", "float16")} and opted.lossy == ("x",)


def _rows(path: str, fqn: str, shape: tuple[int, ...], dtype: str, lo: int, hi: int) -> ShardSpec:
    box = Box(offsets=(lo, *(0,) * (len(shape) - 1)), sizes=(hi - lo, *shape[1:]))
    return ShardSpec(fqn=fqn, dtype=dtype, shape=shape, boxes=(box,))


def test_resharding_reads_only_the_blocks_it_needs(tmp_path: Path) -> None:
    """2 -> 3 ranks: chunk boundaries fall inside every target shard, yet raw
    chunks with block checksums are read by range, not whole."""
    x = torch.randn(600, 256, generator=torch.Generator().manual_seed(5))  # 600 KiB
    path = str(tmp_path / "c")
    opts = treeckpt.SaveOptions(
        chunk_bytes=300 * 1024,
        compression=treeckpt.Compression(raw_chunk_block_bytes=16 * 1024, mode="never"),
    )
    treeckpt.save({"x": x}, path, options=opts)
    specs = [[_rows(path, "x", (600, 256), "float32", r * 200, (r + 1) * 200)] for r in range(3)]
    plans = treeckpt.plan_reshard(path, specs)
    read = sum(p.read_stored_bytes for p in plans)
    needed = sum(p.needed_bytes for p in plans)
    assert needed == x.numel() * 4
    # Each of the two inner shard boundaries costs at most one extra block per side.
    assert needed < read <= needed + 4 * 16 * 1024, read / needed
    # Without block checksums the middle rank reads both whole chunks.
    nob = str(tmp_path / "nob")
    treeckpt.save(
        {"x": x},
        nob,
        options=dataclasses.replace(
            opts, compression=dataclasses.replace(opts.compression, raw_chunk_block_bytes=0)
        ),
    )
    (middle,) = treeckpt.plan_reshard(nob, [specs[1][0:1]])
    assert middle.read_stored_bytes == x.numel() * 4
    # And the ranged reads give the right values.
    for r in range(3):
        got = treeckpt.read_tensor(path, "x", (slice(r * 200, (r + 1) * 200),))
        assert torch.equal(got, x[r * 200 : (r + 1) * 200])


def test_resharding_decodes_only_the_compressed_blocks_it_needs(tmp_path: Path) -> None:
    """2 -> 3 ranks over compressed chunks: each rank decodes the blocks
    holding its rows, not the whole chunks its shard starts or ends in."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(600, 256, generator=g) * 0.02).to(torch.bfloat16)  # 300 KiB
    path = str(tmp_path / "c")
    opts = treeckpt.SaveOptions(
        chunk_bytes=150 * 1024, compression=treeckpt.Compression(mode="auto", block_bytes=8 * 1024)
    )
    treeckpt.save({"x": x}, path, options=opts)
    assert set(treeckpt.metadata(path).tensors["x"].codecs) == {"planes"}
    specs = [[_rows(path, "x", (600, 256), "bfloat16", r * 200, (r + 1) * 200)] for r in range(3)]
    plans = treeckpt.plan_reshard(path, specs)
    needed = sum(p.needed_bytes for p in plans)
    decoded = sum(p.read_raw_bytes for p in plans)
    assert needed == x.numel() * 2
    # each inner shard boundary costs at most one extra block on each side
    assert needed < decoded <= needed + 4 * 8 * 1024, decoded / needed
    stored = sum(p.read_stored_bytes for p in plans)
    assert stored < 0.8 * decoded  # and what is read from storage is the compressed blocks
    for r in range(3):
        got = treeckpt.read_tensor(path, "x", (slice(r * 200, (r + 1) * 200),))
        assert torch.equal(got.view(torch.int16), x[r * 200 : (r + 1) * 200].view(torch.int16))
    # one compressed block per chunk: the middle rank decodes both chunks whole
    whole = str(tmp_path / "whole")
    treeckpt.save(
        {"x": x},
        whole,
        options=dataclasses.replace(
            opts, compression=treeckpt.Compression(mode="auto", block_bytes=0)
        ),
    )
    (middle,) = treeckpt.plan_reshard(whole, [specs[1]])
    assert middle.read_raw_bytes == x.numel() * 2


def test_damaged_compressed_block_is_detected_by_a_ranged_read(tmp_path: Path) -> None:
    x = torch.zeros(256, 256, dtype=torch.float32)
    x[::7] = 1.5
    path = tmp_path / "c"
    opts = treeckpt.SaveOptions(
        chunk_bytes=1 << 20, compression=treeckpt.Compression(mode="auto", block_bytes=16 * 1024)
    )
    treeckpt.save({"x": x}, str(path), options=opts)
    assert torch.equal(treeckpt.read_tensor(str(path), "x", (slice(250, 256),)), x[250:])
    (data,) = [f for f in path.rglob("*.bin")]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10  # inside the last block
    data.write_bytes(bytes(raw))
    # the first rows are still readable: their blocks are intact
    assert torch.equal(treeckpt.read_tensor(str(path), "x", (slice(0, 4),)), x[:4])
    with pytest.raises(treeckpt.CorruptChunkError, match="checksum mismatch in block 15"):
        treeckpt.read_tensor(str(path), "x", (slice(250, 256),))


def test_damaged_block_is_detected_by_a_ranged_read(tmp_path: Path) -> None:
    x = torch.arange(64 * 1024, dtype=torch.float32).reshape(256, 256)
    path = tmp_path / "c"
    opts = treeckpt.SaveOptions(
        compression=treeckpt.Compression(raw_chunk_block_bytes=4096, mode="never")
    )
    treeckpt.save({"x": x}, str(path), options=opts)
    (data,) = [p for p in path.rglob("*.bin")]
    raw = bytearray(data.read_bytes())
    raw[100 * 1024 + 7] ^= 0x40  # inside row 100
    data.write_bytes(bytes(raw))
    # Rows away from the damage read fine, by range.
    assert torch.equal(treeckpt.read_tensor(str(path), "x", (slice(0, 10),)), x[:10])
    with pytest.raises(
        treeckpt.CorruptChunkError,
        match=r"r0-0.bin at offset 0 \(tensor 'x'\): checksum mismatch in block 25",
    ):
        treeckpt.read_tensor(str(path), "x", (slice(99, 102),))
    with pytest.raises(treeckpt.CorruptChunkError, match="checksum mismatch"):
        treeckpt.restore(str(path))


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: treeckpt.SaveOptions(chunk_bytes=0), "chunk_bytes"),
        (lambda: treeckpt.Compression(mode="maybe"), "Compression.mode"),  # type: ignore[arg-type]
        (lambda: treeckpt.Compression(raw_chunk_block_bytes=-1), "raw_chunk_block_bytes"),
        (lambda: treeckpt.Compression(block_bytes=-1), "Compression.block_bytes"),
        (lambda: treeckpt.Compression(level=99), "Compression.level"),
        (lambda: treeckpt.Compression(level=True), "Compression.level"),
        (lambda: treeckpt.Compression(min_ratio=0), "Compression.min_ratio"),
        (lambda: treeckpt.Compression(min_ratio=math.nan), "Compression.min_ratio"),
        (lambda: treeckpt.SaveOptions(compression="never"), "compression"),  # type: ignore[arg-type]
        (lambda: treeckpt.LoadOptions(io_threads=0), "io_threads"),
        (lambda: treeckpt.LoadOptions(timeout_s=0), "timeout_s"),
    ],
)
def test_bad_options_are_checkpoint_errors(make: Any, field: str) -> None:
    with pytest.raises(treeckpt.OptionsError, match=field) as info:
        make()
    assert isinstance(info.value, treeckpt.CheckpointError) and isinstance(info.value, ValueError)

"""treeckpt.open: lazy browsing, ranged slicing, statistics, text and HTML views."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import treeckpt
from treeckpt import Compression, SaveOptions
from treeckpt.errors import (
    CheckpointNotFoundError,
    CorruptChunkError,
    LeafNotFoundError,
    UnsupportedLeafError,
)
from treeckpt.explore import Checkpoint, TensorHandle, TensorStats
from treeckpt.store.backends import Backend, open_backend
from treeckpt.testing.faults import FaultyBackend

from .dist_utils import run_ranks

FAST = SaveOptions(sync=False)
# 1024 x 1024 float32 = 4 MiB in 16 raw chunks of 256 KiB (64 rows each), 64 KiB blocks.
RAW_CHUNKS = SaveOptions(
    chunk_bytes=256 << 10,
    compression=Compression(raw_chunk_block_bytes=64 << 10, mode="never"),
    sync=False,
)
ZSTD_CHUNKS = SaveOptions(chunk_bytes=256 << 10, compression=Compression(mode="always"), sync=False)


class CountingBackend(FaultyBackend):
    """Records every read and counts the bytes read from data files."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.data_bytes = 0

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        n = super().readinto(name, offset, out)
        self.data_bytes += n  # only tensor data is read with readinto
        return n


def small_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {
        "model": model,
        "optim": opt,
        "step": 7,
        "extra": {"arr": np.arange(12, dtype=np.int32).reshape(3, 4), "<b>&": "x"},
    }


@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1024, 1024, generator=g)


@pytest.fixture(scope="module")
def raw_ckpt(tmp_path_factory: pytest.TempPathFactory, big: torch.Tensor) -> str:
    path = str(tmp_path_factory.mktemp("explore") / "raw")
    treeckpt.save({**small_state(), "big": big}, path, options=RAW_CHUNKS)
    return path


def test_open_reads_only_the_manifest_until_asked(raw_ckpt: str) -> None:
    backend = CountingBackend(open_backend(raw_ckpt))
    with treeckpt.open(backend) as ckpt:
        assert [c.op + " " + c.name for c in backend.reads] == ["read_file manifest.json"]
        h = ckpt["big"]
        assert (h.shape, h.dtype, h.nbytes, h.numel, h.ndim) == (
            (1024, 1024),
            "float32",
            4 << 20,
            1 << 20,
            2,
        )
        assert list(ckpt) == ["model", "optim", "step", "extra", "big"]
        assert ckpt.raw_bytes > h.nbytes
        assert len(backend.reads) == 1  # shapes, dtypes, names and raw sizes: manifest only
        assert h.stored_bytes == 4 << 20 and h.codecs == {"raw": 16}
        assert backend.data_bytes == 0  # indexes were read, no tensor data
        assert not [c for c in backend.reads if c.op == "readinto"]


def test_browse_by_fqn_prefix_and_path(raw_ckpt: str) -> None:
    state = small_state()
    with treeckpt.open(raw_ckpt) as ckpt:
        assert isinstance(ckpt, Checkpoint) and ckpt.world_size == 1 and ckpt.format_version == 1
        model = ckpt["model"]
        assert model.fqn == "model" and list(model) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        w = ckpt["model.0.weight"]
        assert isinstance(w, TensorHandle) and w is model["0.weight"]
        assert torch.equal(w.read(), state["model"][0].weight.detach())
        assert ckpt["optim"]["state"][0]["exp_avg_sq"].fqn == "optim.state.0.exp_avg_sq"
        assert ckpt["optim.state.0"]["step"].shape == ()
        assert ckpt["step"] == 7 and ckpt["extra.<b>&"] == "x"
        arr = ckpt["extra.arr"].read()
        assert isinstance(arr, np.ndarray) and np.array_equal(arr, state["extra"]["arr"])
        assert "model.0.bias" in ckpt and "0.bias" in model and "nope" not in ckpt
        assert set(ckpt["optim.state"].tensors()) == {
            f"optim.state.{i}.{k}" for i in range(4) for k in ("step", "exp_avg", "exp_avg_sq")
        }
        assert ckpt["optim.param_groups.0"].leaf_values()["optim.param_groups.0.lr"] == 1e-3
        tree = ckpt.tree
        assert tree["step"] == 7 and isinstance(tree["model"]["0.weight"], TensorHandle)
        with pytest.raises(
            LeafNotFoundError, match=r"'model\.0\.weights'.*did you mean 'model\.0\.weight'"
        ):
            ckpt["model.0.weights"]
        with pytest.raises(KeyError):
            model["nope"]


def test_fqns_in_saved_order_match_metadata(raw_ckpt: str) -> None:
    info = treeckpt.metadata(raw_ckpt)
    with treeckpt.open(raw_ckpt) as ckpt:
        assert set(ckpt.fqns()) == set(info.tensors) | set(info.values)
        assert ckpt.fqns()[:2] == ["model.0.weight", "model.0.bias"]
        assert ckpt.fqns()[-1] == "big"
        for fqn, t in info.tensors.items():
            h = ckpt[fqn]
            assert (h.stored_bytes, h.codecs, len(h.chunks)) == (t.stored_bytes, t.codecs, t.chunks)
        assert ckpt.files == info.files


@pytest.mark.parametrize(
    "index",
    [
        (slice(0, 10), 5),
        (slice(100, 300), slice(7, 9)),
        5,
        -1,
        (Ellipsis, 3),
        (slice(None, None, 7), slice(1, 1000, 3)),
        (slice(5, 5),),
        (slice(1000, 2000), -3),
        (),
        Ellipsis,
    ],
)
def test_slicing_is_bit_exact(raw_ckpt: str, big: torch.Tensor, index: Any) -> None:
    with treeckpt.open(raw_ckpt) as ckpt:
        got = ckpt["big"][index]
    want = big[index]
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("opts", [RAW_CHUNKS, ZSTD_CHUNKS], ids=["raw", "zstd"])
def test_slice_reads_only_the_chunks_that_cover_it(
    tmp_path: Path, big: torch.Tensor, opts: SaveOptions
) -> None:
    path = str(tmp_path / "ck")
    treeckpt.save({"big": big}, path, options=opts)
    backend = CountingBackend(open_backend(path))
    with treeckpt.open(backend) as ckpt:
        h = ckpt["big"]
        stored = h.stored_bytes
        plan = h.plan((slice(0, 10), 5))
        assert backend.data_bytes == 0  # the dry run reads nothing
        x = h[0:10, 5]
        assert torch.equal(x, big[0:10, 5])
        assert backend.data_bytes == plan.read_stored_bytes == ckpt.bytes_read
        # One chunk of 16 (raw: only the blocks it needs), whatever each chunk compressed to.
        assert 0 < backend.data_bytes <= stored // 10
        before = backend.data_bytes
        row = h[700]
        assert torch.equal(row, big[700])
        assert backend.data_bytes - before <= stored // 10
        if opts is RAW_CHUNKS:  # whole rows 0..9 are one run in the first 64 KiB block
            before = backend.data_bytes
            assert torch.equal(h[0:10], big[0:10])
            assert backend.data_bytes - before == 64 << 10


def test_damage_outside_the_slice_is_not_read_inside_it_is_named(
    tmp_path: Path, big: torch.Tensor
) -> None:
    path = tmp_path / "ck"
    treeckpt.save({"big": big}, str(path), options=RAW_CHUNKS)
    with treeckpt.open(str(path)) as ckpt:
        last = max(ckpt["big"].chunks, key=lambda c: c.box.offsets)
    with (path / last.file).open("r+b") as f:  # flip a byte in the last chunk (rows 960..1023)
        f.seek(last.offset + 100)
        b = f.read(1)
        f.seek(last.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    with treeckpt.open(str(path)) as ckpt:
        assert torch.equal(ckpt["big"][0:900], big[0:900])
        # Row 1000 lies in another 64 KiB block of the damaged chunk: still readable.
        assert torch.equal(ckpt["big"][1000], big[1000])
        with pytest.raises(CorruptChunkError, match=rf"{last.file}.*'big'.*checksum"):
            ckpt["big"][960]
        with pytest.raises(CorruptChunkError):
            ckpt["big"].stats()


def test_index_errors(raw_ckpt: str) -> None:
    with treeckpt.open(raw_ckpt) as ckpt:
        h = ckpt["big"]
        with pytest.raises(IndexError, match="out of bounds for dimension 0 with size 1024"):
            h[1024]
        with pytest.raises(IndexError, match="too many indices"):
            h[0, 0, 0]
        with pytest.raises(IndexError, match="positive slice steps"):
            h[::-1]
        with pytest.raises(TypeError, match="only ints, slices"):
            h[torch.tensor([1, 2])]
        with pytest.raises(IndexError, match="single ellipsis"):
            h[..., ...]


def _want_stats(t: torch.Tensor) -> dict[str, Any]:
    x = (t.abs() if t.is_complex() else t).to(torch.float64).reshape(-1)
    fin = x[torch.isfinite(x)]
    return {
        "numel": t.numel(),
        "finite": fin.numel(),
        "min": fin.min().item(),
        "max": fin.max().item(),
        "mean": fin.mean().item(),
        "std": fin.std().item() if fin.numel() > 1 else math.nan,
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
        "zeros": int((x == 0).sum()),
    }


def test_stats_match_torch_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    f32 = torch.randn(300, 200, generator=g) * 5 + 2
    f32[3, 4] = math.nan
    f32[10, 0] = math.inf
    f32[11, 1] = -math.inf
    f32[12, 2] = 0.0
    tensors = {
        "f32": f32,
        "bf16": (torch.randn(256, 64, generator=g) * 1e3).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (5000,), generator=g),
        "u8": torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(1000, generator=g) > 0.3,
        "c64": torch.randn(64, 3, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
    }
    path = str(tmp_path / "ck")
    treeckpt.save(tensors, path, options=SaveOptions(chunk_bytes=16 << 10, sync=False))
    with treeckpt.open(path) as ckpt:
        src = ckpt._src
        largest = max(c.raw_bytes for h in ckpt.tensors().values() for c in h.chunks)
        seen: list[int] = []
        real_read = src.read

        def spy(fqn: str, boxes: Any) -> Any:
            seen.append(sum(b.volume for b in boxes) * ckpt[fqn].torch_dtype.itemsize)
            return real_read(fqn, boxes)

        monkeypatch.setattr(src, "read", spy)
        for name, t in tensors.items():
            got = ckpt[name].stats(batch_bytes=20 << 10)
            assert isinstance(got, TensorStats)
            want = _want_stats(t)
            for k, v in want.items():
                assert getattr(got, k) == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), name
        assert len(seen) > len(tensors)  # read in several pieces
        assert max(seen) <= (20 << 10) + largest  # never the whole of a large tensor at once


def test_stats_of_empty_and_all_nan(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    treeckpt.save(
        {"empty": torch.empty(0, 3), "nan": torch.full((4,), math.nan), "one": torch.ones(1)},
        path,
        options=FAST,
    )
    with treeckpt.open(path) as ckpt:
        e = ckpt["empty"].stats()
        assert (e.numel, e.finite, e.min, e.mean, e.std) == (0, 0, None, None, None)
        n = ckpt["nan"].stats()
        assert (n.numel, n.nan, n.finite, n.max) == (4, 4, 0, None)
        o = ckpt["one"].stats()
        assert (o.min, o.max, o.mean) == (1.0, 1.0, 1.0) and o.std is not None and math.isnan(o.std)
        assert "nan 4" in str(n)


def test_memory_filesystem(big: torch.Tensor) -> None:
    url = f"memory://explore-{uuid.uuid4().hex}/ck"
    treeckpt.save({"big": big[:256], "step": 1}, url, options=ZSTD_CHUNKS)
    with treeckpt.open(url) as ckpt:
        assert ckpt["step"] == 1
        assert torch.equal(ckpt["big"][10:20, 3:5], big[10:20, 3:5])
        assert ckpt["big"].stats().max == pytest.approx(big[:256].max().item())


def test_pickled_leaves_need_opt_in(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    treeckpt.save({"obj": range(1, 3)}, path, options=FAST, allow_pickle=True)
    with treeckpt.open(path) as ckpt:
        with pytest.raises(UnsupportedLeafError, match="allow_pickle"):
            ckpt["obj"]
        assert ckpt.leaf_values()["obj"].startswith("<pickled object")
        assert "pickled object" in repr(ckpt)
    with treeckpt.open(path, allow_pickle=True) as ckpt:
        assert ckpt["obj"] == range(1, 3)


def test_text_and_html_views(raw_ckpt: str) -> None:
    with treeckpt.open(raw_ckpt) as ckpt:
        text = repr(ckpt)
        assert text.splitlines()[0].startswith(f"treeckpt checkpoint {ckpt.path}")
        assert "  big: float32[1024, 1024] 4 MiB -> 4 MiB (1.00x, raw)" in text
        assert "  step = 7" in text and "    0.weight: float32[16, 8]" in text
        assert repr(ckpt["model"]).startswith("treeckpt subtree 'model': 4 tensors")
        assert repr(ckpt["big"]).startswith("<tensor big float32[1024, 1024]: 4 MiB raw")
        page = ckpt._repr_html_()
        assert "<script" not in page and "<details open" in page
        assert page.count("<details") == page.count("</details>") == _groups(ckpt)
        assert "&lt;b&gt;&amp;" in page and "<b>&" not in page  # keys are escaped
        assert "exp_avg_sq" in page and "float32" in page and "[1024, 1024]" in page
        assert "big" in ckpt["big"]._repr_html_()
        short = ckpt.summary(max_lines=5).splitlines()
        assert len(short) == 7 and short[-1].strip().startswith("...")
        assert len(ckpt.summary().splitlines()) > 40


def _groups(g: Any) -> int:
    from treeckpt.explore import Group

    return sum(1 + _groups(c) for c in g.values() if isinstance(c, Group))


def _save_sharded(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(64 * 6, dtype=torch.float32).reshape(64, 6)
    w = distribute_tensor(full, mesh, [Shard(0)])
    treeckpt.save({"w": w, "step": 3}, path, options=SaveOptions(chunk_bytes=512, sync=False))


@pytest.mark.distributed
def test_multi_rank_layout_and_reads(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    run_ranks(2, _save_sharded, tmp_path, path)
    full = torch.arange(64 * 6, dtype=torch.float32).reshape(64, 6)
    with treeckpt.open(path) as ckpt:
        assert ckpt.world_size == 2
        h = ckpt["w"]
        layout = h.layout
        assert sorted(layout) == [0, 1]
        assert all(b.offsets[0] < 32 for b in layout[0]) and all(
            b.offsets[0] >= 32 for b in layout[1]
        )
        assert sum(b.volume for bs in layout.values() for b in bs) == full.numel()
        assert torch.equal(h[30:34], full[30:34]) and torch.equal(h.read(), full)
        assert "2 writer rank(s)" in repr(h)


def test_open_nothing_and_html_cap(
    tmp_path: Path, raw_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint here"):
        treeckpt.open(tmp_path / "nothing")
    from treeckpt.explore import _display

    monkeypatch.setattr(_display, "MAX_HTML_LEAVES", 3)
    with treeckpt.open(raw_ckpt) as ckpt:
        page = ckpt._repr_html_()
        total = len(ckpt.fqns())
    assert page.count("<tr title=") == 3
    assert f"... {total - 3} more leaves not shown" in page

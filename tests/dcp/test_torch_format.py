"""Reading checkpoints torch's own DCP wrote: real ones, written here by ``torch.distributed.checkpoint.save``.

Values are compared bit for bit with what was saved; hostile files get a clean
CheckpointError naming the file and the class or FQN, and never run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as tdcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import treeckpt
import treeckpt.dcp as dcp
import treeckpt.dcp._torch_format as tf
from tests.dist_utils import run_ranks
from treeckpt import Box, CheckpointError, LoadMismatchError, ManifestError
from treeckpt.dcp.format_utils import dcp_to_treeckpt, treeckpt_to_dcp
from treeckpt.dcp.state_dict import get_state_dict
from treeckpt.testing import assert_same_tree


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    return m.to(torch.bfloat16)


def _full(v: Any) -> Any:
    if isinstance(v, DTensor):
        return v.full_tensor()
    if isinstance(v, dict):
        return {k: _full(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_full(x) for x in v]
    return v.clone() if isinstance(v, torch.Tensor) else v


def model_mesh(world: int) -> Any:
    return init_device_mesh("cpu", (world,))


def _fsdp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _dcp_save_fsdp(rank: int, world: int, path: str, zstd: bool) -> Any:
    """torch's DCP saves an FSDP2 bf16 model, nested FQN-keyed optimizer state, bytes and values."""
    model = _fsdp(_model(), world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    model(torch.randn(4, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    torch.manual_seed(2)
    cols = distribute_tensor(torch.randn(5, 7, dtype=torch.float64), model_mesh(world), [Shard(1)])
    state = {
        "model": msd,
        "optim": osd,
        "cols": cols,  # uneven column shards: 4 + 3
        "extra": {"step": 7, "blob": b"\x00\xffbytes", "names": ["a", "b"], "loss": 0.25},
    }
    writer = tdcp.FileSystemWriter(path, _extensions=[ZStandard()] if zstd else None)
    tdcp.save(state, storage_writer=writer)
    return _full(state)


@pytest.fixture(scope="module", params=[False, True], ids=["raw", "zstd"])
def fsdp_ckpt(request: Any, tmp_path_factory: Any) -> tuple[str, Any]:
    tmp = tmp_path_factory.mktemp("dcp")
    path = str(tmp / "ckpt")
    full = run_ranks(2, _dcp_save_fsdp, tmp, path, request.param)[0]
    return path, full


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


@pytest.mark.distributed
def test_metadata_restore_and_region_reads(fsdp_ckpt: tuple[str, Any], monkeypatch: Any) -> None:
    path, full = fsdp_ckpt
    ckpt = tf.read_dcp_metadata(path)
    w = ckpt.tensors["model.0.weight"]
    assert (w.dtype, w.shape, len(w.chunks)) == ("bfloat16", (6, 8), 2)  # one chunk per rank
    assert ckpt.tensors["optim.state.2.weight.exp_avg"].shape == (5, 6)
    assert [b.sizes for b, _ in ckpt.tensors["cols"].chunks] == [(5, 4), (5, 3)]
    assert set(ckpt.values) >= {"extra.step", "extra.blob", "extra.names", "extra.loss"}
    assert_same_tree(full, tf.restore_dcp(path))
    assert tf.read_dcp_value(ckpt, "extra.blob") == b"\x00\xffbytes"

    # A box inside rank 1's chunk reads that chunk only.
    reads: list[str] = []
    real = tf._read_item
    monkeypatch.setattr(
        tf, "_read_item", lambda c, item, fqn, lim: reads.append(fqn) or real(c, item, fqn, lim)
    )
    got = tf.read_dcp_tensor(ckpt, "model.0.weight", Box(offsets=(4, 2), sizes=(2, 5)))
    assert_same_tree(full["model"]["0.weight"][4:6, 2:7], got)
    assert len(reads) == 1
    # Boxes across both chunks, along dim 0 (FSDP2) and dim 1 (Shard(1)).
    got = tf.read_dcp_tensor(ckpt, "model.0.weight", Box(offsets=(1, 0), sizes=(4, 8)))
    assert_same_tree(full["model"]["0.weight"][1:5], got)
    got = tf.read_dcp_tensor(ckpt, "cols", Box(offsets=(1, 3), sizes=(3, 2)))
    assert_same_tree(full["cols"][1:4, 3:5], got)
    assert len(reads) == 5


def _load_resharded(rank: int, world: int, path: str) -> Any:
    model = _fsdp(_model(), world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    extra = {"step": 0, "blob": b"", "names": [], "loss": 0.0}
    cols = distribute_tensor(torch.zeros(5, 7, dtype=torch.float64), model_mesh(world), [Shard(1)])
    got = tf.load_dcp({"model": msd, "optim": osd, "cols": cols, "extra": extra}, path)
    assert isinstance(got["model"]["0.weight"], DTensor)
    assert got["cols"] is cols and cols.to_local().shape == (5, [3, 3, 1][rank])
    return _full(got)


@pytest.mark.distributed
def test_load_into_a_sharded_template_on_another_world_size(
    fsdp_ckpt: tuple[str, Any], tmp_path: Path
) -> None:
    path, full = fsdp_ckpt
    for got in run_ranks(3, _load_resharded, tmp_path, path):
        assert_same_tree(full, got)
    # One process, plain model: same values.
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    got = tf.load_dcp({"model": msd, "optim": osd, "extra": {}}, path, strict=False)
    assert_same_tree(full["model"], dict(got["model"]))


def _facade_load(rank: int, world: int, path: str) -> list[Any]:
    """``treeckpt.dcp.load`` on a torch-written directory: the default reader and planner,
    then torch's own planner through an explicit FileSystemReader."""
    got = []
    for planner in (None, tdcp.DefaultLoadPlanner()):
        model = _fsdp(_model(), world)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        msd, osd = get_state_dict(model, opt)
        extra = {"step": 0, "blob": b"", "names": [], "loss": 0.0}
        cols = distribute_tensor(
            torch.zeros(5, 7, dtype=torch.float64), model_mesh(world), [Shard(1)]
        )
        state = {"model": msd, "optim": osd, "cols": cols, "extra": extra}
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=planner)
        assert state["cols"] is cols and isinstance(msd["0.weight"], DTensor)
        assert cols.to_local().shape == (5, [3, 3, 1][rank])
        got.append(_full(state))
    return got


@pytest.mark.distributed
def test_facade_load_on_another_world_size(fsdp_ckpt: tuple[str, Any], tmp_path: Path) -> None:
    """torch saved on 2 FSDP2 ranks; ``treeckpt.dcp.load`` on 3 reshards, bit for bit."""
    path, full = fsdp_ckpt
    for per_rank in run_ranks(3, _facade_load, tmp_path, path):
        for got in per_rank:
            assert_same_tree(full, got)


@pytest.mark.distributed
def test_convert_to_treeckpt_and_back(fsdp_ckpt: tuple[str, Any], tmp_path: Path) -> None:
    path, full = fsdp_ckpt
    dcp_to_treeckpt(path, tmp_path / "tc")
    assert_same_tree(full, treeckpt.restore(tmp_path / "tc"))
    treeckpt_to_dcp(tmp_path / "tc", tmp_path / "back")
    # torch's own DCP reads the way back.
    template = tf.restore_dcp(path)
    zeroed = _flat(template)
    for v in zeroed.values():
        if isinstance(v, torch.Tensor):
            v.zero_()
    tdcp.load(template, checkpoint_id=str(tmp_path / "back"), no_dist=True)
    assert_same_tree(_flat(full), _flat(template))
    assert_same_tree(full, tf.restore_dcp(tmp_path / "back"))


def test_single_process_values_and_nesting(tmp_path: Path) -> None:
    state = {
        "t": torch.arange(12, dtype=torch.float64).reshape(3, 4),
        "scalar": torch.tensor(3, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "nested": {"layers": [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], "lr": 0.1, "name": "x"},
        "none": None,
    }
    tdcp.save(state, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    assert_same_tree(state, tf.restore_dcp(tmp_path / "c"))
    template = {
        "t": torch.zeros(3, 4, dtype=torch.float64),
        "scalar": torch.tensor(0, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "nested": {"layers": [{"w": torch.zeros(2)}, {"w": torch.ones(2)}], "lr": 0.0, "name": ""},
        "none": 1,
    }
    assert_same_tree(state, tf.load_dcp(template, tmp_path / "c"))
    bad = {**template, "t": torch.zeros(3, 4, dtype=torch.float32), "more": 1}
    with pytest.raises(
        LoadMismatchError, match=r"t \(template float32\[3, 4\], checkpoint float64\[3, 4\]\).*"
    ) as ei:
        tf.load_dcp(bad, tmp_path / "c")
    assert ei.value.missing == ("more",)
    assert tf.is_dcp_checkpoint(tmp_path / "c") and not tf.is_dcp_checkpoint(tmp_path)


# --- hostile checkpoints -------------------------------------------------------------------


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned > /dev/null",))


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "c"
    tdcp.save({"w": torch.ones(4, 2), "v": {"k": 1}}, checkpoint_id=str(path), no_dist=True)
    return path


def _rewrite_metadata(path: Path, edit: Any) -> None:
    md = pickle.loads((path / ".metadata").read_bytes())  # our own test file
    edit(md)
    (path / ".metadata").write_bytes(pickle.dumps(md))


def test_metadata_with_a_foreign_class_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _rewrite_metadata(path, lambda md: setattr(md, "planner_data", _Evil()))
    with pytest.raises(ManifestError, match=r"\.metadata: refusing to load posix\.system"):
        tf.read_dcp_metadata(path)


def test_value_that_needs_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    tdcp.save({"w": torch.ones(2), "obj": _Evil()}, checkpoint_id=str(path), no_dist=True)
    ckpt = tf.read_dcp_metadata(path)
    with pytest.raises(
        CheckpointError, match=r"__0_0\.distcp: 'obj' holds an object that needs pickle"
    ):
        tf.read_dcp_value(ckpt, "obj")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: _StorageInfo("../escape", i.offset, i.length), "not a plain relative name"),
        (lambda i: _StorageInfo("/etc/passwd", i.offset, i.length), "not a plain relative name"),
        (lambda i: _StorageInfo(i.relative_path, i.offset, 10**12), "lie past the end"),
        (lambda i: _StorageInfo(i.relative_path, -1, i.length), "bad byte range"),
        (
            lambda i: _StorageInfo(i.relative_path, i.offset, i.length, ["stream.evil/1"]),
            "unsupported stream transform",
        ),
    ],
)
def test_storage_entries_are_checked(tmp_path: Path, edit: Any, message: str) -> None:
    path = _saved(tmp_path)

    def change(md: Any) -> None:
        key = next(k for k in md.storage_data if k.fqn == "w")
        md.storage_data[key] = edit(md.storage_data[key])

    _rewrite_metadata(path, change)
    with pytest.raises(ManifestError, match=rf"'w': .*{message}"):
        tf.read_dcp_metadata(path)


def test_chunks_must_tile_and_match_their_item(tmp_path: Path) -> None:
    path = _saved(tmp_path)

    def gap(md: Any) -> None:
        md.state_dict_metadata["w"].chunks[0].sizes = torch.Size([3, 2])

    _rewrite_metadata(path, gap)
    with pytest.raises(ManifestError, match=r"\.metadata: .*w"):
        tf.read_dcp_metadata(path)

    path = _saved(tmp_path / "x")
    data = path / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    ckpt = tf.read_dcp_metadata(path)
    item = ckpt.tensors["w"].chunks[0][1]
    raw[item.offset : item.offset + item.length] = bytes(item.length)  # zeroed page
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: 'w'"):
        tf.read_dcp_tensor(ckpt, "w")


def test_zstd_bomb_is_bounded(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    path = _saved(tmp_path)
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    with open(path / "__0_0.distcp", "ab") as f:
        offset = f.tell()
        f.write(bomb)

    def change(md: Any) -> None:
        key = next(k for k in md.storage_data if k.fqn == "w")
        md.storage_data[key] = _StorageInfo("__0_0.distcp", offset, len(bomb), ["stream.zstd/1"])

    _rewrite_metadata(path, change)
    ckpt = tf.read_dcp_metadata(path)
    with pytest.raises(CheckpointError, match=r"'w' decompresses to more than"):
        tf.read_dcp_tensor(ckpt, "w")


def test_missing_metadata(tmp_path: Path) -> None:
    with pytest.raises(treeckpt.CheckpointNotFoundError, match=r"no DCP checkpoint"):
        tf.read_dcp_metadata(tmp_path)


def test_malformed_paths_are_bounded(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _rewrite_metadata(path, lambda md: md.planner_data.update({"w": ("w", 10**9)}))
    with pytest.raises(ManifestError, match=r"'w': malformed path"):
        tf.read_dcp_metadata(path)


def test_fsspec_url_and_stateful_template(tmp_path: Path) -> None:
    import fsspec

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    tdcp.save(
        {"model": model.state_dict(), "step": 4}, checkpoint_id=str(tmp_path / "c"), no_dist=True
    )
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "c"), "/dcp-url-test", recursive=True)
    try:
        assert tf.is_dcp_checkpoint("memory://dcp-url-test")
        fresh = torch.nn.Linear(3, 2)
        got = tf.load_dcp({"model": fresh, "step": 0}, "memory://dcp-url-test")
        assert got["model"] is fresh and got["step"] == 4
        assert_same_tree(dict(model.state_dict()), dict(fresh.state_dict()))
    finally:
        fs.rm("/dcp-url-test", recursive=True)

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
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import treeckpt
import treeckpt.formats.torch_dcp.reader as tf
from tests.dist_utils import run_ranks
from tests.torch_dcp_utils import fsdp_of, full_of, make_model, model_mesh
from treeckpt import Box, CheckpointError, LoadMismatchError, ManifestError
from treeckpt.dcp.state_dict import get_state_dict
from treeckpt.testing import assert_same_tree


@pytest.mark.distributed
def test_metadata_restore_and_region_reads(
    fsdp_dcp_ckpt: tuple[str, Any], monkeypatch: Any
) -> None:
    path, full = fsdp_dcp_ckpt
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
    model = fsdp_of(make_model(), world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    extra = {"step": 0, "blob": b"", "names": [], "loss": 0.0}
    cols = distribute_tensor(torch.zeros(5, 7, dtype=torch.float64), model_mesh(world), [Shard(1)])
    got = tf.load_dcp({"model": msd, "optim": osd, "cols": cols, "extra": extra}, path)
    assert isinstance(got["model"]["0.weight"], DTensor)
    assert got["cols"] is cols and cols.to_local().shape == (5, [3, 3, 1][rank])
    return full_of(got)


@pytest.mark.distributed
def test_load_into_a_sharded_template_on_another_world_size(
    fsdp_dcp_ckpt: tuple[str, Any], tmp_path: Path
) -> None:
    path, full = fsdp_dcp_ckpt
    for got in run_ranks(3, _load_resharded, tmp_path, path):
        assert_same_tree(full, got)
    # One process, plain model: same values.
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    got = tf.load_dcp({"model": msd, "optim": osd, "extra": {}}, path, strict=False)
    assert_same_tree(full["model"], dict(got["model"]))


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

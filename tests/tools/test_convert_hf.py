"""``treeckpt convert --to hf`` and from a Hugging Face folder, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import treeckpt
from treeckpt.tools import cli
from treeckpt.tools.convert import convert, detect_format


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    odd = torch.randn(7, 3, generator=g)
    odd[0, 0], odd[1, 1], odd[2, 2] = float("nan"), float("inf"), -0.0
    return {
        "model.embed.weight": torch.randn(40, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.w": torch.randn(16, 16, generator=g),
        "model.layers.0.b": torch.arange(16, dtype=torch.int64),
        "model.norm": odd,
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8)), k


def test_treeckpt_to_hf_folder_and_back(tmp_path: Path) -> None:
    tensors = _tensors()
    tree = {"model": {"embed": {"weight": tensors["model.embed.weight"]}}, "step": 7}
    tree["model"]["layers"] = [{"w": tensors["model.layers.0.w"], "b": tensors["model.layers.0.b"]}]
    tree["model"]["norm"] = tensors["model.norm"]
    tree["scalar"] = tensors["scalar"]
    treeckpt.save(tree, str(tmp_path / "ck"))
    res = convert(tmp_path / "ck", tmp_path / "hf", to="hf", max_shard_size=1500)
    assert res.dropped == ("step",) and res.tensors == 5
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    # 1280 bytes of embedding fill file 1; the other 1244 bytes fit in file 2.
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    assert index["weight_map"] == {
        k: first if k == "model.embed.weight" else second for k in tensors
    }
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    got: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(tmp_path / "hf" / f)
        assert all(index["weight_map"][k] == f for k in part)
        got.update(part)
    _same(got, tensors)
    assert detect_format(tmp_path / "hf") == "hf"
    convert(tmp_path / "hf", tmp_path / "back", to="treeckpt")
    back = treeckpt.restore(str(tmp_path / "back"))
    _same(back, tensors)


def test_cli_from_a_transformers_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    )
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    want: dict[str, torch.Tensor] = {}
    for f in (tmp_path / "src").glob("*.safetensors"):
        want.update(load_file(f))
    assert (
        cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "ck"), "--to", "treeckpt"]) == 0
    )
    assert "(hf)" in capsys.readouterr().out
    _same(treeckpt.restore(str(tmp_path / "ck")), want)
    rc = cli.main(
        [
            "convert",
            str(tmp_path / "ck"),
            str(tmp_path / "again"),
            "--to",
            "hf",
            "--max-shard-size",
            "8KiB",
        ]
    )
    assert rc == 0
    again: dict[str, torch.Tensor] = {}
    for f in (tmp_path / "again").glob("*.safetensors"):
        again.update(load_file(f))
    _same(again, want)


def test_pieces_of_a_distributed_save_convert_whole(tmp_path: Path) -> None:
    import treeckpt.dcp as dcp

    w = torch.randn(6, 4)
    dcp.save(
        {"w": w, "n": torch.arange(3)},
        storage_writer=dcp.HuggingFaceStorageWriter(
            str(tmp_path / "pieces"), save_distributed=True
        ),
        no_dist=True,
    )
    assert detect_format(tmp_path / "pieces") == "hf"
    convert(tmp_path / "pieces", tmp_path / "ck", to="treeckpt")
    _same(treeckpt.restore(str(tmp_path / "ck")), {"w": w, "n": torch.arange(3)})

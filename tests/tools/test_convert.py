"""``treeckpt convert``: every source format, round trips bit for bit, overwrite rules."""

from __future__ import annotations

import json
import math
import sys
import types
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import treeckpt
from treeckpt import SaveOptions
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.tree import flatten_tree
from treeckpt.errors import CheckpointError
from treeckpt.formats.torch_dcp import restore_dcp
from treeckpt.tools import cli
from treeckpt.tools.convert import convert, detect_format
from treeckpt.tools.diff import diff

FAST = SaveOptions(sync=False)


def state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    odd = torch.randn(7, 3)
    odd[0, 0], odd[1, 1], odd[2, 2] = math.nan, math.inf, -0.0
    return {
        "model": model,
        "optim": opt,
        "step": 12,
        "extra": {
            "bf16": torch.randn(33).to(torch.bfloat16),
            "odd": odd,
            "i64": torch.arange(-5, 5),
            "flags": torch.tensor([True, False, True]),
        },
    }


def tensors_of(tree: Any) -> dict[str, torch.Tensor]:
    flat = flatten_tree(tree, allow_pickle=True)
    out = {}
    for fqn, rec in flat.records.items():
        if isinstance(rec, TensorLeaf):
            v = flat.leaves[fqn]
            out[fqn] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
    return out


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for fqn in a:
        x, y = a[fqn].detach(), b[fqn].detach()
        assert (x.dtype, x.shape) == (y.dtype, y.shape), fqn
        assert torch.equal(
            x.contiguous().reshape(-1).view(torch.uint8),
            y.contiguous().reshape(-1).view(torch.uint8),
        ), fqn


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    treeckpt.save(state(), str(path), options=FAST)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["convert", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_to_safetensors_writes_tensor_leaves_by_fqn(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "model.safetensors"
    code, out, err = run([str(src), str(dst), "--to", "safetensors"], capsys)
    assert code == 0, err
    assert "(treeckpt) ->" in out and "(safetensors): 20 tensors" in out
    assert "dropped 17 non-tensor leaves (safetensors): optim.param_groups.0.lr," in out
    got = load_file(str(dst))
    assert_bit_exact(got, tensors_of(treeckpt.restore(str(src))))
    assert detect_format(dst) == "safetensors"
    # And back: a safetensors file is a source too.
    back = tmp_path / "back"
    assert cli.main(["convert", str(dst), str(back), "--to", "treeckpt"]) == 0
    assert_bit_exact(tensors_of(treeckpt.restore(str(back))), got)


def test_treeckpt_dcp_treeckpt_round_trip(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "dcp"
    assert run([str(src), str(d), "--to", "dcp"], capsys)[0] == 0
    assert (d / ".metadata").is_file() and detect_format(d) == "dcp"
    # torch reads what we wrote, bit for bit.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_torch = _load_state_dict_from_keys(checkpoint_id=str(d))
    assert_bit_exact(tensors_of(by_torch), tensors_of(treeckpt.restore(str(src))))
    assert by_torch["step"] == 12
    # Reading DCP runs no pickle: no flag is needed (--allow-pickle is still accepted).
    for flags in ([], ["--allow-pickle"]):
        back = tmp_path / f"back{len(flags)}"
        code, _out, err = run([str(d), str(back), "--to", "treeckpt", *flags], capsys)
        assert code == 0, err
        report = diff(str(src), str(back))
        assert report.identical, [e for e in report.entries if e.status != "same"]


def test_dcp_written_by_torch_converts_bit_exact(tmp_path: Path) -> None:
    sd = {
        "w": torch.randn(17, 4).to(torch.float16),
        "nested": {"b": torch.arange(10, dtype=torch.int32), "lr": 0.5},
    }
    d = tmp_path / "torch-dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(d), no_dist=True)
    out = tmp_path / "ck"
    res = convert(d, out, to="treeckpt", save_options=FAST)
    assert (res.src_format, res.dst_format, res.tensors) == ("dcp", "treeckpt", 2)
    got = treeckpt.restore(str(out))
    assert got["nested"]["lr"] == 0.5
    assert_bit_exact(tensors_of(got), tensors_of(sd))


def test_damaged_dcp_source_is_a_checkpoint_error(tmp_path: Path) -> None:
    d = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.randn(64, 64)}, checkpoint_id=str(d), no_dist=True)
    for f in d.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # truncated data files
    with pytest.raises(CheckpointError, match=r"dcp/\.metadata: 'w': bytes .* lie past the end"):
        convert(d, tmp_path / "out", to="treeckpt")
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self) -> Any:
        return (print, ("ran",))


def test_dcp_value_that_needs_pickle_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "obj": _Evil()}, checkpoint_id=str(d), no_dist=True)
    for allow_pickle in (False, True):  # the flag does not open DCP values to pickle
        with pytest.raises(CheckpointError, match=r"'obj' holds an object that needs pickle"):
            convert(d, tmp_path / "out", to="treeckpt", allow_pickle=allow_pickle)
    assert not (tmp_path / "out").exists()


def test_torch_save_file_source(tmp_path: Path) -> None:
    sd = {"a": torch.randn(4, 4).bfloat16(), "b": [torch.arange(3), 7], "c": "text"}
    f = tmp_path / "model.pt"
    torch.save(sd, f)
    assert detect_format(f) == "torch"
    out = tmp_path / "ck"
    convert(f, out, to="treeckpt", save_options=FAST)
    got = treeckpt.restore(str(out))
    assert got["b"][1] == 7 and got["c"] == "text"
    assert_bit_exact(tensors_of(got), tensors_of(sd))
    # torch -> safetensors and torch -> torch (a plain torch.save, atomically replaced)
    st = tmp_path / "m.safetensors"
    res = convert(f, st, to="safetensors")
    assert res.dropped == ("b.1", "c")
    assert_bit_exact(load_file(str(st)), {"a": sd["a"], "b.0": sd["b"][0]})
    t2 = tmp_path / "copy.pt"
    convert(f, t2, to="torch")
    assert_bit_exact(tensors_of(torch.load(t2, weights_only=True)), tensors_of(sd))


def test_tied_weights_to_safetensors(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    f = tmp_path / "tied.pt"
    torch.save({"embed.weight": emb, "head.weight": emb, "head.bias": torch.zeros(10)}, f)
    st = tmp_path / "tied.safetensors"
    res = convert(f, st, to="safetensors")
    got = load_file(str(st))
    assert res.tensors == 3 and torch.equal(got["embed.weight"], emb)
    assert torch.equal(got["head.weight"], emb)


def test_trees_dcp_cannot_hold_are_checkpoint_errors(tmp_path: Path) -> None:
    from collections import namedtuple

    point = namedtuple("point", ["x", "y"])
    # A tuple holding tensors is walked, as DCP does; it comes back as a list.
    src = tmp_path / "nt"
    treeckpt.save({"p": point(torch.ones(2), 3)}, str(src), options=FAST)
    convert(src, tmp_path / "ok", to="dcp")
    back = restore_dcp(tmp_path / "ok")
    assert torch.equal(back["p"][0], torch.ones(2)) and back["p"][1] == 3
    # A tuple of plain values is one value: restore() rebuilds the namedtuple as a
    # fresh type, which torch.save cannot pickle.
    src = tmp_path / "plain"
    treeckpt.save({"q": point(1, 2)}, str(src), options=FAST)
    with pytest.raises(CheckpointError, match="DCP cannot write this checkpoint"):
        convert(src, tmp_path / "d", to="dcp")
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.")]


def test_torch_file_with_code_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "evil.pt"
    torch.save({"obj": types.SimpleNamespace(x=1)}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights_only=True"):
        convert(f, tmp_path / "out", to="treeckpt")
    assert not (tmp_path / "out").exists()


def test_to_torch_from_treeckpt_calls_consolidate(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Any, ...]] = []
    fake = types.ModuleType("treeckpt.tools.consolidate")

    def consolidate(s: str, d: str, *, max_memory: int | None, overwrite: bool) -> None:
        calls.append((s, d, max_memory, overwrite))
        Path(d).write_bytes(b"x")

    fake.consolidate = consolidate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "treeckpt.tools.consolidate", fake)
    dst = tmp_path / "full.pt"
    code, out, err = run(
        [str(src), str(dst), "--to", "torch", "--max-memory", "1.5GiB", "--json"], capsys
    )
    assert code == 0, err
    assert calls == [(str(src), str(dst), 3 << 29, False)]
    doc = json.loads(out)
    assert doc["dst_format"] == "torch" and doc["tensors"] == 20
    code, _, err = run([str(src), str(dst), "--to", "torch"], capsys)
    assert code == 2 and "already exists" in err and len(calls) == 1
    assert run([str(src), str(dst), "--to", "torch", "--overwrite"], capsys)[0] == 0
    assert calls[-1][3] is True


@pytest.mark.parametrize("to", ["treeckpt", "dcp", "safetensors"])
def test_existing_destination_is_refused_without_overwrite(
    src: Path, tmp_path: Path, to: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _out, err = run([str(src), str(dst), "--to", to], capsys)
    assert code == 2 and f"{dst} already exists" in err and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "mine"
    code, _, err = run([str(src), str(dst), "--to", to, "--overwrite"], capsys)
    assert code == 0, err
    assert detect_format(dst) == to
    # dcp and safetensors replace DST whole; treeckpt saves into the directory beside other files.
    assert (dst / "keep.txt").exists() is (to == "treeckpt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]  # no temporaries left


def test_empty_directory_and_url_destinations(src: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(src, empty, to="treeckpt", save_options=FAST)
    url = f"memory://convert-{uuid.uuid4().hex}/ck"
    convert(src, url, to="treeckpt", save_options=FAST)
    assert diff(str(src), url).identical and diff(str(src), str(empty)).identical
    with pytest.raises(CheckpointError, match="already exists"):
        convert(src, url, to="treeckpt")
    with pytest.raises(CheckpointError, match="only treeckpt checkpoints can be written to URLs"):
        convert(src, f"memory://convert-{uuid.uuid4().hex}/x.safetensors", to="safetensors")


def test_bad_sources_and_arguments(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run([str(tmp_path / "nothing"), str(tmp_path / "x"), "--to", "dcp"], capsys)
    assert code == 2 and "no such file or directory" in err
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a checkpoint")
    code, _, err = run([str(junk), str(tmp_path / "x"), "--to", "dcp"], capsys)
    assert code == 2 and "not a treeckpt, DCP, torch.save or safetensors checkpoint" in err
    code, _, err = run([str(src), str(src), "--to", "treeckpt", "--overwrite"], capsys)
    assert code == 2 and "the destination is the source" in err
    code, _, err = run([str(src), str(tmp_path / "x"), "--to", "onnx"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = run(
        [str(src), str(tmp_path / "x"), "--to", "torch", "--max-memory", "lots"], capsys
    )
    assert code == 2 and "not a size" in err


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "--to {treeckpt,dcp,torch,safetensors,hf}",
        "--overwrite",
        "--allow-pickle",
        "examples:",
    ):
        assert needle in out

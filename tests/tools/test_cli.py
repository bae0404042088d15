"""The ``treeckpt`` command: inspect, verify and diff, run in-process through ``main(argv)``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import treeckpt
from treeckpt import Compression, SaveOptions
from treeckpt.core.manifest import ChunkRef
from treeckpt.store.backends import open_backend
from treeckpt.store.decode import ChunkDecoder
from treeckpt.store.reader import read_indexes, read_manifest
from treeckpt.tools import cli
from treeckpt.tools.cli import _output as cli_output
from treeckpt.tools.verify import check_chunk

FAST = SaveOptions(sync=False)
SMALL_CHUNKS = SaveOptions(chunk_bytes=4096, compression=Compression(mode="always"), sync=False)


def model_state(seed: int = 0) -> dict[str, Any]:
    """A small model and its AdamW optimizer after one step, plus a few values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {"model": model, "optim": opt, "step": 10, "loss": 0.25, "name": "run-1"}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def chunks_of(path: Path) -> list[ChunkRef]:
    backend = open_backend(str(path))
    try:
        manifest = read_manifest(backend)
        return [c for ix in read_indexes(backend, manifest) for c in ix.chunks]
    finally:
        backend.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    treeckpt.save(model_state(), str(path), options=FAST)
    return path


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved checkpoint, free to damage."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


# ------------------------------------------------------------------ inspect


def test_inspect_lists_fqns_shapes_dtypes_values_and_totals(
    saved: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["inspect", str(saved)], capsys)
    assert code == 0
    assert "model.0.weight" in out and "[16, 8]" in out and "float32" in out
    assert "optim.state.3.exp_avg_sq" in out
    assert "optim.param_groups.0.lr" in out and "0.001" in out
    assert "'run-1'" in out
    info = treeckpt.metadata(str(saved))
    assert f"save {info.save_id}" in out
    assert f"total: {len(info.tensors)} tensors" in out
    # tree order: the model's tensors come before the optimizer's
    assert out.index("model.0.weight") < out.index("optim.state.0.exp_avg")


def test_inspect_json_is_one_document_with_every_leaf(
    saved: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["inspect", str(saved), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    info = treeckpt.metadata(str(saved))
    tensors = {t["fqn"]: t for t in doc["tensors"]}
    assert set(tensors) == set(info.tensors)
    w = tensors["model.0.weight"]
    assert w["shape"] == [16, 8] and w["dtype"] == "float32" and w["raw_bytes"] == 16 * 8 * 4
    assert w["chunks"] >= 1 and sum(w["codecs"].values()) == w["chunks"]
    values = {v["fqn"]: v for v in doc["values"]}
    assert values["step"] == {"fqn": "step", "type": "int", "value": 10, "repr": "10"}
    assert doc["totals"]["raw_bytes"] == info.raw_bytes
    assert doc["totals"]["stored_bytes"] == info.stored_bytes
    assert doc["totals"]["files"] == len(info.files) and doc["save_id"] == info.save_id


def test_inspect_filter_matches_fqn_globs(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(saved), "--filter", "model.*"], capsys)
    assert code == 0
    assert "model.0.weight" in out and "model.2.bias" in out
    assert "optim.state" not in out and "step" not in out.split("shown:")[0]
    assert "shown: 4 tensors" in out
    code, out, _ = run(
        ["inspect", str(saved), "--json", "--filter", "*.exp_avg", "--filter", "step"], capsys
    )
    doc = json.loads(out)
    assert {t["fqn"] for t in doc["tensors"]} == {f"optim.state.{i}.exp_avg" for i in range(4)}
    assert [v["fqn"] for v in doc["values"]] == ["step"]


def test_inspect_on_a_terminal_prints_a_rich_table(
    saved: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_output, "is_terminal", lambda stream: True)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(["inspect", str(saved), "--filter", "model.0.*", "--filter", "step"], capsys)
    assert code == 0
    assert "model.0.weight" in out and "codecs" in out and "─" in out
    assert "values" in out and "total:" in out


def test_inspect_values_that_json_cannot_hold(
    tmp_ckpt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = {"nan": float("nan"), "inf": -math.inf, "blob": b"\x00\x01", "none": None}
    treeckpt.save(tree, tmp_ckpt, options=FAST)
    code, out, _ = run(["inspect", tmp_ckpt, "--json"], capsys)
    assert code == 0
    values = {v["fqn"]: v for v in json.loads(out)["values"]}
    assert values["nan"]["value"] == "nan" and values["inf"]["value"] == "-inf"
    assert values["blob"]["type"] == "bytes" and values["none"]["value"] is None


def test_inspect_without_a_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["inspect", str(tmp_path / "nothing")], capsys)
    assert code == 2 and out == ""
    assert "no checkpoint here" in err


# ------------------------------------------------------------------ verify


def test_verify_intact_checkpoint_exits_0(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["verify", str(saved)], capsys)
    assert code == 0
    assert out.startswith("OK:")
    code, out, _ = run(["verify", str(saved), "--json", "--threads", "1"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["problems"] == []
    assert doc["chunks"] == doc["chunks_ok"] == len(chunks_of(saved))


def test_verify_flipped_byte_names_file_offset_and_fqn(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = next(c for c in chunks_of(ckpt) if c.fqn == "model.0.weight")
    data = ckpt / c.file
    raw = bytearray(data.read_bytes())
    raw[c.offset + c.length // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    code, out, _ = run(["verify", str(ckpt)], capsys)
    assert code == 1
    assert out.startswith("DAMAGED")
    assert f"{c.file} at offset {c.offset}" in out and "model.0.weight" in out
    assert "checksum mismatch" in out
    code, out, _ = run(["verify", str(ckpt), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert [(p["file"], p["offset"], p["fqn"]) for p in doc["problems"]] == [
        (c.file, c.offset, "model.0.weight")
    ]
    assert doc["chunks_ok"] == doc["chunks"] - 1


def test_verify_truncated_data_file(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chunks = chunks_of(ckpt)
    last = max(chunks, key=lambda c: (c.file, c.offset))
    data = ckpt / last.file
    with open(data, "r+b") as f:
        f.truncate(last.offset + 1)
    code, out, _ = run(["verify", str(ckpt), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1
    reasons = {(p["file"], p["fqn"]): p["reason"] for p in doc["problems"]}
    assert "truncated or replaced" in reasons[(last.file, None)]
    assert "truncated (1 of" in reasons[(last.file, last.fqn)]
    # the chunks before the cut are still verified and intact
    assert doc["chunks_ok"] == len(chunks) - 1


def test_verify_deleted_data_file_reports_every_chunk_in_it(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chunks = chunks_of(ckpt)
    victim = chunks[0].file
    os.remove(ckpt / victim)
    code, out, _ = run(["verify", str(ckpt)], capsys)
    assert code == 1
    assert f"{victim}: data file is missing" in out
    for c in chunks:
        if c.file == victim:
            assert f"{victim} at offset {c.offset} ({c.length} bytes), tensor {c.fqn}:" in out


def test_verify_damaged_manifest_and_index(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = next(p for p in ckpt.glob("data-*/index-r0.idx"))
    index.write_bytes(index.read_bytes()[:-5] + b"xxxxx")
    code, out, _ = run(["verify", str(ckpt)], capsys)
    assert code == 1
    assert f"{index.relative_to(ckpt)}:" in out and "checksum" in out
    manifest = ckpt / "manifest.json"
    raw = bytearray(manifest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    manifest.write_bytes(bytes(raw))
    code, out, _ = run(["verify", str(ckpt), "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert [p["file"] for p in doc["problems"]] == ["manifest.json"]


def test_verify_without_a_committed_manifest_exits_2(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.remove(ckpt / "manifest.json")
    code, _, err = run(["verify", str(ckpt)], capsys)
    assert code == 2 and "incomplete checkpoint" in err
    code, _, err = run(["verify", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no checkpoint here" in err


def test_verify_multi_chunk_compressed_checkpoint(
    tmp_ckpt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = {
        "w": torch.linspace(-1, 1, 64 * 64).reshape(64, 64),
        "h": torch.arange(4096, dtype=torch.float16).reshape(64, 64),
        "i": torch.arange(10_000, dtype=torch.int64),
    }
    treeckpt.save(tree, tmp_ckpt, options=SMALL_CHUNKS)
    chunks = chunks_of(Path(tmp_ckpt))
    assert len(chunks) >= 20 and {c.codec for c in chunks} >= {"planes"}
    code, out, _ = run(["verify", tmp_ckpt, "--threads", "3", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["chunks"] == doc["chunks_ok"] == len(chunks)
    assert doc["raw_bytes"] > doc["stored_bytes"]

    # a forged raw length is caught by decoding, even though the stored bytes are intact
    c = next(c for c in chunks if c.fqn == "w" and c.codec == "planes")
    backend = open_backend(tmp_ckpt)
    try:
        decoder = ChunkDecoder()
        assert check_chunk(backend, c, itemsize=4, decoder=decoder) is None
        forged = dataclasses.replace(c, raw_length=c.raw_length + 4)
        reason = check_chunk(backend, forged, itemsize=4, decoder=decoder)
    finally:
        backend.close()
    assert reason is not None and ("declares" in reason or "expected" in reason)

    target = next(c for c in chunks if c.fqn == "w" and c.codec == "planes")
    data = Path(tmp_ckpt) / target.file
    raw = bytearray(data.read_bytes())
    raw[target.offset] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, out, _ = run(["verify", tmp_ckpt, "--threads", "3"], capsys)
    assert code == 1
    assert f"{target.file} at offset {target.offset}" in out and "tensor w:" in out
    assert f"{len(chunks) - 1} of {len(chunks)} chunks intact" in out


def test_verify_and_diff_over_fsspec_with_progress_bars(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_output, "is_terminal", lambda stream: True)
    root = f"memory://treeckpt-cli-{uuid.uuid4().hex}"
    treeckpt.save({"w": torch.arange(3000.0)}, f"{root}/a", options=SMALL_CHUNKS)
    treeckpt.save({"w": torch.arange(3000.0)}, f"{root}/b", options=FAST)
    code, out, _ = run(["verify", f"{root}/a"], capsys)
    assert code == 0 and "OK:" in out and "3 chunks" in out
    code, out, _ = run(["diff", f"{root}/a", f"{root}/b"], capsys)
    assert code == 0 and "1 same (1 by data)" in out


# ------------------------------------------------------------------ diff


def test_diff_identical_checkpoints_by_checksums(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    treeckpt.save(model_state(), str(other), options=FAST)
    code, out, _ = run(["diff", str(saved), str(other)], capsys)
    assert code == 0
    assert "identical:" in out and "0 different" not in out
    code, out, _ = run(["diff", str(saved), str(other), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["identical"] is True
    tensors = [e for e in doc["entries"] if e["kind"] == "tensor"]
    assert tensors and all(e["status"] == "same" and e["how"] == "checksums" for e in tensors)


def test_diff_reports_changed_tensor_removed_key_and_changed_value(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = model_state()
    a = state["model"][0].weight.detach().clone()
    with torch.no_grad():
        state["model"][0].weight[3, 5] += 0.5
        state["model"][0].weight[7, 1] -= 0.125
    b = state["model"][0].weight.detach()
    expected_abs = float((a.double() - b.double()).abs().max())
    expected_rel = float(((a.double() - b.double()).abs() / b.double().abs()).max())
    del state["name"]
    state["step"] = 11
    other = tmp_path / "other"
    treeckpt.save(state, str(other), options=FAST)

    code, out, _ = run(["diff", str(saved), str(other)], capsys)
    assert code == 1
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("different")}
    assert "2 of 128 elements differ" in lines["model.0.weight"]
    assert f"max abs diff {expected_abs:.6g}" in lines["model.0.weight"]
    assert "10 != 11" in lines["step"]
    assert out.count("only in A") >= 1 and "name" in out
    assert "DIFFERENT:" in out

    code, out, _ = run(["diff", str(saved), str(other), "--json"], capsys)
    doc = json.loads(out)
    entries = {e["fqn"]: e for e in doc["entries"]}
    w = entries["model.0.weight"]
    assert w["status"] == "different" and w["how"] == "data" and w["mismatched"] == 2
    assert w["max_abs"] == expected_abs
    assert w["max_rel"] == pytest.approx(expected_rel)
    assert entries["name"]["status"] == "only_a"
    assert entries["step"]["status"] == "different" and entries["loss"]["status"] == "same"
    assert entries["model.0.bias"]["status"] == "same"
    assert doc["counts"]["different"] == 2 and doc["counts"]["only_a"] == 1
    code, out, _ = run(["diff", str(other), str(saved), "--json"], capsys)
    assert {e["fqn"] for e in json.loads(out)["entries"] if e["status"] == "only_b"} == {"name"}


def test_diff_bfloat16_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    a = torch.randn(32, 32).bfloat16()
    b = a.clone()
    b[0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    treeckpt.save({"w": a}, str(tmp_path / "a"), options=FAST)
    treeckpt.save({"w": b}, str(tmp_path / "b"), options=FAST)
    treeckpt.save({"w": a.clone()}, str(tmp_path / "a2"), options=SaveOptions(chunk_bytes=512))
    code, out, _ = run(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"], capsys)
    (e,) = json.loads(out)["entries"]
    expected = float((a.double() - b.double()).abs().max())
    mismatched = int((a.view(torch.int16) != b.view(torch.int16)).sum())
    assert code == 1 and e["status"] == "different"
    assert e["max_abs"] == expected and e["mismatched"] == mismatched
    code, out, _ = run(["diff", str(tmp_path / "a"), str(tmp_path / "a2")], capsys)
    assert code == 0 and "1 same (1 by data)" in out


def test_diff_different_chunk_layouts_read_data(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    treeckpt.save(model_state(), str(other), options=SaveOptions(chunk_bytes=64, sync=False))
    assert len(chunks_of(other)) > len(chunks_of(saved))
    code, out, _ = run(["diff", str(saved), str(other), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["identical"] is True
    hows = {e["how"] for e in doc["entries"] if e["kind"] == "tensor"}
    assert "data" in hows and all(e["status"] == "same" for e in doc["entries"])


def test_diff_metadata_tolerances_and_value_bits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {
        "x": torch.ones(4, 4),
        "y": torch.zeros(3),
        "z": torch.tensor([1.0, float("nan"), 3.0]),
        "nan": float("nan"),
        "zero": 0.0,
        "one": 1,
    }
    changed = {
        "x": torch.ones(4, 4) + 1e-7,
        "y": torch.zeros(3, dtype=torch.float64),
        "z": torch.tensor([1.0, float("nan"), 3.0]),
        "nan": float("nan"),
        "zero": -0.0,
        "one": True,
    }
    treeckpt.save(base, str(tmp_path / "a"), options=FAST)
    treeckpt.save(changed, str(tmp_path / "b"), options=FAST)
    code, out, _ = run(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"], capsys)
    entries = {e["fqn"]: e for e in json.loads(out)["entries"]}
    assert code == 1
    assert entries["x"]["status"] == "different" and entries["x"]["mismatched"] == 16
    assert (
        entries["y"]["how"] == "metadata" and "dtype float32 != float64" in entries["y"]["reason"]
    )
    assert entries["z"]["status"] == "same"
    assert entries["nan"]["status"] == "same"
    assert entries["zero"]["status"] == "different" and entries["one"]["status"] == "different"

    del base["y"], changed["y"], base["zero"], changed["zero"], base["one"], changed["one"]
    treeckpt.save(base, str(tmp_path / "a"), options=FAST)
    treeckpt.save(changed, str(tmp_path / "b"), options=FAST)
    code, out, _ = run(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--atol", "1e-6"], capsys)
    assert code == 0 and "close" in out and "identical:" in out
    code, out, _ = run(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "1e-9"], capsys)
    assert code == 1


def test_diff_of_a_missing_or_damaged_checkpoint_exits_2(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["diff", str(ckpt), str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no checkpoint here" in err
    other = Path(shutil.copytree(ckpt, tmp_path / "other"))
    c = next(c for c in chunks_of(other) if c.fqn == "model.0.weight")
    raw = bytearray((other / c.file).read_bytes())
    raw[c.offset] ^= 0x01
    (other / c.file).write_bytes(bytes(raw))
    treeckpt.save(model_state(), str(ckpt), options=SaveOptions(chunk_bytes=64, sync=False))
    code, _, err = run(["diff", str(ckpt), str(other)], capsys)
    assert code == 2 and "checksum mismatch" in err and "model.0.weight" in err


def test_diff_kinds_numpy_ints_empty_and_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = {
        "arr": np.arange(12, dtype=np.int32).reshape(3, 4),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5),
        "kind": torch.ones(2),
        "same": "x",
    }
    b = {
        "arr": np.arange(12, dtype=np.int32).reshape(3, 4) * np.int32(-1),
        "flags": torch.tensor([True, True, True]),
        "empty": torch.zeros(0, 5),
        "kind": 2.0,
        "same": "x",
        "new": torch.zeros(3),
    }
    treeckpt.save(a, str(tmp_path / "a"), options=FAST)
    treeckpt.save(b, str(tmp_path / "b"), options=FAST)
    code, out, _ = run(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"], capsys)
    entries = {e["fqn"]: e for e in json.loads(out)["entries"]}
    assert code == 1
    assert entries["arr"]["status"] == "different" and entries["arr"]["max_abs"] == 22.0
    assert entries["arr"]["mismatched"] == 11  # 0 == -0 for ints
    assert entries["flags"]["mismatched"] == 1 and entries["flags"]["max_abs"] is None
    assert entries["empty"]["status"] == "same"
    assert entries["kind"]["reason"] == "a tensor in A, a value in B"
    assert entries["new"]["status"] == "only_b"
    code, out, _ = run(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--all"], capsys)
    assert code == 1
    assert any(line.startswith("same") and " empty " in line for line in out.splitlines())
    assert any(line.startswith("only in B") and "new" in line for line in out.splitlines())


def test_verify_raw_chunks_with_block_checksums_and_empty_tensors(
    tmp_ckpt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = {"big": torch.randn(1 << 18), "empty": torch.zeros(0, 3), "n": 1}
    treeckpt.save(
        tree, tmp_ckpt, options=SaveOptions(compression=Compression(mode="never"), sync=False)
    )
    (c,) = [c for c in chunks_of(Path(tmp_ckpt)) if c.fqn == "big"]
    assert len(c.blocks) > 1
    code, out, _ = run(["verify", tmp_ckpt], capsys)
    assert code == 0 and "OK:" in out
    data = Path(tmp_ckpt) / c.file
    raw = bytearray(data.read_bytes())
    raw[c.offset + c.length - 1] ^= 0x01
    data.write_bytes(bytes(raw))
    code, out, _ = run(["verify", tmp_ckpt], capsys)
    assert code == 1 and "tensor big: checksum mismatch" in out


# ------------------------------------------------------------------ the command itself


def test_usage_errors_exit_2(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["verify"]) == 2
    assert cli.main(["verify", str(saved), "--threads", "0"]) == 2
    assert cli.main(["diff", str(saved), str(saved), "--atol", "-1"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "usage: treeckpt" in capsys.readouterr().err


def test_help_teaches_each_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("inspect", "verify", "diff"):
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"treeckpt {command} " in out and "example" in out


def test_python_dash_m_treeckpt_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "treeckpt", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("inspect", "verify", "diff"):
        assert f"  {command} " in proc.stdout
        assert f"treeckpt {command} " in proc.stdout
    assert "exit codes" in proc.stdout

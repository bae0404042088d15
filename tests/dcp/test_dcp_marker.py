"""The ``.metadata`` marker: every treeckpt checkpoint holds one, so tools that find
checkpoints by DCP's file name (torchtitan's resume) find treeckpt's; torch's DCP
fails on it at once with a message naming treeckpt; treeckpt's readers, verify,
inspect and the DCP-format code tell it from a ``.metadata`` torch's DCP wrote."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp

import treeckpt
import treeckpt.dcp as dcp
from treeckpt.dcp.format_utils import treeckpt_to_dcp
from treeckpt.errors import CheckpointNotFoundError
from treeckpt.formats.torch_dcp import is_dcp_checkpoint, read_dcp_metadata
from treeckpt.store.layout import DCP_MARKER, DCP_MARKER_BYTES, is_dcp_marker
from treeckpt.tools.cli import main as cli_main
from treeckpt.tools.verify import verify

MESSAGE = (
    "treeckpt checkpoint (manifest.json), not torch DCP's format: load it with "
    "treeckpt.dcp.load or treeckpt.load, or convert it with `treeckpt convert PATH OUT --to dcp`"
)
UNPICKLE_ERROR = f"Can't get attribute {MESSAGE!r} on <module 'builtins' (built-in)>"


def _state() -> dict:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 3}


def test_the_marker_bytes() -> None:
    assert DCP_MARKER == ".metadata"
    assert b"cbuiltins\n" + MESSAGE.encode() + b"\n.\n" == DCP_MARKER_BYTES
    assert is_dcp_marker(DCP_MARKER_BYTES)
    # What torch's DCP writes (a pickle with a protocol opcode) is not the marker.
    assert not is_dcp_marker(pickle.dumps({"a": 1}, protocol=2))


def test_every_save_writes_the_marker(tmp_path: Path) -> None:
    dcp.save(_state(), checkpoint_id=tmp_path / "facade")
    treeckpt.save(_state(), tmp_path / "api")
    treeckpt.async_save(_state(), tmp_path / "async").result()
    for name in ("facade", "api", "async"):
        assert (tmp_path / name / DCP_MARKER).read_bytes() == DCP_MARKER_BYTES, name
    # An overwrite keeps it (the same bytes, not rewritten).
    before = (tmp_path / "api" / DCP_MARKER).stat().st_mtime_ns
    treeckpt.save(_state(), tmp_path / "api")
    assert (tmp_path / "api" / DCP_MARKER).stat().st_mtime_ns == before


def test_unpickling_the_marker_fails_at_once_naming_treeckpt() -> None:
    with pytest.raises(AttributeError) as info:
        pickle.load(io.BytesIO(DCP_MARKER_BYTES))
    assert str(info.value) == UNPICKLE_ERROR
    with pytest.raises(
        pickle.UnpicklingError, match=re.escape(f"Unsupported global: GLOBAL {MESSAGE} was not")
    ):
        torch.load(io.BytesIO(DCP_MARKER_BYTES), weights_only=True)


def test_torchs_dcp_load_fails_with_the_message(tmp_path: Path) -> None:
    dcp.save(_state(), checkpoint_id=tmp_path)
    with pytest.raises(torch_dcp.CheckpointException) as info:
        torch_dcp.load({"w": torch.zeros(2, 3)}, checkpoint_id=tmp_path, no_dist=True)
    [(failure, _)] = info.value.failures.values()
    assert isinstance(failure, AssertionError)
    global_part = str(failure).split("; rank local metadata read failed")[0]
    assert global_part == f"metadata is None; global metadata read failed: {UNPICKLE_ERROR}"


def test_treeckpt_reads_verifies_and_inspects_a_checkpoint_with_the_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dcp.save(_state(), checkpoint_id=tmp_path)
    got = {"w": torch.zeros(2, 3), "step": 0}
    dcp.load(got, checkpoint_id=tmp_path)
    assert torch.equal(got["w"], _state()["w"]) and got["step"] == 3
    assert torch.equal(treeckpt.restore(tmp_path)["w"], _state()["w"])
    report = verify(str(tmp_path))
    assert report.ok and report.problems == () and report.chunks_ok == report.chunks == 1
    assert cli_main(["verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("OK:")
    assert cli_main(["inspect", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "w" in json.dumps(shown)


def test_dcp_format_code_tells_the_marker_from_dcps_metadata(tmp_path: Path) -> None:
    dcp.save(_state(), checkpoint_id=tmp_path / "ours")
    torch_dcp.save({"w": _state()["w"]}, checkpoint_id=tmp_path / "theirs", no_dist=True)
    assert not is_dcp_checkpoint(tmp_path / "ours")
    assert is_dcp_checkpoint(tmp_path / "theirs")
    (tmp_path / "marker-only").mkdir()
    (tmp_path / "marker-only" / DCP_MARKER).write_bytes(DCP_MARKER_BYTES)
    with pytest.raises(CheckpointNotFoundError) as info:
        read_dcp_metadata(tmp_path / "marker-only")
    assert str(info.value) == (
        f"{tmp_path / 'marker-only'}: a treeckpt checkpoint (.metadata is its marker), not "
        "torch DCP's format; read it with treeckpt.load"
    )
    # A DCP checkpoint written from a treeckpt one has DCP's own .metadata, and reads back.
    treeckpt_to_dcp(tmp_path / "ours", tmp_path / "converted")
    assert is_dcp_checkpoint(tmp_path / "converted")
    got = {"w": torch.zeros(2, 3)}
    dcp.load(got, checkpoint_id=tmp_path / "theirs")
    assert torch.equal(got["w"], _state()["w"])


def test_torchtitans_resume_finds_the_step(tmp_path: Path) -> None:
    from torchtitan.components.checkpointer.dcp import CheckpointManager

    dcp.save(_state(), checkpoint_id=tmp_path / "step-10")
    dcp.save(_state(), checkpoint_id=tmp_path / "step-20")
    (tmp_path / "step-30").mkdir()  # a save that never committed: no marker
    (tmp_path / "step-30" / "data-0123456789abcdef").mkdir()
    find = CheckpointManager._find_load_step
    assert find(SimpleNamespace(folder=str(tmp_path))) == 20  # type: ignore[arg-type]

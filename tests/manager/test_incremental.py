"""Incremental saves: unchanged chunks referenced, not rewritten; references validated;
reference-safe retention; every step stays a plain, verifiable checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import treeckpt
from treeckpt.core.manifest import ChunkIndex, DataFile, IndexRef
from treeckpt.errors import CorruptChunkError, ManifestError
from treeckpt.manager import CheckpointManager, StepSkippedWarning
from treeckpt.store import layout
from treeckpt.store.backends import open_backend
from treeckpt.store.checksum import checksum
from treeckpt.store.manifest import decode_index, encode_binary_index, encode_index
from treeckpt.store.reader import read_index, read_manifest
from treeckpt.tools.cli import main as cli_main
from treeckpt.tools.verify import verify

# small chunks so one tensor spans several chunks and files
OPTS = treeckpt.SaveOptions(sync=False, chunk_bytes=64 << 10, io_threads=2)


def _model(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(256, 256, generator=g),  # frozen: the same bytes every step
        "ids": torch.arange(10_000, dtype=torch.int64) + seed,
    }


def _state(step: int, base: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 + step)
    return {**base, "head": torch.randn(64, 64, generator=g), "step": step}


def _bytes_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.bin"))


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


def test_unchanged_chunks_are_referenced_not_rewritten(tmp_path: Path) -> None:
    base = _model(0)
    root = tmp_path / "run"
    with CheckpointManager(root, options=OPTS) as m:
        m.save(1, _state(1, base))
        m.save(2, _state(2, base))
    full = _bytes_of(root / "step-0000000001")
    incr = _bytes_of(root / "step-0000000002")
    head = 64 * 64 * 4
    assert incr <= head < full / 10
    # step 2's index lists step 1's data files for the chunks it reuses
    b = open_backend(str(root / "step-0000000002"))
    ix = read_index(b, read_manifest(b), read_manifest(b).indexes[0])
    assert any(f.name.startswith("../step-0000000001/data-") for f in ix.files)
    assert all(c.digest.startswith("xxh3-128:") for c in ix.chunks)


def test_steps_restore_bit_exactly_after_older_steps_are_deleted(tmp_path: Path) -> None:
    base = _model(0)
    root = tmp_path / "run"
    with CheckpointManager(root, max_to_keep=1, options=OPTS) as m:
        for step in range(1, 6):
            m.save(step, _state(step, base))
        assert m.all_steps() == [5]
        _assert_same(m.restore(), _state(5, base))
        path = m.step_path(5)
    # a plain load, a template load, verify and inspect: references are transparent
    _assert_same(treeckpt.restore(path), _state(5, base))
    tmpl = {"embed": torch.zeros(256, 256), "ids": torch.zeros(10_000, dtype=torch.int64)}
    tmpl.update(head=torch.zeros(64, 64), step=0)
    _assert_same(treeckpt.load(tmpl, path), _state(5, base))
    report = verify(path)
    assert report.ok, report
    assert cli_main(["verify", path]) == 0
    assert cli_main(["inspect", path]) == 0
    # step 1 keeps exactly the data files step 5 reads; its manifest and index are gone
    left = sorted(p.relative_to(root).as_posix() for p in (root / "step-0000000001").rglob("*"))
    assert "step-0000000001/manifest.json" not in left
    assert not any("index-r" in f for f in left)
    assert any(f.endswith(".bin") for f in left)
    assert not (root / "step-0000000002").exists()  # nothing of step 2 is read any more


def test_files_are_freed_once_no_kept_step_reads_them(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with CheckpointManager(root, max_to_keep=1, options=OPTS) as m:
        m.save(1, _state(1, _model(0)))
        m.save(2, _state(2, _model(0)))
        assert (root / "step-0000000001").exists()
        # fine-tuning unfreezes everything: step 3 shares nothing with step 1
        m.save(3, _state(3, _model(1)))
        m.save(4, _state(4, _model(2)))
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("step")) == [
            "step-0000000004"
        ]
        _assert_same(m.restore(), _state(4, _model(2)))


def test_equal_bytes_of_another_dtype_decode_correctly(tmp_path: Path) -> None:
    x = torch.randn(128, 128)
    steps = [
        {"t": x},
        {"t": x.view(torch.int32)},  # the same bytes, the same item size: referenced
        {"t": x.view(torch.int16)},  # the same bytes, another item size: rewritten
        {"t": x.view(torch.uint8)},
    ]
    with CheckpointManager(tmp_path / "run", options=OPTS) as m:
        for n, tree in enumerate(steps):
            m.save(n, tree)
        for n, tree in enumerate(steps):
            got = treeckpt.restore(m.step_path(n))
            assert got["t"].dtype == tree["t"].dtype and torch.equal(got["t"], tree["t"])


def test_a_damaged_shared_chunk_is_reported_in_every_step_that_reads_it(tmp_path: Path) -> None:
    base = _model(0)
    with CheckpointManager(tmp_path / "run", options=OPTS) as m:
        m.save(1, _state(1, base))
        m.save(2, _state(2, base))
        shared = sorted((tmp_path / "run" / "step-0000000001").rglob("*.bin"))[0]
        data = bytearray(shared.read_bytes())
        data[100] ^= 1
        shared.write_bytes(bytes(data))
        with pytest.raises(CorruptChunkError, match=r"\.\./step-0000000001/data-"):
            treeckpt.restore(m.step_path(2))
        report = verify(m.step_path(2))
        assert not report.ok
        assert any(p.file.startswith("../step-0000000001/") for p in report.problems)


# ---------------------------------------------------------- hostile references


def _forged(tmp_path: Path, name: str, binary: bool = False) -> tuple[bytes, IndexRef, Any]:
    """Step 2's chunk index with its first referenced file renamed to ``name`` (JSON or binary)."""
    base = _model(0)
    with CheckpointManager(tmp_path / "run", options=OPTS) as m:
        m.save(1, _state(1, base))
        m.save(2, _state(2, base))
        b = open_backend(m.step_path(2))
    manifest = read_manifest(b)
    ix = read_index(b, manifest, manifest.indexes[0])
    old = next(f.name for f in ix.files if f.name.startswith("../"))
    files = tuple(dataclasses.replace(f, name=name) if f.name == old else f for f in ix.files)
    chunks = tuple(dataclasses.replace(c, file=name) if c.file == old else c for c in ix.chunks)
    forged = ChunkIndex(save_id=ix.save_id, rank=0, files=files, chunks=chunks)
    blob = encode_binary_index(forged) if binary else encode_index(forged)
    file = (layout.binary_index_file if binary else layout.index_file)(ix.save_id, 0)
    ref = IndexRef(rank=0, file=file, size=len(blob), checksum=checksum(blob))
    return blob, ref, manifest


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/data-0123456789abcdef/r0-0.bin",
        "../step-1/../../data-0123456789abcdef/r0-0.bin",
        "../step.1/data-0123456789abcdef/r0-0.bin",
        "../../step-1/data-0123456789abcdef/r0-0.bin",
        "/abs/step-1/data-0123456789abcdef/r0-0.bin",
        "../step-1/data-0123456789ABCDEF/r0-0.bin",
        "../step-1/data-0123456789abcdef/r0-0.bin/../../x",
        "../step-1/data-0123456789abcdef/manifest.json",
        "../step-1/data-0123456789abcdef/r01-0.bin",
        "..\\step-1\\data-0123456789abcdef\\r0-0.bin",
        "../step-1//data-0123456789abcdef/r0-0.bin",
    ],
)
@pytest.mark.parametrize("binary", [False, True])
def test_reference_names_outside_the_pattern_are_refused(
    tmp_path: Path, name: str, binary: bool
) -> None:
    blob, ref, manifest = _forged(tmp_path, name, binary)
    with pytest.raises(ManifestError, match="is not one of this save's"):
        decode_index(blob, ref, manifest)


@pytest.mark.parametrize("binary", [False, True])
def test_a_well_formed_reference_is_accepted(tmp_path: Path, binary: bool) -> None:
    name = "../step-0000000007/data-0123456789abcdef/r3-12.bin"
    blob, ref, manifest = _forged(tmp_path, name, binary)
    ix = decode_index(blob, ref, manifest)
    assert DataFile(name=name, size=next(f.size for f in ix.files if f.name == name)) in ix.files


@pytest.mark.parametrize("digests", [["xxh3-128:00"], "x", ["xxh3-64:0123456789abcdef"]])
def test_malformed_digests_are_refused(tmp_path: Path, digests: Any) -> None:
    import json

    blob, ref, manifest = _forged(tmp_path, "../step-0000000001/data-0123456789abcdef/r0-0.bin")
    doc = json.loads(blob)
    doc["body"]["digests"] = digests
    body = json.dumps(doc["body"], separators=(",", ":"))
    doc["checksum"] = checksum(body.encode())
    data = json.dumps(doc, separators=(",", ":")).encode()
    ref = IndexRef(rank=0, file=ref.file, size=len(data), checksum=checksum(data))
    with pytest.raises(ManifestError, match="digests"):
        decode_index(data, ref, manifest)


def test_a_save_after_finding_damage_reuses_nothing_of_the_damaged_steps(tmp_path: Path) -> None:
    base = _model(0)
    with CheckpointManager(tmp_path / "run", options=OPTS) as m:
        m.save(1, _state(1, base))
        m.save(2, _state(2, base))
        for shared in (tmp_path / "run" / "step-0000000001").rglob("*.bin"):
            data = bytearray(shared.read_bytes())
            data[100] ^= 1
            shared.write_bytes(bytes(data))
        with (
            pytest.warns(StepSkippedWarning),
            pytest.raises(treeckpt.CheckpointNotFoundError, match="all damaged"),
        ):
            m.restore()
        m.save(3, _state(3, base))  # a full save: the bad chunks are not referenced
        b = open_backend(m.step_path(3))
        ix = read_index(b, read_manifest(b), read_manifest(b).indexes[0])
        assert not any(f.name.startswith("../") for f in ix.files)
        _assert_same(m.restore(), _state(3, base))


def test_plain_saves_are_unchanged_by_the_format_addition(tmp_path: Path) -> None:
    """No digests, no references: a checkpoint a reader of the earlier format reads."""
    treeckpt.save(_state(1, _model(0)), tmp_path / "ck", options=OPTS)
    b = open_backend(str(tmp_path / "ck"))
    manifest = read_manifest(b)
    for ref in manifest.indexes:
        ix = read_index(b, manifest, ref)
        assert all(c.digest == "" for c in ix.chunks)
        assert all(not f.name.startswith("../") for f in ix.files)

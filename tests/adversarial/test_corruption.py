"""Damaged checkpoints: bit flips, truncation, appended bytes, zeroed pages,
deleted, swapped and foreign files, in every file of a checkpoint.

Every load either returns the saved values bit-exactly or raises a
``CheckpointError`` whose message names the damaged file (and the tensor,
where the damage is in a chunk). Never wrong values, never another exception.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import treeckpt
from tests.adversarial.forge import (
    MANIFEST,
    SAVE_OPTIONS,
    Ckpt,
    copy,
    same,
    sample_tree,
    template_of,
)
from treeckpt import CheckpointError, CorruptChunkError, ManifestError

TREE = sample_tree(0)
OTHER = sample_tree(1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "ckpt"
    treeckpt.save(TREE, str(path), options=SAVE_OPTIONS)
    ck = Ckpt(path)
    # the sample exercises raw and compressed chunks in two data files
    codecs = {c[6] for c in ck.index()["chunks"]}
    assert codecs == {"raw", "planes"}, codecs
    assert len(ck.data_files()) == 2
    return path


@pytest.fixture
def ck(pristine: Path, tmp_path: Path) -> Ckpt:
    return copy(pristine, tmp_path / "ckpt")


def _kind(rel: str) -> str:
    if rel == MANIFEST:
        return "manifest"
    return "index" if rel.endswith((".json", ".idx")) else "data"


def check_outcome(path: Path, rel: str, *, via: str = "restore") -> str:
    """Load the checkpoint; assert the outcome is exact data or a clean error naming ``rel``."""
    try:
        if via == "restore":
            got = treeckpt.restore(str(path))
        else:
            got = treeckpt.load(template_of(TREE), str(path))
    except CheckpointError as exc:
        msg = str(exc)
        assert os.path.basename(rel) in msg, f"{rel}: error does not name the file: {msg}"
        if _kind(rel) == "data" and isinstance(exc, CorruptChunkError) and "offset" in msg:
            assert "tensor '" in msg, f"{rel}: chunk error does not name the tensor: {msg}"
        return type(exc).__name__
    assert same(TREE, got), f"{rel}: load returned wrong values without an error"
    return "identical"


def _flip_sweep(ck: Ckpt, offsets_for: Callable[[int], list[int]], *, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: dict[str, dict[str, int]] = {}
    for rel in ck.files():
        original = ck.read(rel)
        counts: dict[str, int] = {}
        for n, off in enumerate(offsets_for(len(original))):
            damaged = bytearray(original)
            damaged[off] ^= 1 << rng.randrange(8)
            ck.write(rel, bytes(damaged))
            via = "load" if n % 4 == 0 else "restore"
            outcome = check_outcome(ck.path, rel, via=via)
            counts[outcome] = counts.get(outcome, 0) + 1
        ck.write(rel, original)
        outcomes[rel] = counts
    assert same(TREE, treeckpt.restore(str(ck.path)))
    return outcomes


def test_bit_flips_sampled(ck: Ckpt) -> None:
    rng = random.Random(1)

    def offsets(size: int) -> list[int]:
        return sorted(rng.sample(range(size), min(size, 200)))

    outcomes = _flip_sweep(ck, offsets, seed=2)
    for rel, counts in outcomes.items():
        # a flip in an index or a data file is always detected
        if _kind(rel) != "manifest":
            assert "identical" not in counts, (rel, counts)
        assert sum(counts.values()) == min(200, len((ck.path / rel).read_bytes()))


@pytest.mark.slow
def test_bit_flips_every_byte(ck: Ckpt) -> None:
    _flip_sweep(ck, lambda size: list(range(size)), seed=3)


@pytest.mark.slow
def test_every_bit_of_the_index(ck: Ckpt) -> None:
    rel = ck.index_name()
    original = ck.read(rel)
    for bit in range(len(original) * 8):
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
        ck.write(rel, bytes(damaged))
        assert check_outcome(ck.path, rel) != "identical"


def test_truncation(ck: Ckpt) -> None:
    for rel in ck.files():
        original = ck.read(rel)
        for cut in sorted({0, 1, 2, len(original) // 2, len(original) - 1}):
            ck.write(rel, original[:cut])
            outcome = check_outcome(ck.path, rel)
            assert outcome != "identical", (rel, cut)
            assert outcome != "CheckpointNotFoundError"
        ck.write(rel, original)


@pytest.mark.parametrize("extra", [b"\x00", b"garbage", b"\xff" * 4096, b"{}"])
def test_appended_bytes(ck: Ckpt, extra: bytes) -> None:
    for rel in ck.files():
        original = ck.read(rel)
        ck.write(rel, original + extra)
        outcome = check_outcome(ck.path, rel)
        assert outcome != "identical", rel
        ck.write(rel, original)


def test_appended_whitespace_to_the_manifest_is_harmless(ck: Ckpt) -> None:
    ck.write(MANIFEST, ck.read(MANIFEST) + b" \n")
    assert same(TREE, treeckpt.restore(str(ck.path)))


def test_zeroed_pages(ck: Ckpt) -> None:
    for rel in ck.files():
        original = ck.read(rel)
        for start in range(0, len(original), 1024):
            damaged = bytearray(original)
            damaged[start : start + 1024] = bytes(len(damaged[start : start + 1024]))
            if bytes(damaged) == original:
                continue
            ck.write(rel, bytes(damaged))
            assert check_outcome(ck.path, rel) != "identical", (rel, start)
        ck.write(rel, original)


def test_deleted_files(ck: Ckpt, tmp_path: Path) -> None:
    for rel in ck.files()[1:]:
        backup = tmp_path / "backup"
        shutil.copy(ck.path / rel, backup)
        os.remove(ck.path / rel)
        with pytest.raises(CheckpointError) as info:
            treeckpt.restore(str(ck.path))
        assert os.path.basename(rel) in str(info.value)
        assert "missing" in str(info.value)
        with pytest.raises(CheckpointError):
            treeckpt.load(template_of(TREE), str(ck.path))
        shutil.copy(backup, ck.path / rel)
    shutil.rmtree(ck.path / ck.data_dir)
    with pytest.raises(ManifestError, match=r"index-r0\.(json|idx)"):
        treeckpt.restore(str(ck.path))


def test_template_is_only_touched_by_a_load_that_succeeds_or_fails_cleanly(ck: Ckpt) -> None:
    """A corrupt chunk raises; values the load returned before are never mixed in silently."""
    rel = ck.data_files()[0]
    data = bytearray(ck.read(rel))
    data[len(data) // 2] ^= 0x10
    ck.write(rel, bytes(data))
    template = template_of(TREE)
    with pytest.raises(CorruptChunkError, match=os.path.basename(rel)):
        treeckpt.load(template, str(ck.path))


@pytest.mark.parametrize("compress", ["never", "auto"])
def test_data_file_swapped_with_another_saves(tmp_path: Path, compress: str) -> None:
    """Same tree shape, other values: detected by the index's sizes and chunk checksums."""
    opts = treeckpt.SaveOptions(
        chunk_bytes=2048, io_threads=2, compression=treeckpt.Compression(mode=compress)
    )  # type: ignore[arg-type]
    a, b = tmp_path / "a", tmp_path / "b"
    treeckpt.save(TREE, str(a), options=opts)
    treeckpt.save(OTHER, str(b), options=opts)
    ca, cb = Ckpt(a), Ckpt(b)
    for fa, fb in zip(ca.data_files(), cb.data_files(), strict=True):
        original = ca.read(fa)
        ca.write(fa, cb.read(fb))
        with pytest.raises(CorruptChunkError) as info:
            treeckpt.restore(str(a))
        assert os.path.basename(fa) in str(info.value)
        with pytest.raises(CorruptChunkError):
            treeckpt.load(template_of(TREE), str(a))
        ca.write(fa, original)
    # the whole data directory of the other save under this save's name
    shutil.rmtree(a / ca.data_dir)
    shutil.copytree(b / cb.data_dir, a / ca.data_dir)
    with pytest.raises(ManifestError, match=r"index-r0\.(json|idx)"):
        treeckpt.restore(str(a))


def test_data_files_of_another_save_with_this_saves_index(tmp_path: Path) -> None:
    opts = treeckpt.SaveOptions(
        chunk_bytes=2048, io_threads=2, compression=treeckpt.Compression(mode="never")
    )
    a, b = tmp_path / "a", tmp_path / "b"
    treeckpt.save(TREE, str(a), options=opts)
    treeckpt.save(OTHER, str(b), options=opts)
    ca, cb = Ckpt(a), Ckpt(b)
    for fa, fb in zip(ca.data_files(), cb.data_files(), strict=True):
        assert os.path.getsize(a / fa) == os.path.getsize(b / fb)  # sizes alone cannot tell
        shutil.copy(b / fb, a / fa)
    with pytest.raises(CorruptChunkError, match="checksum mismatch"):
        treeckpt.restore(str(a))


def test_index_from_another_save(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    treeckpt.save(TREE, str(a), options=SAVE_OPTIONS)
    treeckpt.save(OTHER, str(b), options=SAVE_OPTIONS)
    ca, cb = Ckpt(a), Ckpt(b)
    ca.write(ca.index_name(), cb.read(cb.index_name()))
    with pytest.raises(ManifestError, match=r"index-r0\.(json|idx)"):
        treeckpt.restore(str(a))
    # even with the manifest's record of the index updated, the save id gives it away
    ca.write_index(cb.index())
    with pytest.raises(ManifestError, match="another save"):
        treeckpt.restore(str(a))


def test_manifest_from_another_save(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    treeckpt.save(TREE, str(a), options=SAVE_OPTIONS)
    treeckpt.save(OTHER, str(b), options=SAVE_OPTIONS)
    shutil.copy(b / MANIFEST, a / MANIFEST)
    with pytest.raises(ManifestError, match="missing"):
        treeckpt.restore(str(a))


def test_stale_files_of_other_saves_are_ignored(ck: Ckpt, tmp_path: Path) -> None:
    other = tmp_path / "other"
    treeckpt.save(OTHER, str(other), options=SAVE_OPTIONS)
    co = Ckpt(other)
    shutil.copytree(other / co.data_dir, ck.path / co.data_dir)
    (ck.path / "manifest.json.tmp-123-456").write_bytes(b"torn")
    (ck.path / ck.data_dir / "r0-7.bin").write_bytes(b"stray")
    assert same(TREE, treeckpt.restore(str(ck.path)))
    assert same(TREE, treeckpt.load(template_of(TREE), str(ck.path)))


def test_data_file_replaced_by_a_directory(ck: Ckpt) -> None:
    rel = ck.data_files()[0]
    os.remove(ck.path / rel)
    os.mkdir(ck.path / rel)
    with pytest.raises(CheckpointError, match=os.path.basename(rel)):
        treeckpt.restore(str(ck.path))


def test_manifest_replaced_by_a_directory(ck: Ckpt) -> None:
    os.remove(ck.path / MANIFEST)
    os.mkdir(ck.path / MANIFEST)
    with pytest.raises(CheckpointError, match=MANIFEST):
        treeckpt.restore(str(ck.path))


def test_overwrite_over_a_corrupt_checkpoint_succeeds(ck: Ckpt) -> None:
    rel = ck.data_files()[0]
    ck.write(rel, b"x")
    treeckpt.save(OTHER, str(ck.path), options=SAVE_OPTIONS)
    assert same(OTHER, treeckpt.restore(str(ck.path)))

"""Checkpoints on an S3-protocol object store (moto on loopback), one rank and two.

The commit protocol without rename: data objects under per-save names, every
object published whole by ``commit()`` of an ``autocommit=False`` upload, the
manifest last as one object; overwrite is old-or-new; the replaced and the
abandoned saves' objects are removed after a commit, never the live ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import treeckpt
from tests.adversarial.forge import SAVE_OPTIONS, same, sample_tree, template_of
from tests.dist_utils import run_ranks
from tests.s3.s3_utils import objects, uploads
from tests.store.test_backends import BackendContract
from tests.test_concurrency import OPTS, assert_next_save_cleans_up, race, version
from treeckpt import IncompleteCheckpointError
from treeckpt.shell import cleanup
from treeckpt.store.backends import Backend, FsspecBackend, open_backend
from treeckpt.testing.faults import FaultyBackend, InjectedFault

pytestmark = pytest.mark.s3

TREE = sample_tree(0)
OTHER = sample_tree(1)
FAST = dataclasses.replace(SAVE_OPTIONS, sync=False)


class TestS3Backend(BackendContract):
    """The whole backend contract, on S3."""

    racing_commits = 30  # each commit is a few HTTP requests to a server sharing the CPU

    @pytest.fixture
    def backend(self, s3_url: str) -> Iterator[Backend]:
        b = open_backend(s3_url)
        assert isinstance(b, FsspecBackend)
        yield b
        b.close()

    def test_faulty_wrapper_injects(self, backend: Backend) -> None:
        """On S3 a torn write never becomes an object: the aborted upload leaves nothing."""
        backend.makedirs("")
        fb = FaultyBackend(backend, fail_at=2, mode="torn")
        w = fb.open_writer("f.bin")
        w.write(b"0123")
        with pytest.raises(InjectedFault):
            w.write(b"456789")
        w.abort()
        assert backend.size("f.bin") is None

    def test_listdir(self, backend: Backend) -> None:
        """Object stores have no empty directories: a prefix exists through its objects."""
        assert backend.listdir("does-not-exist") == []
        backend.makedirs("d/e")
        backend.commit_file("d/b.bin", b"1", sync=False)
        backend.commit_file("d/e/f.bin", b"2", sync=False)
        assert backend.listdir("d") == ["b.bin", "e"]
        assert "d" in backend.listdir()

    def test_object_appears_only_at_commit(self, backend: Backend, s3_url: str) -> None:
        backend.makedirs("d")
        w = backend.open_writer("d/f.bin")
        w.write(b"x" * (6 << 20))  # over one part: the upload has begun
        w.write(b"tail")
        assert backend.size("d/f.bin") is None
        assert backend.listdir("d") == []
        w.close(sync=True)
        assert backend.size("d/f.bin") == (6 << 20) + 4
        w = backend.open_writer("d/g.bin")
        w.write(b"y" * (6 << 20))
        w.abort()
        assert backend.size("d/g.bin") is None
        assert backend.listdir("d") == ["f.bin"]
        assert uploads(backend.fs, s3_url) == []  # type: ignore[attr-defined]

    def test_manifest_commit_is_one_object_write(self, backend: Backend) -> None:
        backend.makedirs("")
        backend.commit_file("m.json", b"old", sync=True)
        fb = FaultyBackend(backend, fail_at=0, mode="before")
        with pytest.raises(InjectedFault):
            fb.commit_file("m.json", b"new", sync=True)
        assert backend.read_file("m.json", 10) == b"old"
        backend.commit_file("m.json", b"newer", sync=True)
        assert backend.read_file("m.json", 10) == b"newer"

    def test_age_of_a_prefix(self, backend: Backend) -> None:
        assert backend.age_s("nothing") is None
        backend.commit_file("d/a.bin", b"1", sync=False)
        age = backend.age_s("d")
        assert age is not None and 0 <= age < 600
        assert backend.hold_dir("d") is None  # no locks on object stores


def test_round_trip_bit_exact(s3_url: str) -> None:
    res = treeckpt.save(TREE, s3_url, options=SAVE_OPTIONS)
    assert same(TREE, treeckpt.restore(s3_url))
    assert same(TREE, treeckpt.load(template_of(TREE), s3_url))
    assert treeckpt.metadata(s3_url).save_id == res.save_id
    got = treeckpt.read_tensor(s3_url, "w", (slice(3, 9), slice(None)))
    assert torch.equal(got, TREE["w"][3:9])
    # every deferred-commit file was committed and forgotten: nothing accumulates per save
    fs = open_backend(s3_url).fs  # type: ignore[attr-defined]
    assert not getattr(getattr(fs, "_transaction", None), "files", None)


def test_overwrite_is_old_or_new_and_removes_the_old_objects(
    s3_url: str, s3fs_instance: Any
) -> None:
    first = treeckpt.save(TREE, s3_url, options=SAVE_OPTIONS)
    before = objects(s3fs_instance, s3_url)
    assert "manifest.json" in before
    assert all(
        o in ("manifest.json", ".metadata") or o.startswith(f"data-{first.save_id}/")
        for o in before
    )
    second = treeckpt.save(OTHER, s3_url, options=SAVE_OPTIONS)
    after = objects(s3fs_instance, s3_url)
    assert all(
        o in ("manifest.json", ".metadata") or o.startswith(f"data-{second.save_id}/")
        for o in after
    )
    assert same(OTHER, treeckpt.restore(s3_url))
    assert uploads(s3fs_instance, s3_url) == []


def test_nothing_committed_is_incomplete(s3_url: str) -> None:
    backend = open_backend(s3_url)
    backend.commit_file("data-0123456789abcdef/r0-0.bin", b"orphan", sync=False)
    with pytest.raises(IncompleteCheckpointError, match="incomplete"):
        treeckpt.restore(s3_url)


def test_abandoned_save_objects_are_removed_after_the_grace_period(
    s3_url: str, s3fs_instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orphan younger than the grace period may be a save in progress: kept. Older: removed.
    The live checkpoint's objects are never removed, whatever their age."""
    treeckpt.save(TREE, s3_url, options=FAST)
    backend = open_backend(s3_url)
    orphan = "data-00000000000000aa"
    backend.commit_file(f"{orphan}/r0-0.bin", b"left by a crashed save", sync=False)
    live = treeckpt.save(OTHER, s3_url, options=FAST)
    assert any(o.startswith(orphan) for o in objects(s3fs_instance, s3_url))  # young: kept
    monkeypatch.setattr(cleanup, "ABANDONED_AFTER_S", 0.0)
    removed = cleanup.remove_stale(backend, own="f" * 16, previous=None)
    assert removed == [orphan]
    assert not any(o.startswith(orphan) for o in objects(s3fs_instance, s3_url))
    assert any(o.startswith(f"data-{live.save_id}/") for o in objects(s3fs_instance, s3_url))
    assert same(OTHER, treeckpt.restore(s3_url))


# ------------------------------------------------------------------ two ranks


def _globals() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "a": torch.randn(9, 5, generator=g),  # uneven over 2 ranks
        "b": torch.randn(4, 6, generator=g).bfloat16(),
        "c": torch.arange(12, dtype=torch.int64),
    }


def _save_2(rank: int, world: int, url: str, endpoint: str) -> str:
    mesh = init_device_mesh("cpu", (world,))
    tree = {
        "a": distribute_tensor(_globals()["a"], mesh, [Shard(0)]),
        "b": distribute_tensor(_globals()["b"], mesh, [Shard(1)]),
        "c": distribute_tensor(_globals()["c"], mesh, [Replicate()]),
        "step": 5,
    }
    res = treeckpt.save(tree, url, options=treeckpt.SaveOptions(chunk_bytes=64))
    dist.barrier()
    return res.save_id


def _load_2(rank: int, world: int, url: str, endpoint: str) -> bool:
    mesh = init_device_mesh("cpu", (world,))
    tree = {
        "a": distribute_tensor(torch.zeros(9, 5), mesh, [Shard(1)]),
        "b": distribute_tensor(torch.zeros(4, 6, dtype=torch.bfloat16), mesh, [Shard(0)]),
        "c": distribute_tensor(torch.zeros(12, dtype=torch.int64), mesh, [Shard(0)]),
        "step": 0,
    }
    out = treeckpt.load(tree, url)
    assert out["step"] == 5
    for k, v in _globals().items():
        assert torch.equal(out[k].full_tensor(), v), k
    return True


@pytest.mark.distributed
def test_two_ranks_save_and_reshard_on_s3(
    s3_url: str, s3_endpoint: str, s3fs_instance: Any, tmp_path: Path
) -> None:
    ids = run_ranks(2, _save_2, tmp_path, s3_url, s3_endpoint)
    assert ids[0] == ids[1]
    names = objects(s3fs_instance, s3_url)
    assert f"data-{ids[0]}/index-r0.idx" in names and f"data-{ids[0]}/index-r1.idx" in names
    assert run_ranks(2, _load_2, tmp_path, s3_url, s3_endpoint) == [True, True]
    # and in one process, into plain tensors (world size 2 -> 1)
    got = treeckpt.restore(s3_url)
    for k, v in _globals().items():
        assert torch.equal(got[k], v), k
    # an overwrite from two ranks replaces it and removes the old objects
    ids2 = run_ranks(2, _save_2, tmp_path, s3_url, s3_endpoint)
    assert all(
        n in ("manifest.json", ".metadata") or n.startswith(f"data-{ids2[0]}/")
        for n in objects(s3fs_instance, s3_url)
    )


@pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")
def test_two_savers_race_on_s3_while_a_reader_loads(
    s3_url: str, s3fs_instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly one saver's tree, never a mix. The racers run with the default grace period
    (a concurrent save is never taken for abandoned); a later save with none cleans up."""
    treeckpt.save(version(100), s3_url, options=OPTS)
    reads = race(s3_url, 100, rounds=2, clean_up=False)
    assert any(k.startswith("v") for k in reads), reads
    monkeypatch.setattr(cleanup, "ABANDONED_AFTER_S", 0.0)
    assert_next_save_cleans_up(s3_url)
    assert uploads(s3fs_instance, s3_url) == []

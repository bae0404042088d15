"""A reader racing an overwrite: wholly the old checkpoint, wholly the new one, or an
error that says the checkpoint was replaced; never "data file is missing", never a mix.

The overwrite is injected between reading the manifest and reading the data:
a backend wrapper runs a real save to the same path (which commits its
manifest, then removes the old data files) just before the reader's first
read of a chunk index or a data file. A real race (a thread saving while
another loads) checks the same promise without injection.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt import (
    CheckpointReplacedError,
    CorruptChunkError,
    ManifestError,
)
from treeckpt.store.backends import Backend, open_backend
from treeckpt.testing.faults import FaultyBackend

OPTS = treeckpt.SaveOptions(chunk_bytes=4096, io_threads=2, sync=False)


def version(v: int) -> dict[str, Any]:
    """A tree whose every tensor and value says which version it is (many chunks, two files)."""
    g = torch.Generator().manual_seed(v)
    return {
        "a": torch.full((3000,), float(v)),
        "b": torch.arange(2000, dtype=torch.int64) * (v + 1),
        "c": torch.randn(30, 30, generator=g),
        "n": np.arange(100, dtype=np.float32) + v,
        "v": v,
        "name": f"version {v}",
    }


def template() -> dict[str, Any]:
    return {
        "a": torch.zeros(3000),
        "b": torch.zeros(2000, dtype=torch.int64),
        "c": torch.zeros(30, 30),
        "n": np.zeros(100, dtype=np.float32),
        "v": -1,
        "name": "",
    }


def assert_version(got: dict[str, Any], v: int) -> None:
    """``got`` is version ``v``, every tensor bit for bit, every value."""
    want = version(v)
    assert sorted(got) == sorted(want)
    for k in ("a", "b", "c"):
        assert got[k].dtype == want[k].dtype
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    assert got["n"].dtype == want["n"].dtype and got["n"].tobytes() == want["n"].tobytes()
    assert got["v"] == v and got["name"] == f"version {v}"


def which(got: dict[str, Any], candidates: set[int]) -> int:
    """The version ``got`` wholly is (AssertionError for a mix)."""
    v = got["v"]
    assert v in candidates, v
    assert_version(got, v)
    return v


class Overwritten(FaultyBackend):
    """A backend whose reader sees ``overwrite()`` happen just before its first read of a
    file ``hit(op, name)`` selects (a chunk index, a data file) of each of the first
    ``times`` checkpoints it reads."""

    def __init__(
        self, inner: Backend, hit: Callable[[str, str], bool], overwrite: Callable[[], None]
    ) -> None:
        super().__init__(inner)
        self.hit = hit
        self.overwrite = overwrite
        self.times = 1
        self.fired = 0
        self._overwriting = threading.Lock()
        self._dirs: set[str] = set()

    def _before(self, op: str, name: str) -> None:
        # Reader threads wait for the overwrite: none opens an old file before it.
        with self._overwriting:
            save_dir = name.split("/")[0]
            if self.fired < self.times and self.hit(op, name) and save_dir not in self._dirs:
                self._dirs.add(save_dir)  # once per checkpoint read
                self.fired += 1
                self.overwrite()

    def readinto(self, name: str, offset: int, out: memoryview) -> int:
        self._before("readinto", name)
        return super().readinto(name, offset, out)

    def read_file(self, name: str, max_bytes: int) -> bytes:
        self._before("read_file", name)
        return super().read_file(name, max_bytes)

    def size(self, name: str) -> int | None:
        self._before("size", name)
        return super().size(name)


def data_read(op: str, name: str) -> bool:
    return op == "readinto"


def index_read(op: str, name: str) -> bool:
    return op == "read_file" and "/index-" in name


@pytest.fixture
def ckpt(tmp_path: Path) -> str:
    path = str(tmp_path / "ckpt")
    treeckpt.save(version(1), path, options=OPTS)
    return path


def patch_reader(
    hit: Callable[[str, str], bool], overwrite: Callable[[], None], times: int = 1
) -> Callable[[Any], Backend]:
    """A stand-in for ``treeckpt.api._backend``: the backends of reads are ``Overwritten``;
    the overwriting saves themselves get plain ones."""
    saving = threading.local()

    def guarded() -> None:
        saving.on = True
        try:
            overwrite()
        finally:
            saving.on = False

    def backend(p: Any) -> Backend:
        if getattr(saving, "on", False):
            return open_backend(str(p))
        b = Overwritten(open_backend(str(p)), hit, guarded)
        b.times = times
        made.append(b)
        return b

    made: list[Overwritten] = []
    backend.made = made  # type: ignore[attr-defined]
    return backend


def reading_through(
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    hit: Callable[[str, str], bool],
    versions: list[int],
    times: int = 1,
) -> list[Overwritten]:
    """Make the reader's backend of ``path`` see saves of ``versions`` (one per firing)."""
    from treeckpt import api

    todo = list(versions)

    def overwrite() -> None:
        treeckpt.save(version(todo.pop(0)), path, options=OPTS)

    backend = patch_reader(hit, overwrite, times)
    monkeypatch.setattr(api, "_backend", backend)
    made: list[Overwritten] = backend.made  # type: ignore[attr-defined]
    return made


@pytest.mark.parametrize("hit", [data_read, index_read], ids=["data", "index"])
def test_restore_replaced_midway_returns_the_new_checkpoint(
    ckpt: str, monkeypatch: pytest.MonkeyPatch, hit: Callable[[str, str], bool]
) -> None:
    made = reading_through(monkeypatch, ckpt, hit, [2])
    assert_version(treeckpt.restore(ckpt), 2)
    assert made[0].fired == 1


@pytest.mark.parametrize("hit", [data_read, index_read], ids=["data", "index"])
def test_load_replaced_midway_refills_the_template_wholly(
    ckpt: str, monkeypatch: pytest.MonkeyPatch, hit: Callable[[str, str], bool]
) -> None:
    tree = template()
    made = reading_through(monkeypatch, ckpt, hit, [2])
    got = treeckpt.load(tree, ckpt)
    assert made[0].fired == 1
    assert_version(got, 2)
    for k in ("a", "b", "c"):  # in place: the template's own tensors hold the new values
        assert got[k] is tree[k]
    assert got["n"] is tree["n"]


def test_read_tensor_replaced_midway(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reading_through(monkeypatch, ckpt, data_read, [2])
    got = treeckpt.read_tensor(ckpt, "c", (slice(3, 7),))
    assert torch.equal(got.view(torch.uint8), version(2)["c"][3:7].contiguous().view(torch.uint8))


@pytest.mark.parametrize("what", ["restore", "load", "read_tensor"])
def test_replaced_twice_raises_replaced_error(
    ckpt: str, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """Replaced again while the new checkpoint is read: an error that names the path."""
    reading_through(monkeypatch, ckpt, data_read, [2, 3], times=2)
    with pytest.raises(CheckpointReplacedError) as info:
        if what == "restore":
            treeckpt.restore(ckpt)
        elif what == "load":
            treeckpt.load(template(), ckpt)
        else:
            treeckpt.read_tensor(ckpt, "a")
    msg = str(info.value)
    assert msg.startswith(f"{ckpt}: the checkpoint was replaced while it was being read (save ")
    assert "reading the new one failed too" in msg and msg.endswith("; read it again")
    monkeypatch.undo()
    assert_version(treeckpt.restore(ckpt), 3)


def test_load_refuses_a_new_checkpoint_lacking_what_it_began_to_fill(
    ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """strict=False, and the new checkpoint lacks tensor 'c' the first try may have
    written: refilling would leave old bytes in it, so the load says it was replaced."""
    from treeckpt import api

    def overwrite() -> None:
        tree = version(2)
        del tree["c"]
        treeckpt.save(tree, ckpt, options=OPTS)

    monkeypatch.setattr(api, "_backend", patch_reader(data_read, overwrite))
    with pytest.raises(
        CheckpointReplacedError,
        match=r"replaced while it was being read .* and the new one lacks tensors of the old "
        r"one the load may have begun to fill \(c\); read it again$",
    ):
        treeckpt.load(template(), ckpt, strict=False)


def test_metadata_and_plan_reshard_read_the_new_checkpoint(
    ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = reading_through(monkeypatch, ckpt, index_read, [2, 3])
    info = treeckpt.metadata(ckpt)
    assert info.values["v"] == 2 and made[0].fired == 1
    box = treeckpt.Box(offsets=(0, 0), sizes=(30, 30))
    spec = treeckpt.ShardSpec(fqn="c", dtype="float32", shape=(30, 30), boxes=(box,))
    (plan,) = treeckpt.plan_reshard(ckpt, [[spec]])
    assert made[1].fired == 1
    monkeypatch.undo()
    info = treeckpt.metadata(ckpt)
    assert info.values["v"] == 3
    assert plan.items and {i.chunk.file.split("/")[0] for i in plan.items} == {
        f"data-{info.save_id}"
    }


def test_open_checkpoint_replaced_since_opened(ckpt: str) -> None:
    """An open checkpoint is one save's snapshot: reading it after a new save replaced
    it says so, rather than that a data file is missing."""
    with treeckpt.open(ckpt) as ck:
        old = ck.save_id
        treeckpt.save(version(2), ckpt, options=OPTS)
        new = treeckpt.metadata(ckpt).save_id
        with pytest.raises(
            CheckpointReplacedError,
            match=rf"^{ckpt}: the checkpoint was replaced by a new save since it was opened "
            rf"\(save {old}, now save {new}\); open it again$",
        ):
            ck["a"].read()
    with treeckpt.open(ckpt) as ck:
        assert torch.equal(ck["a"].read(), version(2)["a"])


# ------------------------------------------- missing data, no concurrent save


def test_missing_data_file_names_the_manifest(ckpt: str) -> None:
    data_dir = next(n for n in os.listdir(ckpt) if n.startswith("data-"))
    victim = sorted(n for n in os.listdir(f"{ckpt}/{data_dir}") if n.endswith(".bin"))[0]
    os.remove(f"{ckpt}/{data_dir}/{victim}")
    with pytest.raises(
        CorruptChunkError,
        match=rf"^{ckpt}/{data_dir}/{victim}: data file is missing \({ckpt}/manifest\.json "
        rf"refers to it through {data_dir}/index-r0\.idx\)$",
    ):
        treeckpt.load(template(), ckpt)


def test_missing_chunk_index_names_the_manifest(ckpt: str) -> None:
    data_dir = next(n for n in os.listdir(ckpt) if n.startswith("data-"))
    os.remove(f"{ckpt}/{data_dir}/index-r0.idx")
    with pytest.raises(
        ManifestError,
        match=rf"^{ckpt}/{data_dir}/index-r0\.idx: chunk index is missing "
        rf"\({ckpt}/manifest\.json refers to it\)$",
    ):
        treeckpt.restore(ckpt)


def test_data_file_vanishing_mid_read_without_a_new_save(
    ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data directory disappears after the indexes were read, and no save committed:
    the failure stands, naming the file and the manifest that refers to it."""
    from treeckpt import api

    data_dir = next(n for n in os.listdir(ckpt) if n.startswith("data-"))
    monkeypatch.setattr(
        api,
        "_backend",
        lambda p: Overwritten(
            open_backend(str(p)), data_read, lambda: shutil.rmtree(f"{ckpt}/{data_dir}")
        ),
    )
    with pytest.raises(
        CorruptChunkError,
        match=rf"^{ckpt}/{data_dir}/r0-\d\.bin at offset \d+ \(tensor '\w'\): the data file is "
        rf"missing \({ckpt}/manifest\.json refers to it\)$",
    ):
        treeckpt.restore(ckpt)


# ------------------------------------------------------------------- ranks


def _load_replaced_on_rank1(rank: int, world: int, path: str, new: str) -> Any:
    """Both ranks load ``path``; on rank 1 a commit of the checkpoint at ``new`` lands
    between reading the manifest and reading the data (file by file, as a save does)."""
    from treeckpt import api

    def overwrite() -> None:
        new_dir = next(n for n in os.listdir(new) if n.startswith("data-"))
        old_dir = next(n for n in os.listdir(path) if n.startswith("data-"))
        shutil.copytree(f"{new}/{new_dir}", f"{path}/{new_dir}")
        shutil.copy(f"{new}/manifest.json", f"{path}/manifest.json.tmp")
        os.replace(f"{path}/manifest.json.tmp", f"{path}/manifest.json")  # the commit
        shutil.rmtree(f"{path}/{old_dir}")

    if rank == 1:
        api._backend = patch_reader(data_read, overwrite)  # type: ignore[assignment]
    tree = template()
    got = treeckpt.load(tree, path, options=treeckpt.LoadOptions(timeout_s=30))
    assert all(got[k] is tree[k] for k in ("a", "b", "c", "n"))
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in got.items()}


@pytest.mark.distributed
def test_ranks_agree_to_read_the_new_checkpoint(tmp_path: Path, ckpt: str) -> None:
    new = str(tmp_path / "new")
    treeckpt.save(version(2), new, options=OPTS)
    results = run_ranks(2, _load_replaced_on_rank1, tmp_path, ckpt, new, timeout=90)
    for got in results:
        assert_version(got, 2)


# --------------------------------------------------------------- real race


def test_loads_racing_a_saving_thread_are_whole_or_replaced(tmp_path: Path) -> None:
    """A thread saves versions 1, 2, ... to one path while this one loads and restores
    it: every read is wholly one version, bit for bit, or a CheckpointReplacedError."""
    path = str(tmp_path / "ckpt")
    treeckpt.save(version(0), path, options=OPTS)
    stop = threading.Event()
    saved: list[int] = [0]
    failures: list[BaseException] = []

    def saver() -> None:
        v = 1
        try:
            while not stop.is_set():
                treeckpt.save(version(v), path, options=OPTS)
                saved.append(v)
                v += 1
        except BaseException as exc:  # reported below
            failures.append(exc)

    thread = threading.Thread(target=saver, name="saver")
    thread.start()
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 6.0
    try:
        n = 0
        while time.monotonic() < deadline and (n < 40 or len(saved) < 10):
            n += 1
            try:
                got = treeckpt.restore(path) if n % 2 else treeckpt.load(template(), path)
                v = which(got, set(range(len(saved) + 1)))
                seen["whole"] = seen.get("whole", 0) + 1
                assert v <= saved[-1] + 1
            except CheckpointReplacedError as exc:
                assert str(exc).startswith(f"{path}: the checkpoint was replaced"), exc
                seen["replaced"] = seen.get("replaced", 0) + 1
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert failures == []
    assert seen.get("whole", 0) > 0, seen
    assert len(saved) > 3, saved
    assert_version(treeckpt.restore(path), saved[-1])


def test_dcp_facade_load_replaced_midway_refills_wholly(
    ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The facade's one-call load keeps the same promise as ``treeckpt.load``."""
    import treeckpt.dcp as dcp
    from treeckpt.dcp import _engine

    todo = [2]

    def overwrite() -> None:
        treeckpt.save(version(todo.pop(0)), ckpt, options=OPTS)

    backend = patch_reader(data_read, overwrite)
    monkeypatch.setattr(_engine, "open_backend", backend)
    tree = template()
    dcp.load(tree, checkpoint_id=ckpt)
    assert [b.fired for b in backend.made] == [0, 1]  # type: ignore[attr-defined]
    assert_version(tree, 2)

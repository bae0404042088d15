"""Corruption fuzzing: seeded random damage to every file of a checkpoint.

Each case damages one or two files of a committed checkpoint (bit flips,
truncation, zeroed pages, appended bytes, overwritten runs, files swapped
with each other, files taken from another save of the same tree shape,
deleted files, and combinations) and loads it. The outcome must be the saved
values bit-exactly, or a ``CheckpointError`` whose message names a damaged
file (and the tensor, for a chunk error). Never wrong values, never another
exception, no ``MemoryError``; a case that takes more than
``CASE_TIMEOUT_S`` counts as a hang.

Two checkpoints are fuzzed: one written by one process (two data files),
and one written by two gloo ranks (two chunk indexes, sharded and replicated
tensors). ``test_fuzz_sampled`` runs a fixed seeded subset of each by
default; ``test_fuzz_many`` (``slow``) runs ``SLOW_CASES`` and
``SLOW_CASES_TWO`` cases and prints the count of each outcome.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

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
from tests.dist_utils import run_ranks
from treeckpt import CheckpointError, CorruptChunkError

TREE = sample_tree(0)
OTHER = sample_tree(1)
FAST_CASES = 150  # per checkpoint
SLOW_CASES = 12_000
SLOW_CASES_TWO = 4_000
CASE_TIMEOUT_S = 20

KINDS = (
    "bitflip",
    "bitflips",
    "truncate",
    "zero_page",
    "append",
    "overwrite_run",
    "swap",
    "foreign",
    "foreign_and_flip",
    "delete",
    "duplicate",
)


@dataclass(frozen=True)
class Case:
    """One damage: new contents for some files (``None`` deletes the file)."""

    n: int
    kind: str
    changes: tuple[tuple[str, bytes | None], ...]

    @property
    def files(self) -> list[str]:
        return [rel for rel, _ in self.changes]

    def __str__(self) -> str:
        return f"case {self.n} ({self.kind} of {', '.join(self.files)})"


@dataclass(frozen=True)
class Subject:
    """A checkpoint to damage, another save of the same tree shape, what loading must give."""

    path: Path
    other: Path
    expected: dict[str, Any]
    template: Callable[[], dict[str, Any]]


def all_files(ck: Ckpt) -> list[str]:
    """The manifest, then each writer's chunk index and data files."""
    out = [MANIFEST]
    for rank in range(len(ck.manifest()["indexes"])):
        out += [ck.index_name(rank), *ck.data_files(rank)]
    return out


def _globals(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(9, 40, generator=g),  # uneven rows over 2 ranks
        "b": torch.arange(600, dtype=torch.int32).reshape(20, 30) * (seed + 1),
        "c": torch.zeros(300, dtype=torch.bfloat16) + seed,  # replicated: written once
        "step": 3 + seed,
    }


def _save_two_ranks(rank: int, world: int, path: str, seed: int) -> bool:
    mesh = init_device_mesh("cpu", (world,))
    full = _globals(seed)
    tree = {
        "a": distribute_tensor(full["a"], mesh, [Shard(0)]),
        "b": distribute_tensor(full["b"], mesh, [Shard(1)]),
        "c": distribute_tensor(full["c"], mesh, [Replicate()]),
        "step": full["step"],
    }
    treeckpt.save(tree, path, options=SAVE_OPTIONS)
    return True


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    """Written by one process: one chunk index, two data files."""
    base = tmp_path_factory.mktemp("fuzz-one")
    treeckpt.save(TREE, str(base / "ckpt"), options=SAVE_OPTIONS)
    treeckpt.save(OTHER, str(base / "other"), options=SAVE_OPTIONS)
    return Subject(base / "ckpt", base / "other", TREE, lambda: template_of(TREE))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    """Written by two gloo ranks: two chunk indexes, sharded and replicated tensors."""
    base = tmp_path_factory.mktemp("fuzz-two")
    for name, seed in (("ckpt", 0), ("other", 1)):
        run_ranks(2, _save_two_ranks, base, str(base / name), seed)
    assert len(Ckpt(base / "ckpt").manifest()["indexes"]) == 2
    return Subject(base / "ckpt", base / "other", _globals(0), lambda: template_of(_globals(0)))


SUBJECTS = ["one_rank", pytest.param("two_ranks", marks=pytest.mark.distributed)]


def generate(ck: Ckpt, other: Ckpt, seed: int, count: int) -> Iterator[Case]:
    """``count`` reproducible cases; the same seed always gives the same cases."""
    rng = random.Random(seed)
    files = all_files(ck)
    data_files = [f for f in files if f.endswith(".bin")]
    original = {rel: ck.read(rel) for rel in files}
    theirs = dict(zip(files, all_files(other), strict=True))  # same role in the other save
    foreign = {rel: other.read(theirs[rel]) for rel in files}

    def flip(data: bytes, flips: int) -> bytes:
        out = bytearray(data)
        for _ in range(flips):
            if out:
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)

    for n in range(count):
        kind = KINDS[n % len(KINDS)]
        rel = rng.choice(files)
        data = original[rel]
        changes: list[tuple[str, bytes | None]]
        if kind == "bitflip":
            changes = [(rel, flip(data, 1))]
        elif kind == "bitflips":
            changes = [(rel, flip(data, rng.randint(2, 8)))]
        elif kind == "truncate":
            changes = [(rel, data[: rng.randrange(len(data))])]
        elif kind == "zero_page":
            page = rng.choice((64, 512, 4096))
            start = rng.randrange(0, len(data), page) if len(data) > page else 0
            changes = [
                (rel, data[:start] + bytes(len(data[start : start + page])) + data[start + page :])
            ]
        elif kind == "append":
            extra = rng.choice((b"\x00", b"\n", b"}", rng.randbytes(rng.randint(1, 5000))))
            changes = [(rel, data + extra)]
        elif kind == "overwrite_run":
            start = rng.randrange(len(data))
            run = rng.randbytes(rng.randint(1, 64))
            changes = [(rel, (data[:start] + run + data[start + len(run) :])[: len(data)])]
        elif kind == "swap":
            a, b = rng.sample(files, 2)
            changes = [(a, original[b]), (b, original[a])]
        elif kind == "foreign":
            changes = [(rel, foreign[rel])]
        elif kind == "foreign_and_flip":
            changes = [(rel, flip(foreign[rel], 1))]
        elif kind == "delete":
            changes = [(rel, None)]
        else:  # duplicate: one data file copied over the other
            a, b = rng.sample(data_files, 2)
            changes = [(b, original[a])]
        yield Case(n=n, kind=kind, changes=tuple(changes))


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang


def run_case(ck: Ckpt, case: Case, original: dict[str, bytes], subject: Subject) -> str:
    """Apply ``case``, load, undo; the outcome name. Fails the test on a broken promise."""
    for rel, data in case.changes:
        if data is None:
            os.remove(ck.path / rel)
        else:
            ck.write(rel, data)
    via = "load" if case.n % 3 == 0 else "restore"
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        if via == "restore":
            got = treeckpt.restore(str(ck.path))
        else:
            got = treeckpt.load(subject.template(), str(ck.path))
        outcome = "identical"
        assert same(subject.expected, got), f"{case}: wrong values returned without an error"
    except CheckpointError as exc:
        msg = str(exc)
        named = [rel for rel in case.files if os.path.basename(rel) in msg]
        if not named and MANIFEST in case.files:
            # another save's manifest names that save's files, which are not here
            named = ["manifest"] if "index-r" in msg or "data-" in msg else []
        assert named, f"{case}: the error names no damaged file: {msg}"
        if isinstance(exc, CorruptChunkError) and "offset" in msg:
            assert "tensor '" in msg, f"{case}: a chunk error names no tensor: {msg}"
        outcome = type(exc).__name__
    except _Hang:
        pytest.fail(f"{case}: no outcome within {CASE_TIMEOUT_S} s (a hang)")
    except MemoryError:
        pytest.fail(f"{case}: MemoryError")
    except Exception as exc:
        pytest.fail(f"{case}: {type(exc).__name__} is not a CheckpointError: {exc}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for rel, _ in case.changes:
            ck.write(rel, original[rel])
    return outcome


def fuzz(subject: Subject, tmp_path: Path, seed: int, count: int) -> Counter[str]:
    ck = copy(subject.path, tmp_path / "ckpt")
    other = Ckpt(subject.other)
    original = {rel: ck.read(rel) for rel in all_files(ck)}
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for case in generate(ck, other, seed, count):
        result = run_case(ck, case, original, subject)
        outcomes[result] += 1
        kinds[f"{case.kind}:{'ok' if result == 'identical' else 'error'}"] += 1
    assert same(subject.expected, treeckpt.restore(str(ck.path)))  # every case was undone
    print(f"\n{count} cases, seed {seed}: {dict(outcomes)}\n{dict(sorted(kinds.items()))}")
    return outcomes


@pytest.mark.parametrize("name", SUBJECTS)
def test_fuzz_sampled(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    outcomes = fuzz(request.getfixturevalue(name), tmp_path, seed=20261122, count=FAST_CASES)
    assert sum(outcomes.values()) == FAST_CASES
    assert outcomes["identical"] < FAST_CASES // 4  # the damage is real, and detected


def test_generation_is_reproducible(one_rank: Subject) -> None:
    ck, other = Ckpt(one_rank.path), Ckpt(one_rank.other)
    assert list(generate(ck, other, 7, 50)) == list(generate(ck, other, 7, 50))
    assert {c.kind for c in generate(ck, other, 7, 50)} == set(KINDS)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("one_rank", SLOW_CASES),
        pytest.param("two_ranks", SLOW_CASES_TWO, marks=pytest.mark.distributed),
    ],
)
def test_fuzz_many(request: pytest.FixtureRequest, tmp_path: Path, name: str, count: int) -> None:
    start = time.monotonic()
    outcomes = fuzz(request.getfixturevalue(name), tmp_path, seed=1, count=count)
    assert sum(outcomes.values()) == count
    print(f"{name}: {count} cases in {time.monotonic() - start:.0f} s, zero wrong values")

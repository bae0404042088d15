"""Corruption fuzzing: seeded random damage to every file of a checkpoint.

Each case damages one or two files of a committed checkpoint (bit flips,
truncation, zeroed pages, appended bytes, overwritten runs, files swapped
with each other, files taken from another save of the same tree shape,
deleted files, and combinations) and loads it. The outcome must be the saved
values bit-exactly, or a ``CheckpointError`` whose message names a damaged
file (and the tensor, for a chunk error). Never wrong values, never another
exception, no ``MemoryError``; a case that takes more than
``CASE_TIMEOUT_S`` counts as a hang.

``test_fuzz_sampled`` runs a fixed seeded subset by default;
``test_fuzz_many`` (``slow``) runs ``SLOW_CASES`` cases and prints the count
of each outcome.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

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
from treeckpt import CheckpointError, CorruptChunkError

TREE = sample_tree(0)
OTHER = sample_tree(1)
FAST_CASES = 300
SLOW_CASES = 12_000
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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The checkpoint to damage and another save of the same tree shape (for foreign files)."""
    base = tmp_path_factory.mktemp("fuzz")
    treeckpt.save(TREE, str(base / "pristine"), options=SAVE_OPTIONS)
    treeckpt.save(OTHER, str(base / "other"), options=SAVE_OPTIONS)
    return base / "pristine", base / "other"


def generate(ck: Ckpt, other: Ckpt, seed: int, count: int) -> Iterator[Case]:
    """``count`` reproducible cases; the same seed always gives the same cases."""
    rng = random.Random(seed)
    files = ck.files()
    original = {rel: ck.read(rel) for rel in files}
    theirs = dict(zip(files, other.files(), strict=True))  # same role in the other save
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
            a, b = rng.sample(files[2:], 2) if len(files) > 3 else (files[1], files[2])
            changes = [(b, original[a])]
        yield Case(n=n, kind=kind, changes=tuple(changes))


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang


def run_case(ck: Ckpt, case: Case, original: dict[str, bytes]) -> str:
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
            got = treeckpt.load(template_of(TREE), str(ck.path))
        outcome = "identical"
        assert same(TREE, got), f"{case}: wrong values returned without an error"
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


def fuzz(checkpoints: tuple[Path, Path], tmp_path: Path, seed: int, count: int) -> Counter[str]:
    ck = copy(checkpoints[0], tmp_path / "ckpt")
    other = Ckpt(checkpoints[1])
    original = {rel: ck.read(rel) for rel in ck.files()}
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for case in generate(ck, other, seed, count):
        result = run_case(ck, case, original)
        outcomes[result] += 1
        kinds[f"{case.kind}:{'ok' if result == 'identical' else 'error'}"] += 1
    assert same(TREE, treeckpt.restore(str(ck.path)))  # every case was undone
    print(f"\n{count} cases, seed {seed}: {dict(outcomes)}\n{dict(sorted(kinds.items()))}")
    return outcomes


def test_fuzz_sampled(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    outcomes = fuzz(checkpoints, tmp_path, seed=20261122, count=FAST_CASES)
    assert sum(outcomes.values()) == FAST_CASES
    assert outcomes["identical"] < FAST_CASES // 4  # the damage is real, and detected


def test_generation_is_reproducible(checkpoints: tuple[Path, Path]) -> None:
    ck, other = Ckpt(checkpoints[0]), Ckpt(checkpoints[1])
    assert list(generate(ck, other, 7, 50)) == list(generate(ck, other, 7, 50))
    assert {c.kind for c in generate(ck, other, 7, 50)} == set(KINDS)


@pytest.mark.slow
def test_fuzz_many(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    start = time.monotonic()
    outcomes = fuzz(checkpoints, tmp_path, seed=1, count=SLOW_CASES)
    assert sum(outcomes.values()) == SLOW_CASES
    print(f"{SLOW_CASES} cases in {time.monotonic() - start:.0f} s, zero wrong values")

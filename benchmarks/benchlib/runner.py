"""Interleaved rounds: every contender saves, cold-loads and warm-loads the same state each round."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from .contenders import Contender
from .measure import (
    RssSampler,
    Stopwatch,
    cpu_snapshot,
    disk_usage,
    drop_page_cache,
    foreign_cores,
    fsync_tree,
    release_memory,
    settle_disk,
)
from .tree import Tree

MB = 1e6
BUSY_MACHINE_CORES = 0.25
"""Above this many cores used by other processes during a measurement, the harness warns."""


@dataclass(frozen=True)
class RoundResult:
    """Everything measured for one contender in one round (seconds, bytes, MB = 1e6 bytes)."""

    round_index: int
    position: int
    save_s: float
    save_call_s: float
    fsync_pass_s: float
    size_bytes: int
    n_files: int
    cold_load_s: float
    warm_load_s: float
    save_extra_rss_mb: float
    cold_load_extra_rss_mb: float
    warm_load_extra_rss_mb: float
    foreign_cpu_cores: float


@dataclass(frozen=True)
class SaveMeasurement:
    call_s: float
    fsync_pass_s: float
    extra_rss_mb: float


@dataclass(frozen=True)
class LoadMeasurement:
    seconds: float
    extra_rss_mb: float


def rotated(contenders: list[Contender], round_index: int) -> list[Contender]:
    """Round ``r`` starts with contender ``r mod n`` so no contender always runs first or last."""
    if not contenders:
        return []
    shift = round_index % len(contenders)
    return contenders[shift:] + contenders[:shift]


def measure_save(contender: Contender, state: Tree, path: str) -> SaveMeasurement:
    """Durable save: the contender's save call plus an fsync of every file and directory it wrote."""
    release_memory()
    settle_disk()
    with RssSampler() as rss:
        with Stopwatch() as call:
            contender.save(state, path)
        with Stopwatch() as fsync_pass:
            fsync_tree(path)
    return SaveMeasurement(call.seconds, fsync_pass.seconds, rss.extra_bytes / MB)


def measure_load(contender: Contender, state: Tree, path: str, *, cold: bool) -> LoadMeasurement:
    """Load into a fresh, pre-allocated template; cold loads first evict the checkpoint from the page cache."""
    template = contender.make_template(state)
    if cold:
        drop_page_cache(path)
    release_memory()
    with RssSampler() as rss, Stopwatch() as load:
        loaded = contender.load(template, path)
    contender.verify(state, loaded)
    del loaded, template
    return LoadMeasurement(load.seconds, rss.extra_bytes / MB)


def run_once(
    contender: Contender, state: Tree, path: str, round_index: int, position: int
) -> RoundResult:
    """Save, measure size, cold-load, warm-load, then delete the checkpoint."""
    cpu_start = cpu_snapshot()
    try:
        save = measure_save(contender, state, path)
        size_bytes, n_files = disk_usage(path)
        cold = measure_load(contender, state, path, cold=True)
        warm = measure_load(contender, state, path, cold=False)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    cpu_end = cpu_snapshot()
    return RoundResult(
        round_index=round_index,
        position=position,
        save_s=save.call_s + save.fsync_pass_s,
        save_call_s=save.call_s,
        fsync_pass_s=save.fsync_pass_s,
        size_bytes=size_bytes,
        n_files=n_files,
        cold_load_s=cold.seconds,
        warm_load_s=warm.seconds,
        save_extra_rss_mb=save.extra_rss_mb,
        cold_load_extra_rss_mb=cold.extra_rss_mb,
        warm_load_extra_rss_mb=warm.extra_rss_mb,
        foreign_cpu_cores=foreign_cores(cpu_start, cpu_end),
    )


def _progress(result: RoundResult, contender: Contender, rounds: int) -> None:
    print(
        f"  [round {result.round_index + 1}/{rounds}] {contender.key:<13} "
        f"save {result.save_s:7.3f} s (fsync pass {result.fsync_pass_s:.3f})  "
        f"cold {result.cold_load_s:7.3f} s  warm {result.warm_load_s:7.3f} s  "
        f"size {result.size_bytes / 1e9:.3f} GB in {result.n_files} files  "
        f"rss +{result.save_extra_rss_mb:.0f}/+{result.cold_load_extra_rss_mb:.0f}/"
        f"+{result.warm_load_extra_rss_mb:.0f} MB  other processes {result.foreign_cpu_cores:.2f} cores"
        + (
            "  <-- machine busy, figures suspect"
            if result.foreign_cpu_cores > BUSY_MACHINE_CORES
            else ""
        ),
        file=sys.stderr,
        flush=True,
    )


def warm_up(contenders: list[Contender], state: Tree, run_dir: str) -> None:
    """Save, load and verify a tiny state once per contender, untimed, to pay one-time costs
    (lazy imports, thread pools, first-call initialisation) before the measured rounds."""
    for contender in contenders:
        path = os.path.join(run_dir, f"{contender.key}-warmup")
        contender.prepare(state)
        try:
            contender.save(state, path)
            fsync_tree(path)
            contender.verify(state, contender.load(contender.make_template(state), path))
        finally:
            contender.release()
            shutil.rmtree(path, ignore_errors=True)


def run_rounds(
    contenders: list[Contender], state: Tree, run_dir: str, rounds: int
) -> tuple[dict[str, list[RoundResult]], list[list[str]]]:
    """Run ``rounds`` interleaved rounds; return per-contender results and each round's order."""
    results: dict[str, list[RoundResult]] = {c.key: [] for c in contenders}
    orders: list[list[str]] = []
    for contender in contenders:
        contender.prepare(state)
    try:
        for round_index in range(rounds):
            order = rotated(contenders, round_index)
            orders.append([c.key for c in order])
            for position, contender in enumerate(order):
                path = os.path.join(run_dir, f"{contender.key}-r{round_index}")
                result = run_once(contender, state, path, round_index, position)
                results[contender.key].append(result)
                _progress(result, contender, rounds)
    finally:
        for contender in contenders:
            contender.release()
        release_memory()
    return results, orders

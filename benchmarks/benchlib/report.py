"""Summaries (median, min, max), throughput, ratios against DCP defaults, markdown and JSON output."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import torch

from .contenders import Contender
from .runner import RoundResult

GB = 1e9
BASELINE_KEY = "dcp"
TIMED_METRICS = ("save_s", "cold_load_s", "warm_load_s")
SUMMARY_METRICS = (
    *TIMED_METRICS,
    "save_call_s",
    "fsync_pass_s",
    "size_bytes",
    "save_extra_rss_mb",
    "cold_load_extra_rss_mb",
    "warm_load_extra_rss_mb",
    "foreign_cpu_cores",
)


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values))


def summarize(results: list[RoundResult]) -> dict[str, Stat]:
    """Median/min/max over rounds of every summary metric."""
    return {
        metric: Stat.of([float(getattr(r, metric)) for r in results]) for metric in SUMMARY_METRICS
    }


def throughput(summary: dict[str, Stat], state_bytes: int) -> dict[str, float]:
    """GB/s (1 GB = 1e9 bytes of tensor data) from the median of each timed metric."""
    return {
        metric.removesuffix("_s"): state_bytes / summary[metric].median / GB
        for metric in TIMED_METRICS
    }


def versus_baseline(
    summary: dict[str, Stat], baseline: dict[str, Stat] | None
) -> dict[str, float] | None:
    """Speedups (baseline median time / this median time) and size ratio (this / baseline) vs DCP defaults."""
    if baseline is None:
        return None
    return {
        "save_speedup": baseline["save_s"].median / summary["save_s"].median,
        "cold_load_speedup": baseline["cold_load_s"].median / summary["cold_load_s"].median,
        "warm_load_speedup": baseline["warm_load_s"].median / summary["warm_load_s"].median,
        "size_ratio": summary["size_bytes"].median / baseline["size_bytes"].median,
    }


def _mount_of(path: str) -> dict[str, str]:
    path = os.path.realpath(path)
    best: Any = None
    for part in psutil.disk_partitions(all=True):
        inside = path == part.mountpoint or path.startswith(part.mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    if best is None:
        return {}
    return {"device": best.device, "mountpoint": best.mountpoint, "fstype": best.fstype}


def _git_commit(repo_root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def environment(repo_root: Path, workdir: str) -> dict[str, Any]:
    """Where and with what the figures were taken."""
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / GB, 1),
        "load_average_at_start": list(os.getloadavg()),
        "workdir_filesystem": _mount_of(workdir),
        "git_commit": _git_commit(repo_root),
    }


def build_report(
    *,
    contenders: list[Contender],
    results: dict[str, list[RoundResult]],
    orders: list[list[str]],
    header: dict[str, Any],
    state_bytes: int,
) -> dict[str, Any]:
    """The JSON document: header, then per contender its raw rounds, summary, GB/s and ratios."""
    summaries = {c.key: summarize(results[c.key]) for c in contenders}
    baseline = summaries.get(BASELINE_KEY)
    per_contender: dict[str, Any] = {}
    for contender in contenders:
        summary = summaries[contender.key]
        per_contender[contender.key] = {
            "label": contender.label,
            "description": contender.description,
            "summary": {metric: asdict(stat) for metric, stat in summary.items()},
            "gb_per_s": throughput(summary, state_bytes),
            "vs_dcp_defaults": versus_baseline(summary, baseline),
            "rounds": [asdict(r) for r in results[contender.key]],
        }
    return {**header, "round_orders": orders, "contenders": per_contender}


def _seconds(stat: dict[str, float]) -> str:
    return f"{stat['median']:.3f} ({stat['min']:.3f}-{stat['max']:.3f})"


def _ratio(vs: dict[str, float] | None, key: str) -> str:
    return "—" if vs is None else f"{vs[key]:.2f}x"


def _rss(stat: dict[str, float]) -> str:
    return f"{stat['median']:.0f} (max {stat['max']:.0f})"


def markdown(report: dict[str, Any]) -> str:
    """Two markdown tables: times and throughput; ratios vs DCP defaults and memory."""
    lines = [
        f"### {report['state']} state: {report['state_bytes'] / GB:.3f} GB in {report['tensor_count']} tensors, "
        f"{report['rounds']} interleaved rounds, torch {report['environment']['torch']}",
        "",
        "Times in seconds: median (min-max). GB/s = tensor bytes / median seconds, 1 GB = 1e9 B.",
        "",
        "| contender | durable save s | save GB/s | cold load s | cold GB/s | warm load s | warm GB/s | size GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["contenders"].values():
        summary, rate = entry["summary"], entry["gb_per_s"]
        lines.append(
            f"| {entry['label']} | {_seconds(summary['save_s'])} | {rate['save']:.2f} "
            f"| {_seconds(summary['cold_load_s'])} | {rate['cold_load']:.2f} "
            f"| {_seconds(summary['warm_load_s'])} | {rate['warm_load']:.2f} "
            f"| {summary['size_bytes']['median'] / GB:.3f} |"
        )
    lines += [
        "",
        "Ratios against DCP defaults (speedup = DCP median time / contender median time; size = contender / DCP). "
        "Peak extra RSS in MB (1e6 B): median (max) of peak minus RSS at start.",
        "",
        "| contender | save speedup | cold load speedup | warm load speedup | size ratio "
        "| save extra RSS MB | cold load extra RSS MB | warm load extra RSS MB | fsync pass s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["contenders"].values():
        summary, vs = entry["summary"], entry["vs_dcp_defaults"]
        lines.append(
            f"| {entry['label']} | {_ratio(vs, 'save_speedup')} | {_ratio(vs, 'cold_load_speedup')} "
            f"| {_ratio(vs, 'warm_load_speedup')} | {_ratio(vs, 'size_ratio')} "
            f"| {_rss(summary['save_extra_rss_mb'])} | {_rss(summary['cold_load_extra_rss_mb'])} "
            f"| {_rss(summary['warm_load_extra_rss_mb'])} | {summary['fsync_pass_s']['median']:.3f} |"
        )
    lines += ["", *floor_table(report), "", _machine_load_line(report)]
    return "\n".join(lines)


FLOOR_KEYS = ("disk-floor-parallel", "disk-floor")
DCP_SWEEP_KEYS = ("dcp", "dcp-threads2", "dcp-threads4", "dcp-threads8")


def best_dcp(report: dict[str, Any], metric: str) -> tuple[str, float] | None:
    """The DCP thread count with the lowest median ``metric`` (the sweep's best), and that median."""
    found = [
        (report["contenders"][k]["summary"][metric]["median"], k)
        for k in DCP_SWEEP_KEYS
        if k in report["contenders"]
    ]
    if not found:
        return None
    t, k = min(found)
    return k, t


def floor_table(report: dict[str, Any]) -> list[str]:
    """Every contender against the floor (the parallel one when measured) and DCP's best thread count."""
    entries = report["contenders"]
    floor_key = next((k for k in FLOOR_KEYS if k in entries), None)
    if floor_key is None:
        return []
    floor = entries[floor_key]["summary"]
    save_best, cold_best = best_dcp(report, "save_s"), best_dcp(report, "cold_load_s")
    throttle = report.get("throttle_gbps")
    storage = f"throttled to {throttle} GB/s per rank" if throttle else "local disk"
    lines = [
        f"Against the floor, {entries[floor_key]['label']} ({storage}): time / floor time "
        "(1.00x is the floor; lower is impossible without writing fewer bytes)"
        + (
            f", and DCP's best thread count (save: {entries[save_best[0]]['label']}, "
            f"cold load: {entries[cold_best[0]]['label']}): DCP best time / contender time."
            if save_best and cold_best
            else "."
        ),
        "",
        "| contender | save s | save x floor | save vs DCP best | cold load s | cold x floor "
        "| cold vs DCP best | size GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries.values():
        summary = entry["summary"]
        save, cold = summary["save_s"]["median"], summary["cold_load_s"]["median"]
        vs_save = f"{save_best[1] / save:.2f}x" if save_best else "—"
        vs_cold = f"{cold_best[1] / cold:.2f}x" if cold_best else "—"
        lines.append(
            f"| {entry['label']} | {save:.3f} | {save / floor['save_s']['median']:.2f}x | {vs_save} "
            f"| {cold:.3f} | {cold / floor['cold_load_s']['median']:.2f}x | {vs_cold} "
            f"| {summary['size_bytes']['median'] / GB:.3f} |"
        )
    return lines


def _machine_load_line(report: dict[str, Any]) -> str:
    rounds = [r for entry in report["contenders"].values() for r in entry["rounds"]]
    mean = statistics.fmean(r["foreign_cpu_cores"] for r in rounds)
    worst = max(r["foreign_cpu_cores"] for r in rounds)
    return (
        f"Other processes kept {mean:.2f} cores busy on average during the measurements "
        f"(worst contender-round {worst:.2f}) out of {report['environment']['cpu_count']}."
    )

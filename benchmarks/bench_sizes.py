#!/usr/bin/env python
"""Time against state size: treeckpt vs DCP vs torch.save, 0.1 to 3 GB of GPT-2-style state.

    .venv/bin/python benchmarks/bench_sizes.py [--sizes 0.1,0.3,1,1.5,3] [--rounds 3] [--state fp32]

For each size, a GPT-2-style model + AdamW state of about that many bytes is
built (d_model 768; the layer count and vocabulary are chosen to hit the
size), and every contender saves (durable: fsync included), cold-loads and
warm-loads it, interleaved round by round, exactly as ``bench_single.py``
does. Medians go to ``benchmarks/results/sizes-<state>.json`` and a plot to
``docs/img/perf-sizes-<state>.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib.contenders import import_treeckpt, make_contenders
from benchlib.measure import release_memory
from benchlib.report import environment, summarize
from benchlib.runner import run_rounds, warm_up
from benchlib.state import GPT2_TINY, STATE_DTYPES, ModelShape, build_state, gpt2_param_specs
from benchlib.tree import tensor_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ["treeckpt", "dcp", "torch-save"]


def shape_for(target_bytes: float, itemsize: int) -> ModelShape:
    """The GPT-2-style shape (d_model 768) whose weights + 2 Adam moments come closest to the target."""
    best: tuple[float, ModelShape] | None = None
    for vocab in (2048, 8192, 50257):
        for n_layer in range(1, 65):
            shape = ModelShape(vocab=vocab, n_layer=n_layer)
            params = sum(_numel(spec.shape) for spec in gpt2_param_specs(shape))
            err = abs(params * 3 * itemsize - target_bytes) / target_bytes
            if best is None or err < best[0]:
                best = (err, shape)
    assert best is not None
    return best[1]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plot(rows: list[dict[str, Any]], out: Path, state_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric, title in (
        (axes[0], "save_s", "durable save"),
        (axes[1], "cold_load_s", "cold load"),
    ):
        for key in CONTENDERS:
            pts = [
                (r["state_bytes"] / 1e9, r["medians"][key][metric])
                for r in rows
                if key in r["medians"]
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_title(f"{title} ({state_name})")
        ax.set_xlabel("state size (GB)")
        ax.set_ylabel("seconds (median)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="0.1,0.3,1,1.5,3", help="state sizes in GB (default 0.1,0.3,1,1.5,3)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--state", choices=sorted(STATE_DTYPES), default="fp32")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "bench-tmp"))
    args = parser.parse_args(argv)

    module, note = import_treeckpt(REPO_ROOT)
    contenders = make_contenders(module, CONTENDERS)
    dtype = STATE_DTYPES[args.state]
    itemsize = 4 if args.state == "fp32" else 2
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="sizes-", dir=args.workdir)
    rows: list[dict[str, Any]] = []
    try:
        warm_up(contenders, build_state(GPT2_TINY, dtype, 0), run_dir)
        for size in (float(s) for s in args.sizes.split(",")):
            shape = shape_for(size * 1e9, itemsize)
            state = build_state(shape, dtype, 0)
            nbytes = tensor_bytes(state)
            print(f"== {nbytes / 1e9:.2f} GB ({shape})", file=sys.stderr, flush=True)
            results, _ = run_rounds(contenders, state, run_dir, args.rounds)
            del state
            release_memory()
            medians = {
                key: {m: s.median for m, s in summarize(res).items()}
                for key, res in results.items()
            }
            rows.append({"target_gb": size, "state_bytes": nbytes, "medians": medians})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    report = {
        "benchmark": "bench_sizes",
        "state": args.state,
        "rounds": args.rounds,
        "treeckpt": note,
        "environment": environment(REPO_ROOT, args.workdir),
        "rows": rows,
    }
    out = REPO_ROOT / "benchmarks" / "results" / f"sizes-{args.state}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = REPO_ROOT / "docs" / "img" / f"perf-sizes-{args.state}.png"
    plot(rows, png, args.state)

    print(
        "| state | contender | save s | cold load s | warm load s | size on disk | save vs DCP | cold load vs DCP |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        dcp = row["medians"].get("dcp")
        for key, m in row["medians"].items():
            vs_save = f"{dcp['save_s'] / m['save_s']:.2f}x" if dcp else "-"
            vs_load = f"{dcp['cold_load_s'] / m['cold_load_s']:.2f}x" if dcp else "-"
            print(
                f"| {row['state_bytes'] / 1e9:.2f} GB | {key} | {m['save_s']:.2f} | {m['cold_load_s']:.2f} | "
                f"{m['warm_load_s']:.2f} | {m['size_bytes'] / 1e9:.2f} GB | {vs_save} | {vs_load} |"
            )
    print(f"\nwritten: {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

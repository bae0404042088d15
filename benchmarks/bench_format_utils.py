"""Peak memory of the format conversions: treeckpt.dcp.format_utils against torch's.

Builds a state of about ``--gb`` GiB (float32 tensors of 64 MiB), writes it as
a torch DCP checkpoint, a treeckpt checkpoint and a ``torch.save`` file, then
runs each conversion in a fresh process and reports that process's peak RSS
(``VmHWM``, file-backed pages of memory maps included), its peak anonymous
memory (``RssAnon`` sampled every 10 ms) and the same for a process that
only imports torch, for scale::

    python benchmarks/bench_format_utils.py --gb 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import torch
which, src, dst = sys.argv[1:4]
peak_anon = [0]
done = threading.Event()


def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def sample():  # anonymous memory (not file pages) is what can run a machine out of memory
    while not done.wait(0.01):
        peak_anon[0] = max(peak_anon[0], rss_anon())


threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if which == "baseline":
    pass
elif which == "torch.dcp_to_torch_save":
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(src, dst)
elif which == "torch.torch_save_to_dcp":
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
    torch_save_to_dcp(src, dst)
elif which == "treeckpt.dcp_to_torch_save":
    from treeckpt.dcp.format_utils import dcp_to_torch_save
    dcp_to_torch_save(src, dst)
elif which == "treeckpt.torch_save_to_dcp":
    from treeckpt.dcp.format_utils import torch_save_to_dcp
    torch_save_to_dcp(src, dst)
secs = time.perf_counter() - t0
done.set()
peak_anon[0] = max(peak_anon[0], rss_anon())
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):  # not ru_maxrss: Linux carries that over from the parent
        hwm = int(line.split()[1]) * 1024
print(json.dumps({"peak_rss": hwm, "peak_anon": peak_anon[0], "seconds": secs}))
"""


def _make_inputs(root: Path, gb: float) -> dict[str, Path]:
    import torch
    import torch.distributed.checkpoint as tdcp

    import treeckpt

    n = max(1, round(gb * 16))
    torch.manual_seed(0)
    state = {f"layer{i}": {"w": torch.randn(4096, 4096)} for i in range(n)}  # 64 MiB each
    paths = {"dcp": root / "dcp", "treeckpt": root / "treeckpt", "pt": root / "state.pt"}
    tdcp.save(state, checkpoint_id=str(paths["dcp"]), no_dist=True)
    treeckpt.save(state, paths["treeckpt"])
    torch.save(state, paths["pt"])
    return paths


def _run(which: str, src: Path | str, dst: Path | str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="state size in GiB")
    parser.add_argument(
        "--dir",
        default=str(Path(tempfile.gettempdir()) / "bench-format-utils"),
        help="scratch directory (removed afterwards)",
    )
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    paths = _make_inputs(root, args.gb)
    print(f"inputs written in {time.perf_counter() - t0:.0f} s under {root}")
    runs = [
        ("baseline", "", ""),
        ("torch.dcp_to_torch_save", paths["dcp"], root / "o1.pt"),
        ("treeckpt.dcp_to_torch_save", paths["dcp"], root / "o2.pt"),
        ("treeckpt.dcp_to_torch_save", paths["treeckpt"], root / "o3.pt"),
        ("torch.torch_save_to_dcp", paths["pt"], root / "o4"),
        ("treeckpt.torch_save_to_dcp", paths["pt"], root / "o5"),
    ]
    print(f"{'conversion':30} {'input':10} {'peak RSS MiB':>13} {'peak RssAnon MiB':>16} {'s':>6}")
    for which, src, dst in runs:
        r = _run(which, src, dst)
        label = Path(src).name if src else "-"
        print(
            f"{which:30} {label:10} {r['peak_rss'] / 2**20:13.0f} "
            f"{r['peak_anon'] / 2**20:16.0f} {r['seconds']:6.1f}"
        )
        if dst and Path(dst).is_dir():
            shutil.rmtree(dst)
        elif dst and Path(dst).exists():
            Path(dst).unlink()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Write one large Lightning-layout checkpoint in two formats, for consolidation memory figures.

    python tests/lightning/make_big_checkpoint.py DIR [--mib 384]

DIR/dcp: torch's DCP format as Lightning's FSDPStrategy writes it (``model``,
``optimizer_0``, ``meta.pt``), which Lightning's own consolidate command reads;
DIR/treeckpt: the same state as a treeckpt checkpoint in Lightning's layout.
Random data (incompressible): the worst case for memory.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

import treeckpt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--mib", type=int, default=384, help="total tensor data (MiB)")
    args = parser.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    n = max(1, args.mib // 48)  # each layer: 16 MiB weight + 2 x 16 MiB optimizer state
    g = torch.Generator().manual_seed(0)
    model = {f"layers.{i}.weight": torch.randn(2048, 2048, generator=g) for i in range(n)}
    state = {
        k: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": v.abs()}
        for k, v in model.items()
    }
    optim = {"state": state, "param_groups": [{"lr": 1e-3, "params": list(model)}]}
    meta = {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.6.6", "loops": {}}

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": model, "optimizer_0": optim}, checkpoint_id=str(out / "dcp"), no_dist=True
        )
    torch.save(meta, out / "dcp" / "meta.pt")
    treeckpt.save(
        {**meta, "state_dict": model, "optimizer_states": [optim]},
        out / "treeckpt",
    )
    print(f"wrote {out}/dcp and {out}/treeckpt: {3 * n * 16} MiB of tensor data")


if __name__ == "__main__":
    main()

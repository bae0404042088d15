"""The treeckpt demo: the Lightning workflow on CPU, with treeckpt doing the checkpointing.

Run it with ``bash scripts/demo.sh`` (or ``python scripts/demo.py [--dir DIR]``
where treeckpt and Lightning are installed). It trains a small
transformer on synthetic data on 2 processes (gloo) with Lightning's
``ModelParallelStrategy`` (FSDP2) through :mod:`treeckpt.lightning`, saves a
sharded checkpoint, resumes it on 1 process and checks that the model and
optimizer state are bit-identical to the saved ones, inspects the checkpoint,
consolidates it into one file and loads that with ``torch.load``.

Each Lightning run is a separate ``python scripts/demo.py --job ...``
process: Lightning's launcher starts the other ranks by re-running that
command, and a process can only take part in one process group layout.

This script is not part of the installed package; the Lightning tests import
``run_job`` and ``states_equal`` from it (``scripts.demo``) as their harness.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import treeckpt

VOCAB, DIM, SEQ, BATCH = 256, 64, 32, 8


# ------------------------------------------------------------------ the Lightning job


def _job(args: argparse.Namespace) -> int:
    """One Lightning run on ``args.devices`` processes: train (from a checkpoint or
    not) to ``args.steps``, record the state at the start and at the end."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy as PlainStrategy
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.utils.data import DataLoader, Dataset

    from treeckpt.lightning import ModelParallelStrategy

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*FSDP2-wrapped module.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*barebones.*")
    out = Path(args.out)

    class Tokens(Dataset[tuple[torch.Tensor, torch.Tensor]]):
        def __len__(self) -> int:
            return 4096

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(i)
            t = torch.randint(0, VOCAB, (SEQ + 1,), generator=g)
            return t[:-1], t[1:]

    class TinyLM(pl.LightningModule):
        """A two-layer transformer language model, sharded with FSDP2 in configure_model."""

        def __init__(self, lr: float = 3e-3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.embed = torch.nn.Embedding(VOCAB, DIM)
            self.layers = torch.nn.ModuleList(
                torch.nn.TransformerEncoderLayer(DIM, 4, 4 * DIM, dropout=0.0, batch_first=True)
                for _ in range(2)
            )
            self.head = torch.nn.Linear(DIM, VOCAB)
            self.losses: list[float] = []

        def configure_model(self) -> None:
            if args.fsdp1:
                return  # FSDPStrategy wraps the layers itself
            from torch.distributed.fsdp import fully_shard

            assert self.device_mesh is not None
            mesh = self.device_mesh["data_parallel"]
            for layer in self.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def _record(self, name: str) -> None:
            """Every rank gathers the full state; rank 0 writes it for the checks."""
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            root = self.trainer.strategy.model  # the FSDP1 wrapper, or this module (FSDP2)
            assert root is not None
            model = get_model_state_dict(root, options=opts)
            opt = self.trainer.optimizers[0]
            optim = get_optimizer_state_dict(root, opt, options=opts)
            if self.global_rank == 0:
                torch.save(
                    {"model": model, "optim": optim["state"], "step": self.trainer.global_step},
                    out / f"{name}.pt",
                )

        def on_train_start(self) -> None:
            self._record("start")

        def on_train_end(self) -> None:
            self._record("end")

    from lightning.pytorch.callbacks import ModelCheckpoint

    strategy: Any
    if args.fsdp1:  # Lightning's FSDPStrategy (FSDP1): needs CUDA
        from treeckpt.lightning import FSDPStrategy

        policy = {torch.nn.TransformerEncoderLayer}
        strategy = FSDPStrategy(auto_wrap_policy=policy, process_group_backend="nccl")
    else:
        strategy_cls = PlainStrategy if args.plain else ModelParallelStrategy
        strategy = strategy_cls(data_parallel_size=args.devices, tensor_parallel_size=1)
    # Every 10 steps, keeping only the newest: saves through the strategy, removes the older one.
    every = ModelCheckpoint(out / "checkpoints", every_n_train_steps=10, save_top_k=1)
    trainer = pl.Trainer(
        accelerator="gpu" if args.fsdp1 else "cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        callbacks=[every],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    loader = DataLoader(Tokens(), batch_size=BATCH, shuffle=True)
    t0 = time.perf_counter()
    trainer.fit(model, loader, ckpt_path=args.resume)
    fit_s = time.perf_counter() - t0
    if args.save:
        t0 = time.perf_counter()
        trainer.save_checkpoint(args.save)
        save_s = time.perf_counter() - t0
    else:
        save_s = 0.0
    if trainer.global_rank == 0:
        (out / "summary.json").write_text(
            json.dumps(
                {
                    "world": trainer.world_size,
                    "steps": trainer.global_step,
                    "loss": model.losses[-1] if model.losses else None,
                    "fit_s": fit_s,
                    "save_s": save_s,
                }
            )
        )
    return 0


def run_job(
    devices: int,
    steps: int,
    out: Path,
    *,
    save: str | None = None,
    resume: str | None = None,
    plain: bool = False,
    fsdp1: bool = False,
    timeout: float = 300,
) -> dict[str, Any]:
    """Run one Lightning job in a fresh process (Lightning starts the other ranks); its summary."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", "--devices", str(devices)]
    cmd += ["--steps", str(steps), "--out", str(out)]
    if save:
        cmd += ["--save", save]
    if resume:
        cmd += ["--resume", resume]
    if plain:
        cmd.append("--plain")
    if fsdp1:
        cmd.append("--fsdp1")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the Lightning job {' '.join(cmd[2:])} failed (exit {proc.returncode}):\n"
            + proc.stderr[-4000:]
        )
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def states_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Model and optimizer state equal bit for bit (same keys, dtypes, shapes, bytes)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix: d}

    fa, fb = flat({"m": a["model"], "o": a["optim"]}), flat({"m": b["model"], "o": b["optim"]})
    if fa.keys() != fb.keys():
        return False
    for k, x in fa.items():
        y = fb[k]
        if isinstance(x, torch.Tensor):
            if not (
                isinstance(y, torch.Tensor)
                and x.dtype == y.dtype
                and x.shape == y.shape
                and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
            ):
                return False
        elif x != y:
            return False
    return True


# ------------------------------------------------------------------ the narrative


def _demo(workdir: Path) -> int:
    from treeckpt.tools.consolidate import consolidate

    ckpt = workdir / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    for stale in (workdir / "ckpt.consolidated",):
        stale.unlink(missing_ok=True)

    print(
        "1. Training a 2-layer transformer on 2 processes (Lightning ModelParallelStrategy, FSDP2, "
        "gloo), 20 steps of synthetic data; checkpointing through treeckpt.lightning"
    )
    t0 = time.perf_counter()
    saved = run_job(2, 20, workdir / "run-save", save=str(ckpt))
    print(
        f"   loss after {saved['steps']} steps: {saved['loss']:.4f}; saved a sharded checkpoint "
        f"to {ckpt} in {saved['save_s']:.2f} s ({time.perf_counter() - t0:.0f} s with start-up)"
    )

    print("\n2. Resuming with trainer.fit(ckpt_path=...) on 1 process (a different process count)")
    t0 = time.perf_counter()
    resumed = run_job(1, 25, workdir / "run-resume", resume=str(ckpt))
    expected = torch.load(workdir / "run-save" / "end.pt", weights_only=True)
    loaded = torch.load(workdir / "run-resume" / "start.pt", weights_only=True)
    same = states_equal(expected, loaded) and loaded["step"] == expected["step"]
    print(
        f"   resumed at step {loaded['step']}; model and optimizer state equal to the saved ones, "
        f"bit for bit: {'yes' if same else 'NO'}"
    )
    print(
        f"   trained on to step {resumed['steps']} on {resumed['world']} process, loss "
        f"{resumed['loss']:.4f} ({time.perf_counter() - t0:.0f} s with start-up)"
    )

    print("\n3. Inspecting the checkpoint (manifest and chunk indexes only, no tensor data read)")
    info = treeckpt.metadata(ckpt)
    print(
        f"   {len(info.tensors)} tensors, {info.raw_bytes / 1e6:.2f} MB raw, "
        f"{info.stored_bytes / 1e6:.2f} MB on disk in {len(info.files)} data files, "
        f"written by {info.world_size} processes"
    )
    shown = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters.lr")
    print("   metadata: " + ", ".join(f"{k}={info.values[k]!r}" for k in shown if k in info.values))
    for t in sorted(info.tensors.values(), key=lambda t: -t.raw_bytes)[:4]:
        print(
            f"   {t.fqn:44s} {t.dtype:8s} {list(t.shape)!s:10s} {t.ratio:.2f}x  {t.chunks} chunks"
        )

    print("\n4. Consolidating into one torch.load-able file, on CPU (treeckpt consolidate)")
    report = consolidate(ckpt)
    back = torch.load(report.dst, weights_only=True, map_location="cpu")
    model_ok = all(
        torch.equal(back["state_dict"][k], v) for k, v in expected["model"].items()
    ) and set(back["state_dict"]) == set(expected["model"])
    print(
        f"   wrote {report.dst} ({report.bytes_written / 1e6:.2f} MB, {report.tensors} tensors) "
        f"in {report.seconds:.2f} s"
    )
    print(
        f"   torch.load(weights_only=True) gives Lightning's layout: state_dict, "
        f"optimizer_states and {len(back) - 2} more keys; {len(back['state_dict'])} model "
        f"tensors equal to the trained ones: {'yes' if model_ok else 'NO'}"
    )
    if not (same and model_ok):
        print("demo FAILED")
        return 1
    print("\ndemo finished: all checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", help="where to put the checkpoint (default: a temporary directory)"
    )
    job = parser.add_argument_group("one Lightning run (used by the demo itself)")
    job.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    job.add_argument("--devices", type=int, default=2, help=argparse.SUPPRESS)
    job.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    job.add_argument("--out", help=argparse.SUPPRESS)
    job.add_argument("--save", help=argparse.SUPPRESS)
    job.add_argument("--resume", help=argparse.SUPPRESS)
    job.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    job.add_argument("--fsdp1", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        return _job(args)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="treeckpt-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return _demo(workdir)


if __name__ == "__main__":
    raise SystemExit(main())

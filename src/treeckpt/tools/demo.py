"""The treeckpt demo: train on 2 ranks, save sharded, resume on 3, inspect, consolidate.

Run it with ``python -m treeckpt.tools.demo [--dir DIR]``. Everything runs on
CPU with gloo; the model is a small transformer trained on synthetic data.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import uuid
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import treeckpt

VOCAB, DIM, SEQ = 256, 64, 32


class TinyLM(torch.nn.Module):
    """A two-layer transformer language model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(DIM, 4, 4 * DIM, dropout=0.0, batch_first=True)
            for _ in range(2)
        )
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (8, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _sharded_model(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyLM()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, opt


def _train(
    model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, steps: int, rank: int
) -> float:
    loss = torch.tensor(0.0)
    for step in range(start, start + steps):
        x, y = _batch(step, rank)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


def _fingerprint(model: torch.nn.Module) -> dict[str, float]:
    return {k: float(v.full_tensor().double().sum()) for k, v in model.state_dict().items()}


def _save_job(rank: int, world: int, path: str) -> dict[str, Any]:
    model, opt = _sharded_model(world)
    t0 = time.perf_counter()
    loss = _train(model, opt, 0, 30, rank)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = treeckpt.save({"model": model, "optim": opt, "step": 30, "loss": loss}, path)
    save_s = time.perf_counter() - t0
    return {
        "loss": loss,
        "train_s": train_s,
        "save_s": save_s,
        "report": res.plan.report() if res.plan else "",
        "fingerprint": _fingerprint(model),
    }


def _resume_job(rank: int, world: int, path: str) -> dict[str, Any]:
    model, opt = _sharded_model(world)
    t0 = time.perf_counter()
    state = treeckpt.load({"model": model, "optim": opt, "step": 0, "loss": 0.0}, path)
    load_s = time.perf_counter() - t0
    fingerprint = _fingerprint(model)
    loss = _train(model, opt, state["step"], 5, rank)
    return {"step": state["step"], "load_s": load_s, "fingerprint": fingerprint, "loss": loss}


def _child(rank: int, world: int, init: str, job: Any, path: str, q: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        q.put((rank, job(rank, world, path), None))
        dist.destroy_process_group()
    except BaseException as exc:
        q.put((rank, None, f"{type(exc).__name__}: {exc}"))


def run_on_ranks(world: int, job: Any, path: str, workdir: str) -> list[Any]:
    """Run ``job(rank, world, path)`` on ``world`` processes joined by gloo."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    init = f"file://{workdir}/rendezvous-{uuid.uuid4().hex}"
    procs = [ctx.Process(target=_child, args=(r, world, init, job, path, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            rank, value, error = q.get(timeout=300)
            if error:
                raise RuntimeError(f"rank {rank} failed: {error}")
            results[rank] = value
    except queue.Empty:
        raise RuntimeError("the ranks did not finish within 300 s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dir", help="where to put the checkpoint (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    workdir = args.dir or tempfile.mkdtemp(prefix="treeckpt-demo-")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "ckpt")
    shutil.rmtree(path, ignore_errors=True)

    print("1. Training a 2-layer transformer on 2 ranks (gloo, FSDP2), 30 steps of synthetic data")
    saved = run_on_ranks(2, _save_job, path, workdir)
    print(f"   loss after 30 steps: {saved[0]['loss']:.4f} ({saved[0]['train_s']:.1f} s)")
    print(f"   saved a sharded checkpoint to {path} in {max(s['save_s'] for s in saved):.2f} s")
    print("   " + saved[0]["report"].replace("\n", "\n   "))

    print("\n2. Resuming on 3 ranks (a different world size: every shard is resliced)")
    resumed = run_on_ranks(3, _resume_job, path, workdir)
    same = resumed[0]["fingerprint"] == saved[0]["fingerprint"]
    print(
        f"   loaded step {resumed[0]['step']} in {max(r['load_s'] for r in resumed):.2f} s; "
        f"parameters equal to the saved ones: {'yes' if same else 'NO'}"
    )
    print(f"   trained 5 more steps on 3 ranks, loss {resumed[0]['loss']:.4f}")

    print("\n3. Inspecting the checkpoint (manifest and chunk indexes only, no tensor data read)")
    info = treeckpt.metadata(path)
    print(
        f"   {len(info.tensors)} tensors, {info.raw_bytes / 1e6:.2f} MB raw, "
        f"{info.stored_bytes / 1e6:.2f} MB on disk in {len(info.files)} data files, "
        f"written by {info.world_size} ranks; values: "
        + ", ".join(
            f"{k}={v!r}" for k, v in info.values.items() if not k.startswith("optim.param_groups")
        )
    )
    for t in sorted(info.tensors.values(), key=lambda t: -t.raw_bytes)[:5]:
        print(
            f"   {t.fqn:45s} {t.dtype:9s} {list(t.shape)!s:14s} {t.ratio:.2f}x  {t.chunks} chunks"
        )

    print("\n4. Consolidating into one torch.load-able file, on CPU")
    full = treeckpt.restore(path)
    out = path + ".consolidated.pt"
    torch.save(full, out)
    back = torch.load(out, weights_only=True)
    ok = all(torch.equal(back["model"][k], full["model"][k]) for k in full["model"])
    print(
        f"   wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB); torch.load(weights_only=True) "
        f"gives {len(back['model'])} model tensors, equal to the checkpoint: {'yes' if ok else 'NO'}"
    )
    if not (same and ok):
        print("demo FAILED")
        return 1
    print("\ndemo finished: all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

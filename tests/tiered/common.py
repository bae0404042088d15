"""A small deterministic training job for the tiered checkpoint tests.

Every rank trains the same small model on the same data (so a rerun from
the seed gives the reference bit for bit), and holds a row-sharded DTensor
whose values depend on the step (so a restore on another world size
reshards).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from treeckpt.tiered import TieredCheckpointer

ROWS, COLS = 10, 6


def nodes_of(world: int, per_node: int) -> list[int]:
    return [r // per_node for r in range(world)]


def memory_dir(tmp: Path) -> str:
    return str(tmp / "mem" / "node{node}")


def make_state(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    table = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])
    state = {"model": model, "optim": optim, "table": table, "step": 0}
    return model, optim, state


def train(model: nn.Module, optim: torch.optim.Optimizer, state: dict[str, Any], step: int) -> None:
    """One step: the same on every rank, and the same every time it is run."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    y = torch.randn(32, 4, generator=g)
    optim.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optim.step()
    full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) * step + 0.5
    table = state["table"]
    mesh = table.device_mesh
    new = distribute_tensor(full, mesh, [Shard(0)])
    table.to_local().copy_(new.to_local())
    state["step"] = step


def reference(step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    """Parameters, optimizer state and the full table after ``step`` steps from the seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for s in range(1, step + 1):
        g = torch.Generator().manual_seed(1000 + s)
        x = torch.randn(32, 8, generator=g)
        y = torch.randn(32, 4, generator=g)
        optim.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optim.step()
    full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) * step + 0.5
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        optim.state_dict(),
        full,
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def check_restored(state: dict[str, Any], step: int) -> list[str]:
    """What differs, bit for bit, between a restored state and the reference at ``step``."""
    params, optim_sd, full = reference(step)
    bad = []
    for k, v in state["model"].state_dict().items():
        if not same_bits(v, params[k]):
            bad.append(f"model.{k}")
    got = state["optim"].state_dict()
    for pid, st in optim_sd["state"].items():
        for name, val in st.items():
            mine = got["state"].get(pid, {}).get(name)
            if mine is None or not same_bits(torch.as_tensor(mine), torch.as_tensor(val)):
                bad.append(f"optim.state.{pid}.{name}")
    table = state["table"]
    expect = distribute_tensor(full, table.device_mesh, [Shard(0)]).to_local()
    if not same_bits(table.to_local(), expect):
        bad.append("table")
    if state["step"] != step:
        bad.append(f"step {state['step']} != {step}")
    return bad


def checkpointer(tmp: Path, rank: int, per_node: int, **kw: Any) -> TieredCheckpointer:
    kw.setdefault("memory_every", 2)
    kw.setdefault("timeout_s", 20.0)
    return TieredCheckpointer(memory_dir(tmp), node=rank // per_node, **kw)


def run_and_save(
    rank: int, world: int, tmp: Path, per_node: int, steps: int, kw: dict[str, Any]
) -> Any:
    """Train ``steps`` steps, saving every step the checkpointer says is due; return bytes held."""
    kw = dict(kw)
    save_as = kw.pop("save_as", {})  # training step -> the step number it is saved as
    model, optim, state = make_state(0)
    ckpt = checkpointer(tmp, rank, per_node, **kw)
    for step in range(1, steps + 1):
        train(model, optim, state, step)
        ckpt.save(save_as.get(step, step), state)
    ckpt.wait()
    held = ckpt.memory_bytes
    ckpt.close()
    return held


def restore_and_check(rank: int, world: int, tmp: Path, per_node: int, kw: dict[str, Any]) -> Any:
    _, _, state = make_state(123)  # other initial values: the restore must overwrite them all
    ckpt = checkpointer(tmp, rank, per_node, **kw)
    step, report = ckpt.restore(state)
    bad = check_restored(state, step)
    ckpt.close()
    return step, report, bad


def kill_self() -> None:
    os.kill(os.getpid(), 9)


def save_then_die_in_replication(rank: int, world: int, tmp: Path, per_node: int) -> Any:
    """Save steps 2 and 4; rank 3 dies while step 4 is being replicated."""
    import time

    model, optim, state = make_state(0)
    ckpt = checkpointer(tmp, rank, per_node, timeout_s=6.0)
    if rank == 3:

        def die(phase: str) -> None:
            if phase == "replicate" and state["step"] == 4:
                kill_self()

        ckpt._fault = die
    for step in range(1, 5):
        train(model, optim, state, step)
        ckpt.save(step, state)
        if step == 2:
            ckpt.wait()
    start = time.monotonic()
    try:
        ckpt.wait()
    except Exception as exc:
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "ok", "", time.monotonic() - start

"""Run a benchmark job on N processes joined by a gloo process group (fork, file:// rendezvous)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _child(rank: int, world: int, init: str, job: Any, arg: Any, q: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        q.put((rank, job(rank, world, arg), None))
        dist.destroy_process_group()
    except BaseException as exc:
        q.put((rank, None, f"{type(exc).__name__}: {exc}"))


def run_on_ranks(world: int, job: Any, arg: Any, workdir: str, timeout_s: float = 600) -> list[Any]:
    """Run ``job(rank, world, arg)`` on ``world`` processes; each rank's result, in rank order."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    init = f"file://{workdir}/rendezvous-{uuid.uuid4().hex}"
    procs = [ctx.Process(target=_child, args=(r, world, init, job, arg, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            rank, value, error = q.get(timeout=timeout_s)
            if error:
                raise RuntimeError(f"rank {rank} failed: {error}")
            results[rank] = value
    except queue.Empty:
        raise RuntimeError(f"the ranks did not finish within {timeout_s:g} s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]

"""Run a function on N real processes joined by a gloo process group.

Fork start method, ``torch.set_num_threads(1)`` first in each child, a
``file://`` rendezvous in the test's tmp dir, and a timeout on every join.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DEAD = object()  # result of a rank that exited or was killed without reporting


def _child(
    rank: int,
    world: int,
    init: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    q: Any,
    group_timeout: float,
) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=init,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=group_timeout),
        )
        res = fn(rank, world, *args)
        # Plain pickle: torch's queue reductions would pass tensors through
        # shared memory that vanishes when this process exits.
        q.put((rank, "ok", pickle.dumps(res)))
    except BaseException:
        q.put((rank, "err", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)


def run_ranks(
    world: int,
    fn: Callable[..., Any],
    tmp_path: Path,
    *args: Any,
    timeout: float = 120.0,
    allow_dead: bool = False,
    group_timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; return each rank's result.

    A rank that raised makes this raise with its traceback. With
    ``allow_dead``, a rank that exits without reporting gets ``DEAD``.
    ``group_timeout`` is the process group's timeout (``init_process_group``).
    """
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    init = f"file://{tmp_path}/rdv-{uuid.uuid4().hex}"
    procs = [
        ctx.Process(target=_child, args=(r, world, init, fn, args, q, group_timeout))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, status, value = q.get(timeout=0.5)
                results[rank] = (status, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    try:
                        while True:
                            rank, status, value = q.get(timeout=0.5)
                            results[rank] = (status, value)
                    except queue.Empty:
                        break
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    errors = {r: v for r, (s, v) in results.items() if s == "err"}
    if errors:
        raise AssertionError(
            "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        )
    missing = [r for r in range(world) if r not in results]
    if missing and not allow_dead:
        raise AssertionError(f"rank(s) {missing} did not report within {timeout} s")
    return [pickle.loads(results[r][1]) if r in results else DEAD for r in range(world)]

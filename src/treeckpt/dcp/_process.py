"""``AsyncCheckpointerType.PROCESS`` on several ranks: each rank's save runs in a
checkpoint process of its own, so compression and I/O never hold the training
process's GIL.

- Each training process starts one checkpoint process (``spawn``) on its first
  PROCESS save and keeps it for the next ones. The checkpoint processes of
  the group's ranks form their own gloo process group, with the same ranks:
  rank 0 picks a free TCP port (on ``MASTER_ADDR``, else its host name) and
  broadcasts it over the caller's group, and each checkpoint process joins it.
  The save's collectives run there, never on the training group.
- The staged state dict crosses by ``torch.multiprocessing``'s sharing, as a
  few shared-memory slabs (:class:`SharedArena`) and the tree of views into
  them (:func:`packed`): handles, not bytes, and a handful of file
  descriptors however many tensors there are. A DTensor or ShardedTensor crosses as its global shape, dtype and
  local shards (what treeckpt saves of it; its device mesh or process group
  belongs to the training process) and is saved by the checkpoint process as
  explicit shards.
- An error in the checkpoint process reaches the caller's future as a
  ``CheckpointException`` naming the rank; so does the process exiting.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import socket
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing  # registers tensor sharing with multiprocessing's pickler
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter

from treeckpt.dcp._shards import ShardSet
from treeckpt.dcp._walk import map_containers
from treeckpt.dcp.api import CheckpointException
from treeckpt.errors import CheckpointError
from treeckpt.shell.coord import Coordinator
from treeckpt.shell.sharded import adapter_of

__all__ = [
    "CheckpointProcess",
    "Packed",
    "SharedArena",
    "checkpoint_process",
    "packed",
    "unpacked",
]

#: Seconds a checkpoint process may take to start and join its group.
START_TIMEOUT_S = 600.0


#: Bytes of one shared-memory slab of a :class:`SharedArena` (larger tensors get their own).
SLAB_BYTES = 256 * 2**20
_ALIGN = 64


class SharedArena:
    """Host buffers carved from a few shared-memory slabs.

    Sending a tensor to another process passes one file descriptor per
    storage; buffers carved from slabs cross as a handful of slabs however
    many tensors the state has. Slab pages are touched only where written.
    """

    def __init__(self) -> None:
        self.slabs: list[torch.Tensor] = []  # 1-D uint8, each its own shared storage
        self._used = 0

    def alloc(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        start = -(-self._used // _ALIGN) * _ALIGN
        if not self.slabs or start + nbytes > self.slabs[-1].numel():
            storage = torch.UntypedStorage._new_shared(max(nbytes, SLAB_BYTES))
            self.slabs.append(torch.empty(0, dtype=torch.uint8).set_(storage))
            start = 0
        self._used = start + nbytes
        raw = self.slabs[-1][start : start + nbytes]
        return raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def place(self, t: torch.Tensor) -> tuple[int, int] | None:
        """``(slab, byte offset)`` of ``t`` when it is a contiguous buffer of this arena."""
        if not t.is_contiguous() or t.device.type != "cpu":
            return None
        ptr = t.data_ptr()
        for i, slab in enumerate(self.slabs):
            base = slab.data_ptr()
            if base <= ptr and ptr + t.numel() * t.element_size() <= base + slab.numel():
                return i, ptr - base
        return None


@dataclass(frozen=True)
class _View:
    """A tensor in the arena sent along: slab, byte offset, shape, dtype."""

    slab: int
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Shards:
    """A sharded tensor as it crosses to the checkpoint process."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    shards: list[tuple[tuple[int, ...], tuple[int, ...], _View]]


@dataclass(frozen=True)
class Packed:
    """A staged state dict ready to cross: the tree with :class:`_View`\\ s, and the slabs."""

    tree: Any
    slabs: list[torch.Tensor]


def packed(staged: Any, arena: SharedArena | None = None) -> Packed:
    """``staged`` with every tensor in ``arena``'s shared memory (copied there unless staged
    there already), sharded tensors as their local shards."""
    arena = arena if arena is not None else SharedArena()

    def view(t: torch.Tensor) -> _View:
        t = t.detach()
        where = arena.place(t)
        if where is None:
            buf = arena.alloc(t.shape, t.dtype)
            buf.copy_(t)
            where = arena.place(buf)
            assert where is not None or t.numel() == 0
        slab, offset = where if where is not None else (0, 0)
        return _View(slab=slab, offset=offset, shape=tuple(t.shape), dtype=t.dtype)

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if type(obj) in (torch.Tensor, torch.nn.Parameter):
                return view(obj)
            adapter = adapter_of(obj)
            assert adapter is not None
            desc = adapter.describe("", obj)
            return _Shards(
                shape=tuple(desc.shape),
                dtype=desc.dtype,
                shards=[
                    (tuple(box.offsets), tuple(box.sizes), view(local))
                    for box, local in adapter.local_shards("", obj)
                ],
            )
        return obj

    tree = map_containers(walk, staged)
    return Packed(tree=tree, slabs=list(arena.slabs))


def unpacked(pack: Packed) -> Any:
    """The state dict of ``pack``, its tensors views of the shared slabs (no copy)."""

    def tensor(v: _View) -> torch.Tensor:
        nbytes = math.prod(v.shape) * torch.empty((), dtype=v.dtype).element_size()
        if nbytes == 0:
            return torch.empty(v.shape, dtype=v.dtype)
        raw = pack.slabs[v.slab][v.offset : v.offset + nbytes]
        return raw.view(v.dtype).view(v.shape)

    def walk(obj: Any) -> Any:
        if isinstance(obj, _View):
            return tensor(obj)
        if isinstance(obj, _Shards):
            shards = [(offs, sizes, tensor(v)) for offs, sizes, v in obj.shards]
            return ShardSet(obj.shape, obj.dtype, shards)
        return obj

    return map_containers(walk, pack.tree)


def _serve(init_method: str, rank: int, world: int, timeout_s: float, conn: Any) -> None:
    """The checkpoint process: join the group, then save each request until told to stop."""
    import torch.distributed as dist

    from treeckpt.dcp._engine import coordinator, run_save
    from treeckpt.shell.coord import LocalCoordinator

    try:
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        conn.send(("ready", os.getpid()))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the training process is gone
        except BaseException as exc:  # a writer or planner that cannot be rebuilt here
            text = f"the save request cannot be unpickled here ({type(exc).__name__}: {exc})"
            conn.send(("error", text, traceback.format_exc(), [rank]))
            continue
        if request is None:
            break
        state_dict, writer, planner, use_collectives = request
        try:
            coord = coordinator(None, False) if use_collectives else LocalCoordinator()
            md = run_save(unpacked(state_dict), writer, planner, coord, use_collectives)
            conn.send(("done", md))
        except BaseException as exc:
            ranks = sorted(exc.failures) if isinstance(exc, CheckpointException) else [rank]
            conn.send(("error", _describe(exc), traceback.format_exc(), ranks))
        del state_dict
    dist.destroy_process_group()


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CheckpointException) else f"{type(exc).__name__}: {exc}"


class CheckpointProcess:
    """One training process's checkpoint process, and the thread that waits on it."""

    def __init__(self, coord: Coordinator) -> None:
        self.rank, self.world = coord.rank, coord.world_size
        where = coord.broadcast(_free_address() if coord.rank == 0 else None, "process-group")
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(f"tcp://{where[0]}:{where[1]}", self.rank, self.world, START_TIMEOUT_S, child),
            name=f"treeckpt-checkpoint-r{self.rank}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        reply = self._reply(START_TIMEOUT_S)
        if reply[0] != "ready":
            raise CheckpointError(
                f"rank {self.rank}: the checkpoint process did not start: {reply[1]}"
            )
        self.pid: int = reply[1]

    def _reply(self, timeout_s: float | None) -> tuple[Any, ...]:
        try:
            if timeout_s is not None and not self._conn.poll(timeout_s):
                return ("error", f"no answer within {timeout_s:.0f} s", "")
            reply: tuple[Any, ...] = self._conn.recv()
            return reply
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            return ("error", f"the checkpoint process exited (exit code {self._proc.exitcode})", "")

    def alive(self) -> bool:
        return self._proc.is_alive()

    def submit(
        self,
        pack: Packed,
        writer: StorageWriter,
        planner: SavePlanner | None,
        use_collectives: bool,
    ) -> Future[Any]:
        """Send one save; the returned future holds its ``Metadata`` or its error."""
        upload: Future[Any] = Future()
        upload.set_running_or_notify_cancel()
        self._lock.acquire()  # one save at a time per checkpoint process
        try:
            self._conn.send((pack, writer, planner, use_collectives))
        except BaseException as exc:
            self._lock.release()
            upload.set_exception(self._failure(f"{type(exc).__name__}: {exc}", ""))
            return upload

        def wait() -> None:
            try:
                reply = self._reply(None)
                if reply[0] == "done":
                    upload.set_result(reply[1])
                else:
                    upload.set_exception(self._failure(*reply[1:]))
            except BaseException as exc:  # the future is always completed
                upload.set_exception(self._failure(f"{type(exc).__name__}: {exc}", ""))
            finally:
                self._lock.release()

        # Not a daemon: the interpreter waits for a running save at exit.
        threading.Thread(target=wait, name="treeckpt-async-save-dcp-process", daemon=False).start()
        return upload

    def _failure(
        self, text: str, trace: str, ranks: list[int] | None = None
    ) -> CheckpointException:
        """The error of a save: ``failures`` holds the ranks that failed (this one when
        its checkpoint process failed or exited)."""
        where = f"rank {self.rank}'s checkpoint process (pid {self._proc.pid})"
        err = CheckpointError(f"{where}: {text}")
        err.remote_traceback = trace  # type: ignore[attr-defined]
        failed = ranks if ranks else [self.rank]
        return CheckpointException(
            f"{where}: {text}", {r: (err, traceback.StackSummary()) for r in failed}
        )

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)


def _free_address() -> tuple[str, int]:
    host = os.environ.get("MASTER_ADDR") or socket.getfqdn()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
    return host, port


_PROCESSES: dict[tuple[int, int, int], CheckpointProcess] = {}
_GUARD = threading.Lock()


def checkpoint_process(coord: Coordinator) -> CheckpointProcess:
    """This process's checkpoint process for the ranks of ``coord``, started on first use.

    Every rank calls it at the same point (its first start is collective).
    """
    key = (os.getpid(), coord.rank, coord.world_size)
    with _GUARD:
        proc = _PROCESSES.get(key)
        alive = proc is not None and proc.alive()
    agreed = coord.gather(alive, "checkpoint-process")
    every_alive = coord.broadcast(None if agreed is None else all(agreed), "checkpoint-process")
    if proc is not None and every_alive:
        return proc
    if proc is not None:
        proc.close()
    proc = CheckpointProcess(coord)
    with _GUARD:
        _PROCESSES[key] = proc
    return proc

"""Tiered checkpoints: a memory tier replicated to peers, durable storage behind it.

Every ``memory_every`` steps each rank writes its shards, as an ordinary
treeckpt checkpoint layout, into a directory of its node's host memory
(``/dev/shm`` by default, which outlives the training process), and sends a
copy to ``replicas`` partner ranks on other nodes over ``torch.distributed``
point to point. Every ``durable_every`` steps (or on demand) the same
files go to durable storage, where they form an ordinary checkpoint.

A save, on the caller's thread: flatten, plan (collectives, bounded), copy
the tensors to host buffers. Then, in a background thread, over a gloo
group of its own:

1. every rank writes its chunks into its node's ``step-<N>/`` (the save
   pipeline: checksums, chunk indexes), rank 0 commits the manifest and
   every node gets a copy of it;
2. every rank sends its chunk index and data files to its partners, and
   verifies (checksums) the copies it receives;
3. the ranks agree that every copy is in place; only then does each node
   remove its older steps (two phases: a failure before leaves the
   previous step whole);
4. when due, every rank copies its own files from the memory tier to the
   durable step directory, and rank 0 commits the same manifest there.

A restore: every node verifies what it holds, the ranks agree (pure
:func:`~treeckpt.tiered.decide.decide_restore`) on the newest step the
survivors hold whole, the missing files travel point to point, and every
rank loads from its node's copy with the ordinary loader (resharding
included). Without a whole memory step, the newest durable step is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, Literal

from treeckpt import api
from treeckpt.core.options import Compression, LoadOptions, SaveOptions
from treeckpt.errors import CheckpointError, CheckpointNotFoundError, CollectiveError, OptionsError
from treeckpt.manager.policy import KeepPolicy
from treeckpt.manager.retention import retain
from treeckpt.manager.root import META_KEY, StepRoot, step_dir
from treeckpt.shell import inflight
from treeckpt.shell.coord import Coordinator, agreed
from treeckpt.shell.ranks import coordinator, make_save_dir, on_coordinator
from treeckpt.shell.save import SaveResult, commit_save, prepare_save
from treeckpt.shell.staging import StagingPool
from treeckpt.store import layout
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.checksum import checksum
from treeckpt.store.reader import read_index, read_indexes, read_manifest
from treeckpt.tiered import _files
from treeckpt.tiered.decide import RestoreDecision, StepCopy, decide_restore
from treeckpt.tiered.placement import node_groups, partners, sources

__all__ = ["RestoreReport", "TieredCheckpointer", "TieredFuture", "step_kind"]

#: the checkpointer's own key in a step's ``user_metadata``
TIERED_KEY = "treeckpt.tiered"

Kind = Literal["none", "memory", "durable"]
Source = Literal["local", "peer", "durable"]


def step_kind(
    step: int, memory_every: int, durable_every: int | None, *, durable: bool | None = None
) -> Kind:
    """What a save at ``step`` does: nothing, the memory tier, or the memory and durable tiers.

    ``durable=True`` forces a durable save, ``False`` forbids one; ``None``
    follows ``durable_every``. A durable save always goes through the memory tier.
    """
    if durable is None:
        durable = durable_every is not None and step % durable_every == 0
    if durable:
        return "durable"
    return "memory" if step % memory_every == 0 else "none"


class TieredFuture(Future["TieredResult"]):
    """The outcome of one tiered save; ``result()`` raises its error on every rank alike.

    ``blocked_s``: seconds the save held the caller (plan and host copy).
    """

    step: int = -1
    kind: Kind = "none"
    blocked_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TieredResult:
    """A finished tiered save: its step, whether it reached durable storage, bytes moved."""

    step: int
    durable: bool
    memory_bytes: int
    sent_bytes: int
    received_bytes: int
    save: SaveResult | None = None
    #: seconds of each part of the background work: write, replicate, agree, durable
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreReport:
    """Where a restore found its step and where each stored byte came from.

    ``bytes_by_source``: stored bytes of the checkpoint as this rank's node
    read it, by source (``"local"``: the node's own memory copy, ``"peer"``:
    received from another node now, ``"durable"``: durable storage).
    ``fqn_sources``: the same per tensor FQN. ``writer_sources``: for a
    memory restore, each writer rank's files came from this node (``None``)
    or the rank named.
    """

    step: int
    tier: Literal["memory", "durable"]
    bytes_by_source: dict[str, int]
    fqn_sources: dict[str, dict[str, int]]
    writer_sources: dict[int, int | None] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: tuple[str, ...] = ()
    #: seconds of each phase of the restore on this rank, in order (see ``docs/tiered.md``)
    phases: dict[str, float] = field(default_factory=dict)


def node_identity(node: Any, rank: int) -> str:
    """This process's node: ``node`` when given, else the launcher's environment, else the host.

    torchrun sets ``GROUP_RANK`` (the node's rank); ``LOCAL_WORLD_SIZE`` with
    ``RANK`` gives it too. The host name is the last resort.
    """
    if node is not None:
        return str(node)
    env = os.environ
    if env.get("GROUP_RANK", "").isdigit():
        return env["GROUP_RANK"]
    if env.get("LOCAL_WORLD_SIZE", "").isdigit() and int(env["LOCAL_WORLD_SIZE"]) > 0:
        return str(rank // int(env["LOCAL_WORLD_SIZE"]))
    return socket.gethostname()


class _Laps:
    """Seconds of consecutive phases: ``lap(name)`` adds the time since the previous lap to ``name``."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block; resume it after, if it ran before.

    A restore allocates many small, short-lived objects (chunk records,
    boxes, plans); in a process that holds many objects already (torch and a
    model), they trigger full collections, which walk every object of the
    process: about 0.3 s of the first restore of a GPT-2-small state on 2 ranks. Reference
    counting still frees everything at once; cycles wait for the next
    collection.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _node_numbers(names: list[str]) -> list[int]:
    """Node names as consecutive numbers, in numeric order when all are numbers."""
    uniq = sorted(set(names), key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
    num = {n: i for i, n in enumerate(uniq)}
    return [num[n] for n in names]


class TieredCheckpointer:
    """Save every few steps to peers' host memory and, less often, to durable storage; restore fast.

    Args:
        memory_dir: the node-local directory of the memory tier (``/dev/shm``
            by default, which outlives the process but not the node); a
            ``{node}`` in it is replaced by the node's identifier.
        durable: a path or fsspec URL of durable storage (steps under it as
            a :class:`~treeckpt.CheckpointManager` lays them out), or ``None``.
        memory_every: save to the memory tier at steps divisible by it.
        durable_every: also save to durable storage at steps divisible by it.
        replicas: extra copies of each rank's shards, on as many other nodes.
        node: this process's node identifier (default: torchrun's environment).
        durable_keep: durable steps kept (the newest ones).
        process_group: the ranks taking part (the default group).
        timeout_s: bound of every collective and transfer.
        options: how the memory tier's chunks are written (default: uncompressed,
            plain replicated tensors not compared across ranks); never fsynced.
    """

    def __init__(
        self,
        memory_dir: str | os.PathLike[str] | None = None,
        durable: Any = None,
        *,
        memory_every: int = 1,
        durable_every: int | None = None,
        replicas: int = 1,
        node: Any = None,
        durable_keep: int = 2,
        process_group: Any = None,
        timeout_s: float = 120.0,
        options: SaveOptions | None = None,
    ) -> None:
        if type(memory_every) is not int or memory_every < 1:
            raise OptionsError(f"memory_every must be a positive int, got {memory_every!r}")
        if durable_every is not None and (type(durable_every) is not int or durable_every < 1):
            raise OptionsError(
                f"durable_every must be a positive int or None, got {durable_every!r}"
            )
        if durable_every is not None and durable is None:
            raise OptionsError("durable_every needs a durable path or URL")
        self.memory_every = memory_every
        self.durable_every = durable_every
        self.replicas = replicas
        self.durable = None if durable is None else str(durable)
        self.durable_keep = durable_keep
        self._keep = KeepPolicy(max_to_keep=durable_keep)
        self.timeout_s = float(timeout_s)
        self._pg = process_group
        base_options = options or SaveOptions(
            compression=Compression(mode="never"), check_replicas=False
        )
        # Memory is not fsynced; every collective is bounded by the checkpointer's timeout.
        self._options = dataclasses.replace(base_options, sync=False, timeout_s=self.timeout_s)
        self._pool = StagingPool()
        self._lock = threading.Lock()
        self._running: TieredFuture | None = None
        self._held = 0
        #: test hook: called with the name of each phase of a save's background part
        self._fault: Callable[[str], None] | None = None

        coord = self._coord()
        self.rank, self.world_size = coord.rank, coord.world_size
        mine = node_identity(node, self.rank)
        names = _all(coord, mine, "tiered:nodes")
        self.nodes: tuple[int, ...] = tuple(_node_numbers(names))
        self.node = self.nodes[self.rank]
        self.node_name = mine
        groups = node_groups(self.nodes)
        self.leaders = tuple(g[0] for g in groups.values())
        self.is_leader = self.rank in self.leaders
        self.partners = partners(self.nodes, replicas)[self.rank]
        self.sources = sources(self.nodes, replicas)[self.rank]
        if memory_dir is None:
            run = os.environ.get("TORCHELASTIC_RUN_ID", "")
            run = run if run.replace("-", "").replace("_", "").isalnum() else ""
            memory_dir = "/dev/shm/treeckpt-tiered" + (f"-{run}" if run else "")
        base = str(memory_dir)
        self.memory_dir = base.replace("{node}", mine)
        os.makedirs(self.memory_dir, exist_ok=True)

    # ------------------------------------------------------------------ plumbing

    def _coord(self) -> Coordinator:
        return coordinator(self._pg, self.timeout_s, private=True)

    def _group(self, coord: Coordinator) -> Any:
        return getattr(coord, "group", None)

    def _sub(self, step: int) -> Backend:
        return open_backend(os.path.join(self.memory_dir, step_dir(step)))

    def _node_backend(self) -> Backend:
        return open_backend(self.memory_dir)

    def _hit(self, phase: str) -> None:
        if self._fault is not None:
            self._fault(phase)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the memory tier this rank holds: its own newest step and its partners' copies.

        After a memory restore, until the next save: the bytes of the node's copy of the step.
        """
        return self._held

    @property
    def staging_bytes(self) -> int:
        """Host memory of the staging buffers (kept from one save to the next)."""
        return self._pool.nbytes

    def wait(self) -> TieredResult | None:
        """Block until the running save has finished; raise its error, if it failed."""
        running = self._running
        if running is None:
            return None
        return running.result()

    def _join(self) -> None:
        running = self._running
        if running is not None:
            futures_wait([running])

    def close(self) -> None:
        """Wait for the running save (its error is not raised here) and free the staging buffers."""
        self._join()
        self._pool.clear()

    # ------------------------------------------------------------------ save

    def save(
        self, step: int, state: Any, *, durable: bool | None = None, allow_pickle: bool = False
    ) -> TieredFuture | None:
        """Save ``state`` as ``step`` if due; return the save's future, or ``None`` (not due).

        Blocks for the plan and the host copy only; the rest runs in the
        background (a second save waits for it). ``durable=True`` also
        writes this step to durable storage (``False``: never).
        """
        if type(step) is not int or step < 0:
            raise OptionsError(f"step must be an int >= 0, got {step!r}")
        if durable and self.durable is None:
            raise OptionsError("durable=True needs a durable path or URL")
        kind = step_kind(step, self.memory_every, self.durable_every, durable=durable)
        if kind == "none":
            return None
        with self._lock:
            self._join()
            future = TieredFuture()
            future.step, future.kind = step, kind
            future.set_running_or_notify_cancel()
            start = time.perf_counter()
            sub: Backend | None = None
            try:
                coord = self._coord()
                sub = self._sub(step)
                make_save_dir(sub, self._options)
                meta = {META_KEY: {"time": time.time()}, TIERED_KEY: {"step": step}}
                prepared = prepare_save(
                    state, sub, options=self._options, coord=coord, allow_pickle=allow_pickle
                )
            except Exception as exc:
                if sub is not None:
                    sub.close()
                future.set_exception(exc)
                return future
            failed: BaseException | None = None
            try:
                prepared, _ = self._pool.stage(prepared)
            except Exception as exc:
                failed = exc
            future.blocked_s = time.perf_counter() - start

            def run() -> None:
                assert sub is not None
                try:
                    res = self._finish(coord, sub, step, kind, prepared, meta, failed)
                except BaseException as exc:
                    if not isinstance(exc, CheckpointError):
                        exc = CheckpointError(
                            f"step {step}: tiered save failed on rank {self.rank}: "
                            f"{type(exc).__name__}: {exc}"
                        ).with_traceback(exc.__traceback__)
                    future.set_exception(exc)
                else:
                    future.set_result(res)
                finally:
                    sub.close()

            self._running = future
            inflight.track(future)
            threading.Thread(target=run, name="treeckpt-tiered-save", daemon=False).start()
            return future

    def _finish(
        self,
        coord: Coordinator,
        sub: Backend,
        step: int,
        kind: Kind,
        prepared: Any,
        meta: dict[str, Any],
        failed: BaseException | None,
    ) -> TieredResult:
        save_id = prepared.save_id
        clock = {"t": time.perf_counter()}
        seconds: dict[str, float] = {}

        def lap(name: str) -> None:
            now = time.perf_counter()
            seconds[name] = now - clock["t"]
            clock["t"] = now

        received: list[tuple[str, int]] = []
        mine: list[tuple[str, int]] = []
        try:
            try:
                if failed is None:
                    sub.makedirs(layout.data_dir(save_id))
            except OSError as exc:
                failed = exc
            self._hit("write")
            result = commit_save(
                prepared, sub, options=self._options, coord=coord, user_metadata=meta, failed=failed
            )
            lap("write")
            # Every node gets the manifest: its copy of the step is then a checkpoint
            # directory (the part of one) the ordinary reader verifies.
            blob = on_coordinator(
                coord, "tiered:manifest", lambda: sub.read_file(layout.MANIFEST, 1 << 28)
            )
            manifest = read_manifest_bytes(blob, sub)
            err: BaseException | None = None
            try:
                # (replacing a manifest an older run left under the same step number)
                if self.is_leader and _files.manifest_checksum(sub) != checksum(blob):
                    sub.commit_file(layout.MANIFEST, blob, sync=False)
                mine = _files.own_files(sub, save_id, self.rank)
            except Exception as exc:
                err = exc
            listings = _all(coord, None if err else mine, "tiered:list")
            if err is None:
                try:
                    self._hit("replicate")
                    sends = [(p, sub, mine) for p in self.partners]
                    recvs = []
                    for s in self.sources:
                        files = listings[s] or []
                        for name, _ in files:
                            _files.check_name(name, save_id, s)
                        recvs.append((s, sub, files))
                        received.extend(files)
                    lap("list")
                    _files.exchange(
                        self._group(coord), self.timeout_s, sends, recvs, "tiered:replicate"
                    )
                    for s in self.sources:
                        if listings[s]:  # the copy is whole (a restore checks its chunks)
                            _files.writer_files(sub, manifest, s, chunks=False)
                except Exception as exc:  # a CollectiveError too: agree raises it at once
                    err = exc
            lap("replicate")
            coord.agree("tiered:replicated", err)
            lap("agree")
        except BaseException:
            self._discard(sub, mine + received)
            raise
        # Every copy of the new step is in place on every node: the older steps go.
        if self.is_leader:
            self._remove_steps_except(step)
        own = sum(s for _, s in mine)
        got = sum(s for _, s in received)
        self._held = own + got
        if kind == "durable":
            self._hit("durable")
            self._write_durable(coord, sub, step, save_id, mine, blob)
            lap("durable")
        return TieredResult(
            step=step,
            durable=kind == "durable",
            memory_bytes=own + got,
            sent_bytes=own * len(self.partners),
            received_bytes=got,
            save=result,
            seconds=seconds,
        )

    def _discard(self, sub: Backend, files: list[tuple[str, int]]) -> None:
        """After a failed save: remove the files this rank wrote or received (best effort)."""
        for name, _ in files:
            with contextlib.suppress(Exception):
                sub.remove(name)

    def _write_durable(
        self,
        coord: Coordinator,
        sub: Backend,
        step: int,
        save_id: str,
        mine: list[tuple[str, int]],
        blob: bytes,
    ) -> None:
        assert self.durable is not None
        root = StepRoot(self.durable)
        try:
            opts = SaveOptions(timeout_s=self.timeout_s)
            on_coordinator(coord, "tiered:durable-dir", lambda: root.make_step_dir(step, opts))

            def copy() -> None:
                dsub = root.open_step(step)
                try:
                    dsub.makedirs(layout.data_dir(save_id))
                    for name, size in mine:
                        _files.copy_durable(sub, dsub, name, size)
                finally:
                    dsub.close()

            agreed(coord, "tiered:durable-write", copy)

            def commit() -> None:
                dsub = root.open_step(step)
                try:
                    if dsub.supports_fsync:
                        dsub.sync_dir(layout.data_dir(save_id))
                    dsub.commit_file(layout.MANIFEST, blob, sync=True)
                finally:
                    dsub.close()
                retain(root, step, self._keep, sync=True)

            on_coordinator(coord, "tiered:durable-commit", commit)
        finally:
            root.close()

    # ------------------------------------------------------------------ restore

    def restore(
        self, template: Any, *, strict: bool = True, allow_pickle: bool = False
    ) -> tuple[int, RestoreReport]:
        """Load the newest step the memory tier holds whole (else the newest durable one) into ``template``.

        Returns the step and a :class:`RestoreReport` (where the bytes came from).
        Python's cyclic garbage collector is paused while it runs (see
        :func:`paused_gc`).

        Raises:
            CheckpointNotFoundError: no whole memory step and no durable step.
            CollectiveError: a rank died or stalled (bounded by ``timeout_s``).
        """
        with paused_gc():
            return self._restore(template, strict, allow_pickle)

    def _restore(
        self, template: Any, strict: bool, allow_pickle: bool
    ) -> tuple[int, RestoreReport]:
        self._join()
        start = time.perf_counter()
        lap = _Laps()
        coord = self._coord()
        lap("group")
        skipped: list[str] = []
        # First pass: the copies' indexes and sizes are checked, and the load
        # checks every chunk it reads. When it finds a damaged one, every copy
        # is checked chunk by chunk, and the damaged ones are not used.
        for chunks in (False, True):
            copies: list[StepCopy] = []
            manifests: dict[int, bytes] = {}
            summaries: dict[int, dict[int, dict[str, int]]] = {}
            if self.is_leader:
                node = self._node_backend()
                try:
                    copies, manifests, summaries = _files.inventory(node, self._sub, chunks=chunks)
                finally:
                    node.close()
            lap("inventory")
            payloads = _all(coord, (copies, manifests, summaries), "tiered:inventory")
            invs = {r: payloads[r][0] for r in self.leaders}
            members = {g[0]: g for g in node_groups(self.nodes).values()}
            decision = decide_restore(invs, self.leaders, members)
            lap("decide")
            if decision is None:
                break
            try:
                step, report = self._restore_memory(
                    coord, decision, payloads, template, strict, allow_pickle, start, chunks, lap
                )
                return step, dataclasses.replace(
                    report, skipped=tuple(skipped), phases=dict(lap.seconds)
                )
            except CollectiveError:
                raise
            except CheckpointError as exc:
                skipped.append(f"memory step {decision.step}: {exc}")
        step, report = self._restore_durable(
            coord, template, strict, allow_pickle, start, skipped, lap
        )
        return step, dataclasses.replace(report, phases=dict(lap.seconds))

    def _leader_of(self, rank: int) -> int:
        return node_groups(self.nodes)[self.nodes[rank]][0]

    def _restore_memory(
        self,
        coord: Coordinator,
        decision: RestoreDecision,
        payloads: list[Any],
        template: Any,
        strict: bool,
        allow_pickle: bool,
        start: float,
        chunks: bool,
        lap: _Laps,
    ) -> tuple[int, RestoreReport]:
        step = decision.step
        blob = payloads[decision.manifest_from][1][step]
        sub = self._sub(step)
        try:
            manifest = read_manifest_bytes(blob, sub)
            err: BaseException | None = None
            sends: list[tuple[int, Backend, list[tuple[str, int]]]] = []
            listing: dict[tuple[int, int], list[tuple[str, int]]] = {}
            try:
                if self.is_leader:
                    sub.makedirs(layout.data_dir(manifest.save_id))
                    if _files.manifest_checksum(sub) != decision.manifest:
                        sub.commit_file(layout.MANIFEST, blob, sync=False)
                for t in decision.transfers:
                    if t.src == self.rank:
                        got = _files.writer_files(sub, manifest, t.writer, chunks=False)
                        sends.append((t.dst, sub, got))
                        listing[(t.dst, t.writer)] = got
            except Exception as exc:
                err = exc
            lap("prepare")
            # The senders' listings (names and sizes) go to every rank first.
            listings = _all(coord, listing, "tiered:listing")
            lap("listing")
            if err is None:
                try:
                    recvs = []
                    for t in decision.transfers:
                        if t.dst == self.rank:
                            got = listings[t.src].get((t.dst, t.writer), [])
                            for name, _ in got:
                                _files.check_name(name, manifest.save_id, t.writer)
                            recvs.append((t.src, sub, got))
                    _files.exchange(
                        self._group(coord), self.timeout_s, sends, recvs, "tiered:fetch"
                    )
                    for t in decision.transfers:
                        if t.dst == self.rank:
                            # The received copy is whole (index checksum, file sizes); the
                            # load checks every chunk it reads, and a damaged one sends the
                            # restore to its second pass, which checks every chunk first.
                            _files.writer_files(sub, manifest, t.writer, chunks=chunks)
                except Exception as exc:  # a CollectiveError too: agree raises it at once
                    err = exc
            lap("fetch")
            coord.agree("tiered:fetch", err)
            lap("agree")
            api.load(
                template,
                sub.root,
                strict=strict,
                allow_pickle=allow_pickle,
                options=LoadOptions(timeout_s=self.timeout_s),
                process_group=self._group(coord),
            )
            lap("load")
            report = self._memory_report(sub, manifest, decision, payloads, start)
            lap("report")
        finally:
            sub.close()
        self._forget_others(coord, step)
        lap("cleanup")
        return step, dataclasses.replace(report, seconds=time.perf_counter() - start)

    def _memory_report(
        self,
        sub: Backend,
        manifest: Any,
        decision: RestoreDecision,
        payloads: list[Any],
        start: float,
    ) -> RestoreReport:
        srcs = dict(decision.sources.get(self._leader_of(self.rank), {}))
        # Each writer's bytes by FQN, as a node holding a valid copy of its
        # index counted them in the inventory (the same index: its checksum is
        # in the manifest); read again only when no node did.
        counted: dict[int, dict[str, int]] = {}
        for leader in self.leaders:
            for writer, fqns in payloads[leader][2].get(decision.step, {}).items():
                counted.setdefault(writer, fqns)
        by_source: dict[str, int] = {}
        per_fqn: dict[str, dict[str, int]] = {}
        for ref in manifest.indexes:
            fqns = counted.get(ref.rank)
            if fqns is None:
                fqns = _files.stored_bytes(read_index(sub, manifest, ref))
            where = "local" if srcs.get(ref.rank) is None else "peer"
            for fqn, n in fqns.items():
                by_source[where] = by_source.get(where, 0) + n
                d = per_fqn.setdefault(fqn, {})
                d[where] = d.get(where, 0) + n
        self._held = sum(by_source.values())
        return RestoreReport(
            step=decision.step,
            tier="memory",
            bytes_by_source=by_source,
            fqn_sources=per_fqn,
            writer_sources=srcs,
            seconds=time.perf_counter() - start,
        )

    def _forget_others(self, coord: Coordinator, keep: int | None) -> None:
        """After a restore, every node removes the memory steps other than ``keep``."""
        coord.agree("tiered:restored", None)
        if self.is_leader:
            self._remove_steps_except(keep)

    def _remove_steps_except(self, keep: int | None) -> None:
        """This node's memory steps other than ``keep`` are removed (best effort)."""
        node = self._node_backend()
        try:
            for old in _files.steps_in(node):
                if old != keep:
                    with contextlib.suppress(Exception):
                        node.remove_tree(step_dir(old))
        finally:
            node.close()

    def _restore_durable(
        self,
        coord: Coordinator,
        template: Any,
        strict: bool,
        allow_pickle: bool,
        start: float,
        skipped: list[str],
        lap: _Laps,
    ) -> tuple[int, RestoreReport]:
        if self.durable is None:
            raise CheckpointNotFoundError(
                "no memory step is held whole by the surviving nodes, and there is no durable "
                "storage" + (f" ({'; '.join(skipped)})" if skipped else "")
            )
        root = StepRoot(self.durable)
        try:
            steps = on_coordinator(coord, "tiered:durable-scan", lambda: root.scan().committed)
            lap("durable-scan")
            for step in sorted(steps, reverse=True):
                path = root.step_path(step)
                try:
                    api.load(
                        template,
                        path,
                        strict=strict,
                        allow_pickle=allow_pickle,
                        options=LoadOptions(timeout_s=self.timeout_s),
                        process_group=self._group(coord),
                    )
                except CollectiveError:
                    raise
                except CheckpointError as exc:
                    skipped.append(f"durable step {step}: {exc}")
                    lap("load")
                    continue
                lap("load")
                backend = open_backend(path)
                try:
                    manifest = read_manifest(backend)
                    per_fqn: dict[str, dict[str, int]] = {}
                    total = 0
                    for ix in read_indexes(backend, manifest):
                        for c in ix.chunks:
                            d = per_fqn.setdefault(c.fqn, {})
                            d["durable"] = d.get("durable", 0) + c.length
                            total += c.length
                finally:
                    backend.close()
                lap("report")
                self._forget_others(coord, None)
                lap("cleanup")
                self._held = 0
                return step, RestoreReport(
                    step=step,
                    tier="durable",
                    bytes_by_source={"durable": total},
                    fqn_sources=per_fqn,
                    seconds=time.perf_counter() - start,
                    skipped=tuple(skipped),
                )
        finally:
            root.close()
        raise CheckpointNotFoundError(
            f"no memory step is held whole by the surviving nodes, and no durable step under "
            f"{self.durable} loads" + (f" ({'; '.join(skipped)})" if skipped else "")
        )


def read_manifest_bytes(blob: bytes, sub: Backend) -> Any:
    from treeckpt.store.manifest import decode_manifest

    return decode_manifest(blob, f"{sub.root}/{layout.MANIFEST}")


def _all(coord: Coordinator, obj: Any, phase: str) -> list[Any]:
    """Every rank's ``obj`` on every rank (a gather, then a broadcast; each bounded)."""
    got = coord.gather(obj, f"{phase}:gather")
    out: list[Any] = coord.broadcast(got, f"{phase}:share")
    return out

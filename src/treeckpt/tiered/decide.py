"""The restore decision: which memory step, and where each node gets each writer's shards.

Pure: the inputs are the verified inventories the surviving node leaders
report (which steps they hold, and of each step the writer ranks whose
chunk index and every chunk passed their checksums); the output is the
newest step that the survivors hold whole, and the transfers that give
every node leader a whole copy. Ties are broken by rank, so every rank
computes the same decision from the same inventories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["RestoreDecision", "StepCopy", "Transfer", "decide_restore"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepCopy:
    """One node's copy of one memory step.

    ``manifest`` identifies the save (the checksum of its manifest), ``writers``
    are the writer ranks the manifest names, ``valid`` those whose files this
    node holds and verified, with their stored bytes in ``sizes``.
    """

    step: int
    manifest: str
    writers: frozenset[int]
    valid: frozenset[int]
    sizes: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """Rank ``src`` sends writer ``writer``'s files of the chosen step to rank ``dst``."""

    writer: int
    src: int
    dst: int
    nbytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreDecision:
    """The step to restore, the rank whose manifest every node uses, and the transfers."""

    step: int
    manifest: str
    manifest_from: int
    transfers: tuple[Transfer, ...]
    #: for each leader and each writer: ``None`` when held locally, else the sending rank
    sources: Mapping[int, Mapping[int, int | None]]


def decide_restore(
    inventories: Mapping[int, Sequence[StepCopy]],
    leaders: Sequence[int],
    members: Mapping[int, Sequence[int]] | None = None,
) -> RestoreDecision | None:
    """The newest step whole across ``inventories`` (leader rank -> its copies), or ``None``.

    A step is whole when every writer its manifest names has a verified copy
    on at least one surviving node. Each leader in ``leaders`` lacking a
    writer's copy gets it from the holding node with the fewest bytes to
    send so far (then the lowest rank). ``members`` (leader -> the ranks of
    its node) spreads the transfers over the ranks of the sending and the
    receiving nodes, in turn; without it the leaders send and receive.
    """
    keys: dict[tuple[int, str], dict[int, StepCopy]] = {}
    for rank in sorted(inventories):
        for copy in inventories[rank]:
            keys.setdefault((copy.step, copy.manifest), {})[rank] = copy
    # Newest step first; for one step saved twice, the copy most nodes hold.
    order = sorted(keys, key=lambda k: (-k[0], -len(keys[k]), k[1]))
    for key in order:
        holders = keys[key]
        writers = next(iter(holders.values())).writers
        held: dict[int, list[int]] = {w: [] for w in writers}
        for rank, copy in holders.items():
            if copy.writers != writers:
                continue  # a manifest with this checksum names the same writers
            for w in copy.valid & writers:
                held[w].append(rank)
        if any(not ranks for ranks in held.values()):
            continue
        load: dict[int, int] = {}
        transfers: list[Transfer] = []
        sources: dict[int, dict[int, int | None]] = {}
        for dst in sorted(leaders):
            mine = holders.get(dst)
            got: dict[int, int | None] = {}
            for w in sorted(writers):
                if mine is not None and w in mine.valid and mine.writers == writers:
                    got[w] = None
                    continue
                src = min(held[w], key=lambda r: (load.get(r, 0), r))
                nbytes = int(holders[src].sizes.get(w, 0))
                load[src] = load.get(src, 0) + max(nbytes, 1)
                transfers.append(Transfer(writer=w, src=src, dst=dst, nbytes=nbytes))
                got[w] = src
            sources[dst] = got
        spread = _spread(transfers, members or {})
        for old, new in zip(transfers, spread, strict=True):
            sources[old.dst][old.writer] = new.src
        return RestoreDecision(
            step=key[0],
            manifest=key[1],
            manifest_from=min(holders),
            transfers=spread,
            sources=sources,
        )
    return None


def _spread(
    transfers: list[Transfer], members: Mapping[int, Sequence[int]]
) -> tuple[Transfer, ...]:
    """Each node's sends and receives handed to its ranks in turn (leaders first)."""
    sent: dict[int, int] = {}
    got: dict[int, int] = {}
    out = []
    for t in transfers:
        srcs = members.get(t.src) or (t.src,)
        dsts = members.get(t.dst) or (t.dst,)
        i, j = sent.get(t.src, 0), got.get(t.dst, 0)
        sent[t.src], got[t.dst] = i + 1, j + 1
        out.append(
            Transfer(
                writer=t.writer, src=srcs[i % len(srcs)], dst=dsts[j % len(dsts)], nbytes=t.nbytes
            )
        )
    return tuple(out)

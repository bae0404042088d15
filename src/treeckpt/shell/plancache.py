"""Save plans kept from one save to the next.

The second and later saves of a training run describe exactly the same
shards, so they get exactly the same plan. Each rank keeps the plans of its
last few saves, keyed on everything the plan is a function of: the world
size, the rank, ``chunk_bytes`` and this rank's shard specs (FQN, dtype,
global shape and local boxes of every tensor, in order), compared for exact
equality, never by a hash alone. Any change on any rank (a new or renamed
tensor, another shape, dtype or sharding, another chunk size) misses.

A plan is a function of every rank's description, and a rank only knows its
own. So a rank whose description is unchanged sends the coordinator the
token of the plan it holds instead of its description; the coordinator
reuses the plan only when every rank sends the same token and it holds that
plan too. Otherwise it plans again, filling in unchanged ranks'
descriptions from its own copy, or, when it lacks them (its entry was
evicted, or a rank's cache diverged after a failure), asks every rank to
send its description (``shell/negotiate.py``).
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from treeckpt.core.plan_table import SavePlan, WriteItem
from treeckpt.core.shard_table import LocalTable
from treeckpt.core.specs import ShardSpec

__all__ = ["SHARED_PLAN_CACHE", "CachedPlan", "PlanCache", "PlanKey", "new_token"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanKey:
    """Everything one rank's part of a save plan depends on, from that rank's side."""

    world_size: int
    rank: int
    chunk_bytes: int
    specs: tuple[ShardSpec, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedPlan:
    """A plan every rank agreed on: ``token`` names it across ranks.

    ``items`` are this rank's write items; ``plan`` (the whole plan) and
    ``tables`` (every rank's description, in rank order) are kept on the
    coordinator only.
    """

    token: str
    items: tuple[WriteItem, ...]
    plan: SavePlan | None = None
    tables: tuple[LocalTable, ...] | None = None


def new_token() -> str:
    return secrets.token_hex(8)


class PlanCache:
    """The plans of the last ``max_entries`` distinct save layouts (least recently used goes)."""

    def __init__(self, max_entries: int = 4) -> None:
        self._max = max_entries
        self._by_key: OrderedDict[PlanKey, CachedPlan] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, key: PlanKey) -> CachedPlan | None:
        """The plan this rank holds for exactly this key, if any."""
        with self._lock:
            entry = self._by_key.get(key)
            if entry is not None:
                self._by_key.move_to_end(key)
            return entry

    def by_token(self, token: str) -> CachedPlan | None:
        """The coordinator's copy of the plan named ``token``, if it still holds it."""
        with self._lock:
            for entry in self._by_key.values():
                if entry.token == token:
                    return entry
            return None

    def store(self, key: PlanKey, entry: CachedPlan) -> None:
        with self._lock:
            self._by_key[key] = entry
            self._by_key.move_to_end(key)
            while len(self._by_key) > self._max:
                self._by_key.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)


#: Plans kept across saves when the caller gives no cache of its own.
SHARED_PLAN_CACHE = PlanCache()

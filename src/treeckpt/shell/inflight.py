"""Saves still running in the background, so that collectives never interleave.

An asynchronous save runs its collectives from a background thread. A
synchronous save or load over the same ranks must wait for it first, or the
two would exchange messages out of order.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from typing import Any

__all__ = ["track", "wait_all"]

_lock = threading.Lock()
_pending: set[Future[Any]] = set()


def track(future: Future[Any]) -> None:
    """Remember ``future`` until it is done."""
    with _lock:
        _pending.add(future)

    def forget(f: Future[Any]) -> None:
        with _lock:
            _pending.discard(f)

    future.add_done_callback(forget)


def wait_all() -> None:
    """Block until every tracked save has finished (its errors stay on its future)."""
    if threading.current_thread().name.startswith("treeckpt-async-save"):
        return  # a background save never waits for itself
    with _lock:
        pending = list(_pending)
    if pending:
        wait(pending)

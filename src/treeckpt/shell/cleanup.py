"""Clean-up around a save: its own claim, the replaced checkpoint, abandoned saves.

A save claims its data directory for as long as it runs (``Backend.hold_dir``:
an ``flock`` on local disks, which the kernel drops when the process dies,
even by ``SIGKILL``). After its manifest is committed, rank 0 removes:

- the data directory of the checkpoint it replaced (that save committed
  before this one began, so it can never become live again);
- the data directories of abandoned saves: saves that crashed or lost a race
  and never committed. A directory is abandoned when nobody holds its claim
  (local disks) or, on stores without locks (object stores), when nothing
  below it was written (and no unfinished upload begun) for
  :data:`ABANDONED_AFTER_S` seconds; its unfinished multipart uploads are
  aborted with it;
- ``manifest.json.tmp-*`` files of killed local commits whose process is gone
  (or that are older than :data:`ABANDONED_AFTER_S`).

Never removed: the directory of the manifest committed at the moment of
removal, which is read *after* the directory was found abandoned. A directory
can only become live through its own save's commit, and that save holds its
claim (or keeps its objects young) until after the commit, so a directory
found abandoned first and then not named by the live manifest can never be
referenced by a committed manifest. A save that finds its own claim taken
(a clean-up is removing its directory) fails before writing anything.
"""

from __future__ import annotations

import contextlib
import os
import time

from treeckpt.errors import CheckpointError
from treeckpt.store import layout
from treeckpt.store.backends import Backend, DirHold
from treeckpt.store.reader import read_manifest

__all__ = ["ABANDONED_AFTER_S", "claim", "release", "remove_stale"]

#: On stores without locks, a data directory with nothing written below it for
#: this long (seconds) belongs to a save that died. It must exceed the longest
#: gap between two object writes of one save (writing one data object).
ABANDONED_AFTER_S = 3600.0

#: Prefixes of the temporary names ``Backend.commit_file`` writes before its rename.
_TMPS = (f"{layout.MANIFEST}.tmp-", f"{layout.DCP_MARKER}.tmp-")


def claim(backend: Backend, save_id: str, *, tries: int = 50) -> DirHold | None:
    """Create and hold the new save's data directory.

    Another save's clean-up may take a directory that exists but is not held
    yet for abandoned, and remove it, between its creation and the claim: the
    claim then finds it gone (or held for a moment) and makes it again. Raises
    ``OSError`` when that keeps happening ``tries`` times.
    """
    name = layout.data_dir(save_id)
    for attempt in range(tries):
        backend.makedirs(name)
        try:
            hold = backend.hold_dir(name)
        except (FileNotFoundError, BlockingIOError):
            time.sleep(0.001 * (attempt + 1))
            continue
        if hold is None or hold.is_current():
            return hold
        release(hold)
    raise OSError(f"{backend.root}/{name}: clean-up by another save kept removing it")


def release(hold: DirHold | None) -> None:
    if hold is not None:
        with contextlib.suppress(Exception):
            hold.release()


def remove_stale(backend: Backend, *, own: str, previous: str | None) -> list[str]:
    """After ``own`` committed: remove the replaced and the abandoned saves' files.

    Best effort (a failure leaves files behind, never damage). Returns the
    names removed.
    """
    removed: list[str] = []
    if previous is not None and previous != own:
        with contextlib.suppress(Exception):
            backend.remove_tree(layout.data_dir(previous))
            removed.append(layout.data_dir(previous))
    try:
        names = sorted(set(backend.listdir()) | set(backend.unfinished()))
    except OSError:
        return removed
    for name in names:
        save_id = name[len("data-") :] if name.startswith("data-") else None
        if save_id is not None and layout.is_save_id(save_id) and save_id not in (own, previous):
            with contextlib.suppress(Exception):
                if _remove_if_abandoned(backend, name, save_id):
                    removed.append(name)
        elif name.startswith(_TMPS) and backend.supports_fsync:
            with contextlib.suppress(Exception):
                if _tmp_abandoned(backend, name):
                    backend.remove_tree(name)
                    removed.append(name)
    return removed


def _remove_if_abandoned(backend: Backend, name: str, save_id: str) -> bool:
    try:
        hold = backend.hold_dir(name)
    except OSError:
        return False  # a live save holds it (or it just went away)
    try:
        if hold is None:
            age = backend.age_s(name)
            if age is None or age < ABANDONED_AFTER_S:
                return False
        # Only now read what is live: see the module docs for why this order.
        try:
            live = read_manifest(backend).save_id
        except CheckpointError:
            return False  # cannot tell what is referenced: remove nothing
        if live == save_id:
            return False
        backend.remove_tree(name)
        return True
    finally:
        release(hold)


def _tmp_abandoned(backend: Backend, name: str) -> bool:
    """A ``manifest.json.tmp-<pid>-<thread>`` (or ``.metadata.tmp-...``) whose writer is gone."""
    age = backend.age_s(name)
    if age is not None and age >= ABANDONED_AFTER_S:
        return True
    prefix = next(p for p in _TMPS if name.startswith(p))
    pid_text = name[len(prefix) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False

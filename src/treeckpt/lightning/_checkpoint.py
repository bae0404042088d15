"""Lightning's checkpoint dict to and from a treeckpt checkpoint.

A Lightning checkpoint is one dict: ``state_dict`` (the module's FQNs),
``optimizer_states`` (a list, one state dict per optimizer), and metadata
(``epoch``, ``global_step``, ``loops``, ``callbacks``, ``lr_schedulers``,
``hyper_parameters``, precision state...). It is saved as one treeckpt tree
with exactly that layout, so ``treeckpt consolidate`` turns it back into the
dict Lightning's ``torch.load`` path expects.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch

import treeckpt
from treeckpt.core.options import SaveOptions
from treeckpt.core.tree import flatten_tree
from treeckpt.errors import CheckpointError, LoadMismatchError, UnsupportedLeafError
from treeckpt.shell.optim import safe_torch_state_init
from treeckpt.store.backends import open_backend
from treeckpt.store.layout import MANIFEST

__all__ = ["is_treeckpt_checkpoint", "load_checkpoint", "save_checkpoint", "to_plain"]

_MODEL = "state_dict"
_OPTIMIZERS = "optimizer_states"


def to_plain(obj: Any, *, allow_pickle: bool = False, fqn: str = "") -> Any:
    """Lightning metadata as containers treeckpt stores without pickle.

    Lightning puts dict subclasses (``AttributeDict`` for hyperparameters),
    ``torch.Size`` and enums into its metadata. Those become plain dicts,
    tuples and their values; anything else that is not a tensor, a plain value
    or a container of them is refused with its FQN (or left for pickle when
    ``allow_pickle`` is set).
    """
    import dataclasses
    import enum

    import numpy as np

    if isinstance(obj, torch.Tensor | np.ndarray | np.generic) or obj is None:
        return obj
    if type(obj) in (bool, int, float, str, bytes) or treeckpt.is_stateful(obj):
        return obj  # a Stateful is stored as its state dict, as anywhere in treeckpt
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return obj  # stored field by field
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value, allow_pickle=allow_pickle, fqn=fqn)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict(
            (k, to_plain(v, allow_pickle=allow_pickle, fqn=f"{fqn}.{k}")) for k, v in obj.items()
        )
    if isinstance(obj, dict):
        return {k: to_plain(v, allow_pickle=allow_pickle, fqn=f"{fqn}.{k}") for k, v in obj.items()}
    if isinstance(obj, torch.Size):
        return tuple(int(d) for d in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return obj  # namedtuples are stored as such
    if isinstance(obj, (list, tuple)):
        items = [
            to_plain(v, allow_pickle=allow_pickle, fqn=f"{fqn}.{i}") for i, v in enumerate(obj)
        ]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if allow_pickle:
        return obj
    raise UnsupportedLeafError(
        f"{fqn.lstrip('.')!r}: Lightning metadata holds a {type(obj).__module__}."
        f"{type(obj).__qualname__}, which cannot be stored without pickle; make it a plain value "
        "or pass allow_pickle=True to the strategy"
    )


def save_checkpoint(
    checkpoint: dict[str, Any],
    path: str,
    *,
    options: SaveOptions | None = None,
    allow_pickle: bool = False,
) -> treeckpt.SaveResult:
    """Save Lightning's checkpoint dict (sharded state included) as one treeckpt checkpoint.

    Every rank calls it with its own shards; the layout stays Lightning's.
    """
    tree: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if key in (_MODEL, _OPTIMIZERS):
            tree[key] = value
        else:
            tree[key] = to_plain(value, allow_pickle=allow_pickle, fqn=str(key))
    return treeckpt.save(tree, path, options=options, allow_pickle=allow_pickle)


def is_treeckpt_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a committed treeckpt checkpoint (has its manifest)."""
    backend = open_backend(str(path))
    try:
        return backend.size(MANIFEST) is not None
    finally:
        backend.close()


class _Open:
    """A metadata entry: the checkpoint's structure wins, whatever it holds."""

    def __init__(self) -> None:
        self.loaded: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        self.loaded = state


def load_checkpoint(
    path: str,
    module: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    strict: bool = True,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``module`` and ``optimizers``.

    Each rank reads only the chunks that cover its own shards, whatever the
    number of processes that saved it. Returns the checkpoint dict with the
    loaded state and every metadata key, as Lightning's loaders do. With no
    ``optimizers`` (validate, test, predict) the stored optimizer state is not
    read at all.

    Raises:
        LoadMismatchError: with ``strict``, the module's or the optimizers' keys
            and the checkpoint's differ (all listed before anything changes);
            shapes or dtypes differ (always).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    info = treeckpt.metadata(path)
    structure = info.structure
    top = [k for k in structure.get("keys", []) if isinstance(k, str)]
    if structure.get("type") not in ("dict", "odict") or _MODEL not in top:
        raise CheckpointError(
            f"{info.path}: not a Lightning checkpoint (no {_MODEL!r} at the top level)"
        )
    model_sd = get_model_state_dict(module)
    load_optims = bool(optimizers) and _OPTIMIZERS in top
    with safe_torch_state_init():  # torch's own init step could move weights (shell/optim.py)
        optim_sds = (
            [get_optimizer_state_dict(module, opt) for opt in optimizers] if load_optims else []
        )
    state: dict[str, Any] = {_MODEL: model_sd}
    if load_optims:
        state[_OPTIMIZERS] = optim_sds
    # Strictness over what is loaded into the module and optimizers, checked
    # here from the manifest; the load itself skips the checkpoint's other keys.
    wanted = set(flatten_tree(state).records)
    stored = set(info.tensors) | set(info.values)
    scopes = [f"{k}." for k in state]
    missing = sorted(wanted - stored)
    unexpected = sorted(f for f in stored - wanted if any(f.startswith(p) for p in scopes))
    if strict and (missing or unexpected):
        raise LoadMismatchError(missing=missing, unexpected=unexpected)
    meta = {k: _Open() for k in top if k not in (_MODEL, _OPTIMIZERS)}
    # Tensors are filled in place; values (learning rates, betas...) come back in `got`.
    got = treeckpt.load({**state, **meta}, path, strict=False, allow_pickle=allow_pickle)

    options = StateDictOptions(strict=strict)
    set_model_state_dict(module, got[_MODEL], options=options)
    with safe_torch_state_init():
        for opt, osd in zip(optimizers, got.get(_OPTIMIZERS, []), strict=False):
            set_optimizer_state_dict(module, opt, osd, options=options)
    loaded: dict[str, Any] = {}
    for k in top:  # the checkpoint's own key order
        if k in meta:
            loaded[k] = meta[k].loaded
        elif k in got:
            loaded[k] = got[k]
    return loaded

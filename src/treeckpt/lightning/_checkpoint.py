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
from treeckpt.errors import LoadMismatchError, UnsupportedLeafError
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
    import enum

    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str, bytes):
        return obj
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


class _Whole:
    """The whole checkpoint as one Stateful: the saved structure wins, and the
    tensors of the template (the model's and optimizers' shards) are filled in place."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.loaded: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
    loaded state and every metadata key, as Lightning's loaders do.

    Raises:
        LoadMismatchError: with ``strict``, the module's keys and the
            checkpoint's differ (all listed before anything changes); shapes or
            dtypes differ (always).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_sd = get_model_state_dict(module)
    optim_sds = [get_optimizer_state_dict(module, opt) for opt in optimizers]
    info = treeckpt.metadata(path)
    stored = set(info.tensors) | set(info.values)
    prefix = f"{_MODEL}."
    unexpected = sorted(
        f for f in stored if f.startswith(prefix) and f[len(prefix) :] not in model_sd
    )
    if strict and unexpected:
        raise LoadMismatchError(unexpected=unexpected)
    template: dict[str, Any] = {_MODEL: model_sd}
    if optim_sds:
        template[_OPTIMIZERS] = optim_sds
    whole = _Whole(template)
    treeckpt.load(whole, path, strict=strict, allow_pickle=allow_pickle)
    loaded = whole.loaded
    options = StateDictOptions(strict=strict)
    # Keys the module lacks (strict=False) were read but are not handed to it.
    given = {k: v for k, v in loaded.get(_MODEL, {}).items() if k in model_sd}
    set_model_state_dict(module, {**model_sd, **given}, options=options)
    saved_optims = loaded.get(_OPTIMIZERS, [])
    if len(saved_optims) < len(optimizers) and strict:
        raise LoadMismatchError(
            missing=[f"{_OPTIMIZERS}.{i}" for i in range(len(saved_optims), len(optimizers))]
        )
    for opt, osd in zip(optimizers, saved_optims, strict=False):
        set_optimizer_state_dict(module, opt, osd, options=options)
    return loaded

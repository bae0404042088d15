"""``treeckpt.dcp.state_dict``: the same functions as ``torch.distributed.checkpoint.state_dict``.

``get_model_state_dict``, ``get_optimizer_state_dict`` and ``get_state_dict``
return state dicts keyed by FQN (the optimizer state too, so it survives a
change of world size or of parallelism), sharded as the model is (DTensors
for FSDP2) unless ``StateDictOptions(full_state_dict=True)``. The ``set_*``
functions take the same dicts back. These are torch's own implementations
(with its type aliases, ``FQNS_T`` and the ``*Type`` names): they are
correct for plain modules, DDP and FSDP2. One thing differs: where torch
creates a fresh optimizer's state with a zero-learning-rate ``step()``
(which moves the weights of optimizers that ignore ``lr``, such as
Adafactor's relative step or MADGRAD, and drops the caller's gradients),
the four functions that touch optimizers here put every parameter,
gradient and param-group entry back bit for bit afterwards
(``treeckpt.shell.optim``). What they return is exactly the tree :func:`treeckpt.save` and
:func:`treeckpt.load` take::

    model_sd, optim_sd = get_state_dict(model, optim)
    treeckpt.save({"model": model_sd, "optim": optim_sd}, path)
    ...  # another world size, a new model and optimizer
    model_sd, optim_sd = get_state_dict(model, optim)  # the template, state initialised
    loaded = treeckpt.load({"model": model_sd, "optim": optim_sd}, path)
    set_state_dict(model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import state_dict as _torch
from torch.distributed.checkpoint.state_dict import (
    FQNS_T,
    DictValueType,
    ListDictValueType,
    OptimizerStateType,
    PrimitiveType,
    StateDictOptions,
    ValueType,
    get_model_state_dict,
    set_model_state_dict,
)

from treeckpt.shell.optim import safe_torch_state_init


def get_optimizer_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> OptimizerStateType:
    """torch's ``get_optimizer_state_dict``; a fresh optimizer's state is created
    without changing a parameter or a gradient."""
    with safe_torch_state_init():
        return _torch.get_optimizer_state_dict(
            model, optimizers, submodules=submodules, options=options
        )


def get_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> tuple[dict[str, ValueType], OptimizerStateType]:
    """torch's ``get_state_dict``; a fresh optimizer's state is created without
    changing a parameter or a gradient."""
    with safe_torch_state_init():
        return _torch.get_state_dict(model, optimizers, submodules=submodules, options=options)


def set_optimizer_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    optim_state_dict: OptimizerStateType,
    *,
    options: StateDictOptions | None = None,
) -> None:
    """torch's ``set_optimizer_state_dict``; nothing but the optimizer's state changes."""
    with safe_torch_state_init():
        _torch.set_optimizer_state_dict(model, optimizers, optim_state_dict, options=options)


def set_state_dict(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    *,
    model_state_dict: dict[str, ValueType],
    optim_state_dict: OptimizerStateType,
    options: StateDictOptions | None = None,
) -> Any:
    """torch's ``set_state_dict``; loading the optimizer part changes no parameter
    (beyond the model state given) and no gradient."""
    with safe_torch_state_init():
        return _torch.set_state_dict(
            model,
            optimizers,
            model_state_dict=model_state_dict,
            optim_state_dict=optim_state_dict,
            options=options,
        )


__all__ = [
    "FQNS_T",
    "DictValueType",
    "ListDictValueType",
    "OptimizerStateType",
    "PrimitiveType",
    "StateDictOptions",
    "ValueType",
    "get_model_state_dict",
    "get_optimizer_state_dict",
    "get_state_dict",
    "set_model_state_dict",
    "set_optimizer_state_dict",
    "set_state_dict",
]

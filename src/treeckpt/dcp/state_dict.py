"""``treeckpt.dcp.state_dict``: the same functions as ``torch.distributed.checkpoint.state_dict``.

``get_model_state_dict``, ``get_optimizer_state_dict`` and ``get_state_dict``
return state dicts keyed by FQN (the optimizer state too, so it survives a
change of world size or of parallelism), sharded as the model is (DTensors
for FSDP2) unless ``StateDictOptions(full_state_dict=True)``. The ``set_*``
functions take the same dicts back. These are torch's own implementations,
re-exported unchanged (with its type aliases, ``FQNS_T`` and the
``*Type`` names): they are correct for plain modules, DDP and FSDP2,
and what they return is exactly the tree :func:`treeckpt.save` and
:func:`treeckpt.load` take::

    model_sd, optim_sd = get_state_dict(model, optim)
    treeckpt.save({"model": model_sd, "optim": optim_sd}, path)
    ...  # another world size, a new model and optimizer
    model_sd, optim_sd = get_state_dict(model, optim)  # the template, state initialised
    loaded = treeckpt.load({"model": model_sd, "optim": optim_sd}, path)
    set_state_dict(model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
"""

from __future__ import annotations

from torch.distributed.checkpoint.state_dict import (
    FQNS_T,
    DictValueType,
    ListDictValueType,
    OptimizerStateType,
    PrimitiveType,
    StateDictOptions,
    ValueType,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
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

"""Optimizer state before a load, created without moving a parameter.

A fresh ``torch.optim.Optimizer`` has no state: its state dict offers no
tensors to load into. Two ways to give it state:

- :func:`state_targets` (what :func:`treeckpt.load` does): no step at all.
  The checkpoint records every state tensor with its global shape; a state
  tensor shaped like its parameter is allocated like the parameter
  (``empty_like``: the same device, and for a DTensor the same mesh and
  placements), so each rank reads only its own shard; any other state
  (step counters, factored second moments, LBFGS history) is a plain
  tensor, which the optimizer's own ``load_state_dict`` places as its
  policy says.
- :func:`init_state_by_step` (for torch's state-dict utilities, which need
  state before any checkpoint is known): one ``step()`` with zero gradients
  and a learning rate of 0, as torch does, but then every parameter, every
  gradient and every param-group entry is put back bit for bit. A zero
  learning rate is not enough on its own: optimizers that ignore the
  group's ``lr`` (Adafactor's relative step, MADGRAD's dual averaging) move
  weights even then, and torch's version also drops the caller's gradients.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from treeckpt.core.dtypes import torch_dtype
from treeckpt.core.leaves import LeafRecord, TensorLeaf
from treeckpt.core.optim_state import param_shaped_state
from treeckpt.core.tree import Path

__all__ = ["init_state_by_step", "safe_torch_state_init", "state_targets"]


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order of the optimizer's state-dict ids (0, 1, ...)."""
    return [p for group in opt.param_groups for p in group["params"]]


def state_targets(
    opt: torch.optim.Optimizer,
    path: Path,
    structure: dict[str, Any],
    records: Mapping[str, LeafRecord],
    wanted: set[str],
) -> dict[str, torch.Tensor]:
    """Tensors to load ``opt``'s checkpointed state into, laid out like its parameters.

    ``path`` is where ``opt`` stands in the tree and ``structure`` the
    checkpoint's structure record; only FQNs in ``wanted`` (state the
    template lacks) are allocated. Which state tensors have their
    parameter's shape is decided by ``core/optim_state.py``; each gets
    ``empty_like(param)`` with the stored dtype. Everything else is left to
    the caller to allocate as a plain tensor.
    """
    params = _params(opt)
    shapes = [None if p.is_meta else tuple(int(s) for s in p.shape) for p in params]
    out: dict[str, torch.Tensor] = {}
    for fqn, pid in param_shaped_state(structure, path, records, shapes, wanted).items():
        rec = records[fqn]
        assert isinstance(rec, TensorLeaf)
        out[fqn] = torch.empty_like(params[pid], dtype=torch_dtype(rec.dtype), requires_grad=False)
    return out


def init_state_by_step(optim: torch.optim.Optimizer) -> None:
    """Create ``opt``'s state with one zero-gradient step, then undo everything else it did.

    Does nothing when the optimizer has state already. Parameters are
    copied before the step and written back after it (bit for bit, also
    for DTensors: their local shards), the caller's gradients (``None`` or
    tensors) are put back as the very same objects, and each param group's
    entries (``lr`` and anything ``step()`` writes there) are restored. An
    optimizer whose ``step`` needs a closure (LBFGS) is left without state.
    """
    opt = optim  # torch's helper, which this stands in for, names its argument so
    if opt.state:
        return
    params = _params(opt)
    groups = [{k: _snapshot(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    grads = [p.grad for p in params]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        for g in opt.param_groups:
            if "lr" in g:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        with contextlib.suppress(TypeError):  # step() needs a closure
            opt.step()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        for g, snap in zip(opt.param_groups, groups, strict=True):
            for k in [k for k in g if k != "params" and k not in snap]:
                del g[k]
            g.update(snap)


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    try:
        return copy.deepcopy(value)
    except Exception:
        return value


_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def safe_torch_state_init() -> Iterator[None]:
    """Within the block, torch's state-dict utilities initialise optimizers with
    :func:`init_state_by_step` instead of their own step (which moves the
    weights of optimizers that ignore ``lr`` and drops gradients).

    torch's ``get_optimizer_state_dict``/``set_optimizer_state_dict`` (and
    ``OptimizersContainer``-style wrappers whose ``state_dict`` calls them)
    look the helper up in their module at call time, so replacing it for the
    duration of the call is enough. Reentrant; serialised across threads.
    """
    try:
        from torch.distributed.checkpoint import state_dict as tsd
    except ImportError:  # torch built without distributed
        yield
        return
    if not hasattr(tsd, "_init_optim_state"):
        yield
        return
    with _PATCH_LOCK:
        original = tsd._init_optim_state
        tsd._init_optim_state = init_state_by_step
        try:
            yield
        finally:
            tsd._init_optim_state = original

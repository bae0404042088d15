"""Optimizers that move weights whatever the group's ``lr`` says, for load tests.

They do what real optimizers do, written small so the tests do not depend on
those packages being importable:

- :class:`RelativeStepDecay` computes its own step size from its step count
  and applies decoupled weight decay with it, as transformers' ``Adafactor``
  does with ``relative_step=True`` (the default); a zero gradient still
  shrinks every weight.
- :class:`DualAveraging` keeps the initial point and a gradient sum and sets
  ``p = p * (1 - ck) + z * ck``, as MADGRAD does; with a zero gradient
  ``z == p``, yet the rounding of that expression changes weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class RelativeStepDecay(torch.optim.Optimizer):
    def __init__(self, params: Any, weight_decay: float = 0.1) -> None:
        super().__init__(params, {"weight_decay": weight_decay, "lr": None})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                rel = min(1e-2, 1.0 / math.sqrt(state["step"]))  # ignores group["lr"]
                state["exp_avg_sq"].mul_(0.9).addcmul_(p.grad, p.grad, value=0.1)
                update = p.grad / (state["exp_avg_sq"].sqrt() + 1e-8)
                p.mul_(1 - group["weight_decay"] * rel)
                p.add_(update, alpha=-rel)


class DualAveraging(torch.optim.Optimizer):
    def __init__(self, params: Any, lr: float = 1e-2, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            ck = 1 - group["momentum"]
            lamb = group["lr"] + 1e-6  # never exactly 0, like MADGRAD's eps
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["k"] = 0
                    state["x0"] = p.clone()
                    state["grad_sum_sq"] = torch.zeros_like(p)
                    state["s"] = torch.zeros_like(p)
                state["k"] += 1
                state["grad_sum_sq"].addcmul_(p.grad, p.grad, value=lamb)
                rms = state["grad_sum_sq"].pow(1 / 3).add_(1e-6)
                state["s"].add_(p.grad, alpha=lamb)
                z = state["x0"].addcdiv(state["s"], rms, value=-1)
                p.mul_(1 - ck).add_(z, alpha=ck)

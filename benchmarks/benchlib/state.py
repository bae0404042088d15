"""Synthetic GPT-2-small-shaped model weights plus AdamW state, seeded and realistic-looking.

The tree is ``{"model": <state_dict>, "optim": <AdamW state_dict>}`` with the
same names, shapes and layout as Hugging Face's ``GPT2Model`` and
``torch.optim.AdamW(...).state_dict()``:

* weights ~ N(0, 0.02); the two residual projections per block use GPT-2's
  scaled init N(0, 0.02 / sqrt(2 * n_layer));
* LayerNorm weights 1 + N(0, 0.02), LayerNorm and linear biases ~ N(0, 0.005);
* AdamW moments are the result of ``ADAM_STEPS`` real EMA updates with
  synthetic gradients ~ N(0, s), where ``s`` is drawn per tensor
  log-uniformly in [0.0025, 0.04]: ``exp_avg`` ends up ~1e-3 and
  ``exp_avg_sq`` ~1e-7..1e-5, always positive;
* ``step`` is a 0-d float32 tensor per parameter, as torch's AdamW stores it.

The bf16 variant draws exactly the same fp32 values and casts every floating
tensor except ``step`` to bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .tree import Tree

ADAM_STEPS = 4
BETAS = (0.9, 0.999)
LEARNING_RATE = 6e-4
WEIGHT_DECAY = 0.1


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters that fix the tensor shapes of a GPT-2-style model."""

    vocab: int = 50257
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_positions: int = 1024


GPT2_SMALL = ModelShape()
"""GPT-2 small: 124.4 M parameters, 1.49 GB of fp32 weights + AdamW state."""

GPT2_QUICK = ModelShape(vocab=50257 // 6, n_layer=2)
"""About 6x fewer parameters than GPT-2 small, same per-layer shapes (for smoke tests)."""

GPT2_TINY = ModelShape(vocab=256, n_embd=64, n_layer=1, n_head=2, n_positions=32)
"""A few hundred KB, same tree layout: used to warm every contender up before timing."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its state-dict name, shape and how its values are initialised."""

    name: str
    shape: tuple[int, ...]
    init: str  # "weight" | "residual" | "ln_weight" | "bias"


def gpt2_param_specs(shape: ModelShape) -> list[ParamSpec]:
    """GPT-2 parameter names and shapes in ``GPT2Model.state_dict()`` order (no buffers, tied head omitted)."""
    d = shape.n_embd
    specs = [
        ParamSpec("wte.weight", (shape.vocab, d), "weight"),
        ParamSpec("wpe.weight", (shape.n_positions, d), "weight"),
    ]
    for layer in range(shape.n_layer):
        specs.extend(_block_specs(f"h.{layer}.", d))
    specs.append(ParamSpec("ln_f.weight", (d,), "ln_weight"))
    specs.append(ParamSpec("ln_f.bias", (d,), "bias"))
    return specs


def _block_specs(prefix: str, d: int) -> list[ParamSpec]:
    return [
        ParamSpec(prefix + "ln_1.weight", (d,), "ln_weight"),
        ParamSpec(prefix + "ln_1.bias", (d,), "bias"),
        ParamSpec(prefix + "attn.c_attn.weight", (d, 3 * d), "weight"),
        ParamSpec(prefix + "attn.c_attn.bias", (3 * d,), "bias"),
        ParamSpec(prefix + "attn.c_proj.weight", (d, d), "residual"),
        ParamSpec(prefix + "attn.c_proj.bias", (d,), "bias"),
        ParamSpec(prefix + "ln_2.weight", (d,), "ln_weight"),
        ParamSpec(prefix + "ln_2.bias", (d,), "bias"),
        ParamSpec(prefix + "mlp.c_fc.weight", (d, 4 * d), "weight"),
        ParamSpec(prefix + "mlp.c_fc.bias", (4 * d,), "bias"),
        ParamSpec(prefix + "mlp.c_proj.weight", (4 * d, d), "residual"),
        ParamSpec(prefix + "mlp.c_proj.bias", (d,), "bias"),
    ]


def _init_param(spec: ParamSpec, n_layer: int, gen: torch.Generator) -> torch.Tensor:
    values = torch.empty(spec.shape, dtype=torch.float32)
    if spec.init == "weight":
        return values.normal_(0.0, 0.02, generator=gen)
    if spec.init == "residual":
        return values.normal_(0.0, 0.02 / math.sqrt(2 * n_layer), generator=gen)
    if spec.init == "ln_weight":
        return values.normal_(1.0, 0.02, generator=gen)
    if spec.init == "bias":
        return values.normal_(0.0, 0.005, generator=gen)
    raise ValueError(f"unknown init {spec.init!r}")


def _adam_moments(
    shape: tuple[int, ...], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``ADAM_STEPS`` EMA updates with synthetic gradients; return (exp_avg, exp_avg_sq)."""
    grad_scale = 0.01 * 2.0 ** (torch.rand((), generator=gen).item() * 4.0 - 2.0)
    exp_avg = torch.zeros(shape, dtype=torch.float32)
    exp_avg_sq = torch.zeros(shape, dtype=torch.float32)
    grad = torch.empty(shape, dtype=torch.float32)
    beta1, beta2 = BETAS
    for _ in range(ADAM_STEPS):
        grad.normal_(0.0, grad_scale, generator=gen)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return exp_avg, exp_avg_sq


def adamw_param_groups(n_params: int) -> list[dict[str, Any]]:
    """``param_groups`` exactly as this torch version's AdamW writes them, for ``n_params`` parameters."""
    dummy = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([dummy], lr=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY)
    group = dict(optimizer.state_dict()["param_groups"][0])
    group["params"] = list(range(n_params))
    return [group]


def build_state(shape: ModelShape, dtype: torch.dtype, seed: int) -> Tree:
    """Build ``{"model": ..., "optim": ...}``; floating tensors in ``dtype``, ``step`` always float32."""
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for index, spec in enumerate(gpt2_param_specs(shape)):
        model[spec.name] = _init_param(spec, shape.n_layer, gen).to(dtype)
        exp_avg, exp_avg_sq = _adam_moments(spec.shape, gen)
        optim_state[index] = {
            "step": torch.tensor(float(ADAM_STEPS), dtype=torch.float32),
            "exp_avg": exp_avg.to(dtype),
            "exp_avg_sq": exp_avg_sq.to(dtype),
        }
    optim = {"state": optim_state, "param_groups": adamw_param_groups(len(model))}
    return {"model": model, "optim": optim}


STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

"""Which checkpointed optimizer state is laid out like its parameter (pure)."""

from __future__ import annotations

from typing import Any

import torch

from treeckpt.core.optim_state import param_shaped_state
from treeckpt.core.tree import flatten_tree


def _checkpointed() -> tuple[dict[str, Any], dict[str, Any]]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    flat = flatten_tree({"optim": opt, "by_name": {"state": {"w": {"exp_avg": torch.ones(2)}}}})
    return flat.structure, flat.records


def test_moments_follow_their_parameter_and_step_does_not() -> None:
    structure, records = _checkpointed()
    wanted = set(records)
    got = param_shaped_state(structure, ("optim",), records, [(2, 3), (2,)], wanted)
    assert got == {
        "optim.state.0.exp_avg": 0,
        "optim.state.0.exp_avg_sq": 0,
        "optim.state.1.exp_avg": 1,
        "optim.state.1.exp_avg_sq": 1,
    }


def test_only_wanted_fqns_of_matching_shape_with_a_parameter() -> None:
    structure, records = _checkpointed()
    wanted = {"optim.state.0.exp_avg", "optim.state.1.exp_avg"}
    # parameter 0 on the meta device (None), parameter 1 of another shape
    assert param_shaped_state(structure, ("optim",), records, [None, (3,)], wanted) == {}
    assert param_shaped_state(structure, ("optim",), records, [(2, 3)], set(records)) == {
        "optim.state.0.exp_avg": 0,
        "optim.state.0.exp_avg_sq": 0,
    }  # no parameter 1: its state is left to plain allocation


def test_state_keyed_by_name_or_missing_is_left_alone() -> None:
    structure, records = _checkpointed()
    assert param_shaped_state(structure, ("by_name",), records, [(2,)], set(records)) == {}
    assert param_shaped_state(structure, ("nowhere",), records, [(2,)], set(records)) == {}

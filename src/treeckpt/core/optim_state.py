"""Which checkpointed optimizer state can be laid out like its parameter: a pure decision.

A torch optimizer's state dict keys its state by parameter id (0, 1, ... in
the order of its param groups): ``state.<id>.<name>``. A fresh optimizer has
no state to load into, so the loader allocates it; a state tensor whose
global shape is its parameter's (``exp_avg``, ``momentum_buffer``...) is
allocated like the parameter (same device, same sharding), everything else
(step counters, factored moments, LBFGS history) as a plain tensor. This
module picks the first kind from the checkpoint's structure record alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set

from treeckpt.core.leaves import LeafRecord, TensorLeaf
from treeckpt.core.tree import Node, PathEntry, find_subtree, node_items

__all__ = ["param_shaped_state"]


def param_shaped_state(
    structure: Node,
    path: Sequence[PathEntry],
    records: Mapping[str, LeafRecord],
    param_shapes: Sequence[tuple[int, ...] | None],
    wanted: Set[str],
) -> dict[str, int]:
    """FQN -> parameter id for the state tensors of the optimizer at ``path`` that have
    their parameter's shape.

    ``param_shapes[i]`` is parameter ``i``'s global shape (``None``: do not lay
    anything out like it, e.g. a meta parameter). Only FQNs in ``wanted`` are
    considered. ``step`` is never chosen: optimizers keep it on the host unless
    they say otherwise, and their ``load_state_dict`` places it.
    """
    node = find_subtree(structure, (*path, "state"))
    out: dict[str, int] = {}
    for pid, child in node_items(node) if node is not None else []:
        if type(pid) is not int or not 0 <= pid < len(param_shapes):
            continue  # not a parameter id (state keyed by name)
        shape = param_shapes[pid]
        for name, leaf in node_items(child):
            fqn = leaf.get("leaf")
            if name == "step" or not isinstance(fqn, str) or fqn not in wanted:
                continue
            rec = records.get(fqn)
            if isinstance(rec, TensorLeaf) and rec.lib == "torch" and rec.shape == shape:
                out[fqn] = pid
    return out

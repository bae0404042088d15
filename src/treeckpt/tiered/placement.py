"""Where the copies of each rank's memory checkpoint live: pure functions of the node layout.

A rank's shards are kept on its own node and sent to ``replicas`` partner
ranks, each on a different node, so that losing any ``replicas`` nodes
never loses every copy of a shard. The nodes are taken in order of their
identifier; the k-th copy of the rank at local index ``i`` of node ``n``
goes to the rank at local index ``i mod size`` of the node ``k`` places
after ``n`` (cyclically). Works for any world size, any number of nodes
and uneven nodes; receivers are spread as evenly as the layout allows.
"""

from __future__ import annotations

from collections.abc import Sequence

from treeckpt.errors import OptionsError

__all__ = ["node_groups", "partners", "sources"]


def node_groups(nodes: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Node identifier -> its ranks, ascending, for ``nodes[r]`` = the node of rank ``r``."""
    groups: dict[int, list[int]] = {}
    for rank, node in enumerate(nodes):
        groups.setdefault(node, []).append(rank)
    return {n: tuple(groups[n]) for n in sorted(groups)}


def partners(nodes: Sequence[int], replicas: int = 1) -> tuple[tuple[int, ...], ...]:
    """For each rank, the ranks (on other nodes, each on a different one) that hold its copies.

    Raises:
        OptionsError: fewer than ``replicas + 1`` nodes, or ``replicas`` < 0.
    """
    if type(replicas) is not int or replicas < 0:
        raise OptionsError(f"replicas must be an int >= 0, got {replicas!r}")
    groups = node_groups(nodes)
    order = list(groups)
    if replicas and len(order) < replicas + 1:
        raise OptionsError(
            f"{replicas} extra cop{'y' if replicas == 1 else 'ies'} of each shard need at least "
            f"{replicas + 1} nodes; the job has {len(order)} (node of each rank: {list(nodes)})"
        )
    out: list[tuple[int, ...]] = []
    for rank, node in enumerate(nodes):
        at = order.index(node)
        local = groups[node].index(rank)
        mine = []
        for k in range(1, replicas + 1):
            other = groups[order[(at + k) % len(order)]]
            mine.append(other[local % len(other)])
        out.append(tuple(mine))
    return tuple(out)


def sources(nodes: Sequence[int], replicas: int = 1) -> tuple[tuple[int, ...], ...]:
    """For each rank, the ranks whose copies it receives (the inverse of :func:`partners`)."""
    got: list[list[int]] = [[] for _ in nodes]
    for rank, ps in enumerate(partners(nodes, replicas)):
        for p in ps:
            got[p].append(rank)
    return tuple(tuple(g) for g in got)

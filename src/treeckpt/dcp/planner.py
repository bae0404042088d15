"""Planner interfaces and plan types, as in ``torch.distributed.checkpoint.planner``.

The abstract :class:`SavePlanner` / :class:`LoadPlanner` and the plain plan
types are torch's own, re-exported, so a planner written for DCP subclasses
the same classes and runs unchanged through ``treeckpt.dcp.save`` / ``load``.
The default planners with behaviour are treeckpt's
(:mod:`treeckpt.dcp.default_planner`).
"""

from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = [
    "BytesIOWriteData",
    "LoadItemType",
    "LoadPlan",
    "LoadPlanner",
    "ReadItem",
    "SavePlan",
    "SavePlanner",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
]

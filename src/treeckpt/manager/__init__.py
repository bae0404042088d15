"""Training-loop checkpointing: steps under one root, retention, resume, incremental saves."""

from treeckpt.manager.lock import RootLockedError, StaleLockWarning
from treeckpt.manager.policy import KeepPolicy, SavePolicy, StepRecord, steps_to_keep
from treeckpt.manager.root import StepInfo
from treeckpt.manager.steps import CheckpointManager, StepSkippedWarning

__all__ = [
    "CheckpointManager",
    "KeepPolicy",
    "RootLockedError",
    "SavePolicy",
    "StaleLockWarning",
    "StepInfo",
    "StepRecord",
    "StepSkippedWarning",
    "steps_to_keep",
]

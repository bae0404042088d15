"""Tiered checkpoints: host memory replicated to peers, durable storage behind it.

>>> ckpt = TieredCheckpointer("/dev/shm/run", "s3://bucket/run", memory_every=10, durable_every=500)  # doctest: +SKIP
>>> step, report = ckpt.restore({"model": model, "optim": optim})  # doctest: +SKIP
>>> for step in range(step + 1, steps):  # doctest: +SKIP
...     train_step()
...     ckpt.save(step, {"model": model, "optim": optim})
"""

from treeckpt.tiered.checkpointer import (
    RestoreReport,
    TieredCheckpointer,
    TieredFuture,
    TieredResult,
    node_identity,
    step_kind,
)
from treeckpt.tiered.decide import RestoreDecision, StepCopy, Transfer, decide_restore
from treeckpt.tiered.placement import node_groups, partners, sources

__all__ = [
    "ChunkTransport",
    "RestoreDecision",
    "RestoreReport",
    "StepCopy",
    "TieredCheckpointer",
    "TieredFuture",
    "TieredResult",
    "Transfer",
    "decide_restore",
    "node_groups",
    "node_identity",
    "partners",
    "sources",
    "step_kind",
]


def __getattr__(name: str) -> object:
    # The torchft transport is imported on first use (it imports torchft when installed).
    if name == "ChunkTransport":
        from treeckpt.tiered.transport import ChunkTransport

        return ChunkTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Lightning integration: sharded checkpoints of a Lightning strategy written and read by treeckpt.

One line changes in a Lightning script::

    from treeckpt.lightning import ModelParallelStrategy  # instead of lightning.pytorch.strategies

    trainer = L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))

Checkpoints (``ModelCheckpoint``, ``trainer.save_checkpoint``) become treeckpt
checkpoints with Lightning's layout; ``trainer.fit(model, ckpt_path=...)``
resumes from them on any number of processes; ``treeckpt consolidate PATH``
turns one into a single ``torch.load``-able file. Needs the ``lightning``
extra; ``import treeckpt`` never imports Lightning.
"""

from treeckpt.lightning._checkpoint import is_treeckpt_checkpoint, load_checkpoint, save_checkpoint
from treeckpt.lightning._strategies import FSDPStrategy, ModelParallelStrategy

__all__ = [
    "FSDPStrategy",
    "ModelParallelStrategy",
    "is_treeckpt_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

"""Lazy exploration of a checkpoint: ``treeckpt.open(path)``.

Opening reads the manifest only; the chunk indexes are read the first time
something needs them (stored sizes, codecs, shard layout, any data), and
tensor bytes are read only by :meth:`TensorHandle.read`, slicing and
:meth:`TensorHandle.stats`, each fetching just the chunks (or, for raw
chunks, the checksummed blocks) that cover what was asked for.

>>> ckpt = treeckpt.open("ckpt/")  # doctest: +SKIP
>>> ckpt["model.layers.0"]  # doctest: +SKIP
>>> w = ckpt["model.layers.0.attn.weight"]  # doctest: +SKIP
>>> w.shape, w.dtype, w.ratio  # doctest: +SKIP
>>> w[0:10, 5]  # reads only the chunks covering rows 0..9  # doctest: +SKIP
>>> w.stats()  # doctest: +SKIP
"""

from treeckpt.explore._checkpoint import Checkpoint, Group, open
from treeckpt.explore._handle import TensorHandle
from treeckpt.explore._source import ChunkInfo
from treeckpt.explore._stats import TensorStats

__all__ = [
    "Checkpoint",
    "ChunkInfo",
    "Group",
    "TensorHandle",
    "TensorStats",
    "open",
]

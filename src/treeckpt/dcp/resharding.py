"""``treeckpt.dcp.resharding``: as ``torch.distributed.checkpoint.resharding``.

torch's module has no public names (its ``__all__`` is empty): the overlap of
shards is computed by treeckpt's own planning (``treeckpt.core.box``), which
every load through ``treeckpt.dcp`` uses. The module exists so that an import
of the path keeps working after the one-line change.
"""

__all__: list[str] = []

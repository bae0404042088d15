"""A drop-in for ``torch.distributed.checkpoint``: ``import treeckpt.dcp as dcp``.

Same module paths, names, signatures and defaults as DCP, with treeckpt's
format, speed and safety underneath (see the DCP migration guide in the docs).
"""

"""``treeckpt.dcp.planner_helpers``: as ``torch.distributed.checkpoint.planner_helpers``.

``create_read_items_for_chunk_list`` turns the chunks a rank wants of a
stored tensor into DCP's ``ReadItem``\\ s (the box intersections); a custom
load planner calls it. It is pure planning over torch's own data types, so it
is torch's function, re-exported; the reads it plans run through treeckpt's
reader.
"""

from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

__all__ = ["create_read_items_for_chunk_list"]

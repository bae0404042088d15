"""Pure core: tree flattening and FQNs, box geometry, shard specs, planning.

Nothing here touches a file, a process group, a clock or a random source: every
function maps plain frozen data to plain frozen data, which is what makes
planning testable with property-based tests and plannable for thousands of
ranks in one process.
"""

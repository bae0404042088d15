"""Store: codecs, checksums, chunk files over fsspec or local disk, manifests, commit.

May import only ``treeckpt.core`` (for its data types) and ``treeckpt.errors``.
"""

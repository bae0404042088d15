"""Shared pieces of the treeckpt benchmark harness (not part of the library)."""

"""What is stored in a test bucket: objects and unfinished uploads."""

from __future__ import annotations

from typing import Any


def objects(fs: Any, url: str) -> list[str]:
    """Every object below ``url``, relative to it, from a fresh listing."""
    root = url.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache()
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def uploads(fs: Any, url: str) -> list[str]:
    """Keys of multipart uploads begun and neither completed nor aborted."""
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    return sorted(u["Key"] for u in fs.list_multipart_uploads(bucket))

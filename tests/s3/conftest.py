"""A real S3-protocol server on loopback for the ``s3`` tests.

moto's ``ThreadedMotoServer`` is started once per test run on
``127.0.0.1`` and a free port, and stopped at the end. treeckpt reaches it
the way a user reaches any S3-compatible store: through fsspec's
configuration for the ``s3`` protocol (``endpoint_url``, credentials), so
``s3://bucket/path`` URLs go through s3fs unchanged. Each test gets its own
bucket. Everything skips cleanly when moto or s3fs is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

HAVE_S3 = all(importlib.util.find_spec(n) for n in ("s3fs", "moto"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    if not HAVE_S3:
        pytest.skip("needs the s3 extra (s3fs and moto[server])")
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
    }
    try:
        yield endpoint
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
        server.stop()


@pytest.fixture
def s3fs_instance(s3_endpoint: str) -> Any:
    import fsspec

    return fsspec.filesystem("s3")


@pytest.fixture
def s3_url(s3fs_instance: Any) -> Iterator[str]:
    """``s3://<fresh bucket>/ckpt``: a checkpoint path nothing has been written to."""
    bucket = f"treeckpt-{uuid.uuid4().hex[:16]}"
    s3fs_instance.mkdir(bucket)
    yield f"s3://{bucket}/ckpt"
    s3fs_instance.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
        s3fs_instance.rm(bucket, recursive=True)

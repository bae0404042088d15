"""CheckpointManager on S3 (a local moto server): steps, incremental saves, retention, lock."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch

import treeckpt
from treeckpt.manager import CheckpointManager, RootLockedError

pytestmark = pytest.mark.s3


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs_cls = type(fsspec.filesystem("s3", skip_instance_cache=True))
    fs_cls.clear_instance_cache()
    fsspec.filesystem("s3").mkdir("bucket")
    try:
        yield "s3://bucket/run"
    finally:
        fs_cls.clear_instance_cache()
        server.stop()


def test_manager_on_s3(bucket: str) -> None:
    frozen = torch.randn(128, 128)
    opts = treeckpt.SaveOptions(chunk_bytes=16 << 10)
    with CheckpointManager(bucket, max_to_keep=1, options=opts) as m:
        with pytest.raises(RootLockedError):
            CheckpointManager(bucket)
        for step in (1, 2, 3):
            m.save(step, {"frozen": frozen, "head": torch.full((8,), float(step))})
        assert m.all_steps() == [3]
        out = m.restore()
        assert torch.equal(out["frozen"], frozen) and torch.equal(
            out["head"], torch.full((8,), 3.0)
        )
        got = treeckpt.restore(m.step_path(3))
        assert torch.equal(got["frozen"], frozen)

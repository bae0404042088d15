"""The torchft transport, run through torchft's own recovery test over its gloo process group."""

from __future__ import annotations

import json
import unittest
from datetime import timedelta

import pytest
import torch

torchft = pytest.importorskip("torchft")

from torch.distributed import TCPStore  # noqa: E402
from torchft.checkpointing.transport_test import (  # noqa: E402
    make_state_dict,
    run_multi_recovery_test,
)
from torchft.process_group import ProcessGroupGloo  # noqa: E402

from treeckpt.tiered.transport import ChunkTransport  # noqa: E402


def _run(inplace: bool) -> None:
    store = TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False)
    device = torch.device("cpu")

    def init(rank: int, world_size: int) -> ChunkTransport[dict[str, object]]:
        pg = ProcessGroupGloo()
        pg.configure(
            store_addr=f"localhost:{store.port}/prefix",
            replica_id="0",
            rank=rank,
            world_size=world_size,
        )
        return ChunkTransport(
            pg,
            timeout=timedelta(seconds=10),
            state_dict=(lambda: make_state_dict(device)) if inplace else None,
        )

    run_multi_recovery_test(unittest.TestCase(), init, device=device)


def test_torchft_recovery_test_passes() -> None:
    _run(inplace=False)


def test_torchft_recovery_test_passes_in_place() -> None:
    _run(inplace=True)


class _Done:
    def wait(self, timeout: object = None) -> bool:
        return True


class _Wire:
    """Messages kept by tag: a process group for one sender and one receiver in one thread."""

    def __init__(self) -> None:
        self.sent: dict[int, torch.Tensor] = {}

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Done:
        self.sent[tag] = tensors[0].clone()
        return _Done()

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Done:
        tensors[0].copy_(self.sent[tag])
        return _Done()


def _send(state: dict[str, object]) -> _Wire:
    wire = _Wire()
    ChunkTransport(wire, timedelta(seconds=5)).send_checkpoint([1], 7, state, timedelta(seconds=5))
    return wire


def test_received_values_fill_the_template_in_place() -> None:
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    wire = _send({"w": w, "n": 7, "s": "x", "opt": {"step": torch.tensor(3.0)}})
    template: dict[str, object] = {
        "w": torch.zeros(4, 3),
        "n": 0,
        "s": "",
        "opt": {"step": torch.tensor(0.0)},
    }
    dest = template["w"]
    got = ChunkTransport(wire, timedelta(seconds=5), state_dict=lambda: template).recv_checkpoint(
        0, "treeckpt-chunks/1", 7, timedelta(seconds=5)
    )
    assert got is template and got["w"] is dest
    assert torch.equal(dest.view(torch.int32), w.view(torch.int32))
    assert (got["n"], got["s"]) == (7, "x")
    assert got["opt"]["step"].item() == 3.0  # type: ignore[index]


def test_a_damaged_message_is_refused() -> None:
    from treeckpt.errors import CheckpointError, CorruptChunkError

    wire = _send({"w": torch.arange(1000, dtype=torch.float32)})
    header = json.loads(wire.sent[2].numpy().tobytes())
    data = next(i for i, (n, _) in enumerate(header["files"]) if n.endswith(".bin"))
    wire.sent[3 + data][100] ^= 1
    recv = ChunkTransport(wire, timedelta(seconds=5))
    with pytest.raises(CorruptChunkError, match="checksum mismatch"):
        recv.recv_checkpoint(0, "treeckpt-chunks/1", 7, timedelta(seconds=5))
    with pytest.raises(CheckpointError, match="expected 8"):
        recv.recv_checkpoint(0, "treeckpt-chunks/1", 8, timedelta(seconds=5))
    header["files"][0][0] = "../../etc/passwd"
    bad = json.dumps(header).encode()
    wire.sent[1] = torch.tensor([len(bad)], dtype=torch.int64)
    wire.sent[2] = torch.frombuffer(bytearray(bad), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"sent the file name '\.\./\.\./etc/passwd'"):
        recv.recv_checkpoint(0, "treeckpt-chunks/1", 7, timedelta(seconds=5))

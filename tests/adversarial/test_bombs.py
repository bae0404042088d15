"""Decompression bombs and absurd sizes: hostile input has bounded cost.

The loads run in a fresh interpreter whose address space is capped a few
hundred MB above its size after import, so any allocation near a forged size
fails loudly; its peak RSS must stay within 200 MB of the baseline, and every
case must end in a ``CheckpointError`` (never ``MemoryError`` or another
exception).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

import treeckpt
from tests.adversarial.forge import Ckpt
from treeckpt.store.checksum import checksum

GB = 1 << 30
N = 1024  # the honest tensor: 1024 uint8 zeros, one compressed chunk


def _zeros_frame(total: int, *, content_size: bool) -> bytes:
    """One zstd frame of ``total`` zero bytes, built without holding them in memory."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    cobj = cctx.compressobj(size=total if content_size else -1)
    block = bytes(1 << 20)
    parts = [cobj.compress(block) for _ in range(total // len(block))]
    parts.append(cobj.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def gb_frame() -> bytes:
    frame = _zeros_frame(GB, content_size=True)
    assert zstandard.frame_content_size(frame) == GB
    assert len(frame) < 1 << 20
    return frame


@pytest.fixture(scope="module")
def gb_frame_unsized() -> bytes:
    frame = _zeros_frame(GB, content_size=False)
    assert zstandard.frame_content_size(frame) == -1
    return frame


def _honest(path: Path) -> Ckpt:
    treeckpt.save(
        {"w": torch.zeros(N, dtype=torch.uint8)},
        str(path),
        options=treeckpt.SaveOptions(compression=treeckpt.Compression(mode="always")),
    )
    ck = Ckpt(path)
    assert [c[6] for c in ck.index()["chunks"]] == ["planes"]
    return ck


def _with_payload(ck: Ckpt, payload: bytes, codec: str = "zstd", **chunk_fields: Any) -> None:
    """Replace the only chunk's bytes, keeping every recorded size and checksum consistent.

    ``zstd`` and ``raw`` chunks lose their block list; a ``planes`` chunk gets
    one block (one ``z`` plane) holding the whole payload as one segment.
    """
    rel = ck.data_files()[0]
    ck.write(rel, payload)

    def edit(body: dict[str, Any]) -> None:
        body["files"][0][1] = len(payload)
        c = body["chunks"][0]
        c[4], c[5], c[6], c[8] = 0, len(payload), codec, checksum(payload)
        for k, v in chunk_fields.items():
            c[{"raw_length": 7}[k]] = v
        del c[9:]
        if codec == "planes":
            c.append([c[7], [checksum(payload)], "z", [len(payload)]])

    ck.edit_index(edit)


def _lying_header(frame: bytes, claim: int) -> bytes:
    """The frame with its content-size field rewritten to ``claim`` (same field width)."""
    out = bytearray(frame)
    fhd = out[4]
    width = (1 if fhd & 0x20 else 0, 2, 4, 8)[fhd >> 6]
    assert width == 4
    at = 5 + (0 if fhd & 0x20 else 1) + (0, 1, 2, 4)[fhd & 3]
    out[at : at + width] = claim.to_bytes(width, "little")
    assert zstandard.frame_content_size(bytes(out)) == claim
    return bytes(out)


SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    import treeckpt

    def vm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])
        raise RuntimeError("no VmSize")

    cases = json.loads(sys.argv[1])
    headroom_mb = int(sys.argv[2])
    # warm up every code path once on an honest checkpoint, then cap the address space
    treeckpt.restore(cases[0]["path"])
    treeckpt.load({"w": torch.zeros(1024, dtype=torch.uint8)}, cases[0]["path"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limit = (vm_kb() + headroom_mb * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = []
    for case in cases[1:]:
        try:
            if case["call"] == "restore":
                treeckpt.restore(case["path"])
            else:
                treeckpt.load({"w": torch.zeros(1024, dtype=torch.uint8)}, case["path"])
            result = "ok"
        except treeckpt.CheckpointError as exc:
            result = f"CheckpointError {type(exc).__name__}: {exc}"
        except BaseException as exc:
            result = f"OTHER {type(exc).__name__}: {exc}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out.append({"name": case["name"], "result": result[:400], "rss_mb": (peak - base) / 1024})
    print(json.dumps(out))
    """
)


def test_bombs_and_absurd_sizes_have_bounded_cost(
    tmp_path: Path, gb_frame: bytes, gb_frame_unsized: bytes
) -> None:
    honest = _honest(tmp_path / "honest")
    small = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(N))
    builders = {
        # the frame declares 1 GB; the index declares 1 KiB
        "bomb_declared": lambda ck: _with_payload(ck, gb_frame),
        # no content size in the frame header at all
        "bomb_unsized": lambda ck: _with_payload(ck, gb_frame_unsized),
        # the header claims 1 KiB, the blocks hold 1 GB
        "bomb_lying_header": lambda ck: _with_payload(ck, _lying_header(gb_frame, N)),
        # the same bombs as the one segment of a planes chunk
        "planes_bomb_declared": lambda ck: _with_payload(ck, gb_frame, codec="planes"),
        "planes_bomb_unsized": lambda ck: _with_payload(ck, gb_frame_unsized, codec="planes"),
        "planes_bomb_lying_header": lambda ck: _with_payload(
            ck, _lying_header(gb_frame, N), codec="planes"
        ),
        "planes_huge_raw_length": lambda ck: _with_payload(
            ck, gb_frame, codec="planes", raw_length=GB
        ),
        # an honest first frame followed by a 1 GB frame
        "bomb_trailing_frame": lambda ck: _with_payload(ck, small + gb_frame),
        # huge raw_length with a box of 1 KiB
        "huge_raw_length": lambda ck: _with_payload(ck, gb_frame, raw_length=GB),
        # a raw chunk said to be 1 GB long
        "huge_raw_chunk": lambda ck: _with_payload(ck, bytes(N), codec="raw", raw_length=GB),
        # the manifest says the index is 1 GB; it is not
        "huge_index_size": lambda ck: ck.edit_manifest(lambda b: b["indexes"][0].update(size=GB)),
        # a 4 GiB tensor backed by a 1 KiB chunk (the address space cap is far below 4 GiB)
        "huge_shape": lambda ck: ck.edit_manifest(
            lambda b: b["leaves"]["w"].update(shape=[4 * GB])
        ),
        # the index says the data file is 1 TB; it is not
        "huge_data_file_size": lambda ck: ck.edit_index(
            lambda b: b["files"][0].__setitem__(1, 1 << 40)
        ),
    }
    cases: list[dict[str, str]] = [{"name": "honest", "path": str(honest.path), "call": "-"}]
    for name, build in builders.items():
        for call in ("restore", "load"):
            path = tmp_path / f"{name}-{call}"
            ck = _honest(path)
            build(ck)
            cases.append({"name": f"{name}/{call}", "path": str(path), "call": call})

    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases), "600"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases) - 1
    for r in results:
        assert r["rss_mb"] < 200, r
        if r["name"].startswith("bomb_trailing_frame"):
            # the first frame is honest: its 1 KiB may load; the trailing frame is never decoded
            assert r["result"] == "ok" or r["result"].startswith("CheckpointError"), r
        elif r["name"].startswith("huge_shape"):
            assert r["result"].startswith("CheckpointError"), r
        else:
            assert r["result"].startswith("CheckpointError"), r
            assert "r0-0.bin" in r["result"] or "index-r0." in r["result"], r

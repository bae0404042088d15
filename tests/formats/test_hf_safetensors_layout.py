"""The safetensors layout as pure functions: byte ranges of a region, header encoding read
by the safetensors library, header checks naming the file and tensor, consolidation plans."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load

from treeckpt.core.box import Box
from treeckpt.errors import ManifestError, PlanError
from treeckpt.formats.hf_safetensors import Folder, file_name, plan_consolidation
from treeckpt.formats.hf_safetensors.files import tensor_bytes
from treeckpt.formats.hf_safetensors.layout import (
    Entry,
    Header,
    byte_runs,
    encode_header,
    parse_header,
)


def test_byte_runs_merge_whole_rows_and_split_columns() -> None:
    assert byte_runs((4, 3), 2, Box(offsets=(0, 0), sizes=(4, 3))) == [(0, 24)]
    assert byte_runs((4, 3), 2, Box(offsets=(1, 0), sizes=(2, 3))) == [(6, 12)]
    assert byte_runs((4, 3), 2, Box(offsets=(0, 1), sizes=(2, 2))) == [(2, 4), (8, 4)]
    assert byte_runs((2, 3, 4), 1, Box(offsets=(1, 1, 0), sizes=(1, 2, 4))) == [(16, 8)]
    assert byte_runs((5,), 4, Box(offsets=(2,), sizes=(0,))) == []
    assert byte_runs((), 8, Box(offsets=(), sizes=())) == [(0, 8)]


def test_byte_runs_select_exactly_the_region() -> None:
    t = torch.arange(3 * 5 * 7, dtype=torch.int16).reshape(3, 5, 7)
    raw = bytes(tensor_bytes(t))
    box = Box(offsets=(1, 2, 3), sizes=(2, 2, 3))
    got = b"".join(raw[o : o + n] for o, n in byte_runs(t.shape, 2, box))
    want = t[1:3, 2:4, 3:6].contiguous()
    assert got == bytes(tensor_bytes(want))


def test_encoded_header_is_read_by_safetensors() -> None:
    tensors = {
        "a": torch.randn(3, 2),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.ones((), dtype=torch.bfloat16),
    }
    header, entries = encode_header(
        ((k, v.dtype, v.shape) for k, v in tensors.items()), {"format": "pt"}
    )
    blob = header + b"".join(bytes(tensor_bytes(v)) for v in tensors.values())
    back = load(blob)
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert (len(header) - 8) % 8 == 0
    parsed = parse_header(header[8:], "x.safetensors", len(blob))
    assert parsed.entries == entries and parsed.metadata == {"format": "pt"}


def _raw(doc: dict[str, object]) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("doc", "size", "message"),
    [
        (
            {"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
            100,
            "tensor 'w': unknown dtype 'F99'",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}},
            100,
            "tensor 'w': 12 bytes for shape",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            4,
            "tensor 'w': data_offsets",
        ),
        (
            {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            100,
            "shape is not a list",
        ),
        (
            {
                "__metadata__": {"DCP_SHARDING_INFO": "{}"},
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            200,
            "tensor 'w': no saved_offsets",
        ),
    ],
)
def test_bad_headers_name_the_file_and_tensor(
    doc: dict[str, object], size: int, message: str
) -> None:
    raw = _raw(doc)
    with pytest.raises(ManifestError, match=f"f.safetensors: .*{message}"):
        parse_header(raw, "f.safetensors", 8 + len(raw) + size)


def test_file_names() -> None:
    assert file_name(3, 12) == "model-00003-of-00012.safetensors"
    assert file_name(1, 2, shard=3) == "shard-00003-model-00001-of-00002.safetensors"
    assert struct.calcsize("<Q") == 8


def _entry(name: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> Entry:
    return Entry(name=name, dtype=torch.float32, shape=shape, start=0, stop=0, offsets=offsets)


def test_consolidation_plan_deals_files_by_size_and_checks_tiling() -> None:
    headers = {
        "shard-00001-model-00001-of-00001.safetensors": Header(
            entries={
                "a": _entry("a", (0, 0), (4, 8)),
                "b": _entry("b", (0,), (100,)),
                "c": _entry("c", (0,), (2,)),
            }
        ),
        "shard-00002-model-00001-of-00001.safetensors": Header(
            entries={"a": _entry("a", (4, 0), (4, 8)), "b": _entry("b", (100,), (100,))}
        ),
    }
    folder = Folder(root="r", headers=headers, weight_map=None)
    plan = plan_consolidation(folder, {"a": 1, "b": 2, "c": 3, "gone": 3}, 2)
    assert [(f.name, f.rank, [t.name for t in f.tensors]) for f in plan.files] == [
        ("model-00001-of-00003.safetensors", 1, ["a"]),
        ("model-00002-of-00003.safetensors", 0, ["b"]),
        ("model-00003-of-00003.safetensors", 1, ["c"]),
    ]
    assert plan.absent == ("gone",)
    assert plan.total_size == (64 + 200 + 2) * 4
    assert [t.shape for f in plan.files for t in f.tensors] == [(8, 8), (200,), (2,)]
    with pytest.raises(PlanError, match="no file index for 'c'"):
        plan_consolidation(folder, {"a": 1, "b": 1}, 2)
    headers["shard-00002-model-00001-of-00001.safetensors"].entries["a"] = _entry(
        "a", (5, 0), (3, 8)
    )
    with pytest.raises(PlanError, match="'a'"):  # row 4 is in no piece
        plan_consolidation(folder, None, 2)


def test_coalesced_reads_give_the_same_bytes() -> None:
    from treeckpt.formats.hf_safetensors.layout import coalesce_runs

    t = torch.arange(6 * 10, dtype=torch.int32).reshape(6, 10)
    raw = bytes(tensor_bytes(t))
    runs = byte_runs(t.shape, 4, Box(offsets=(1, 2), sizes=(4, 5)))
    assert len(runs) == 4
    assert coalesce_runs(runs, 0) == [(s, n, [(0, n)]) for s, n in runs]
    reads = coalesce_runs(runs, 20)
    assert reads == [(48, 140, [(0, 20), (40, 20), (80, 20), (120, 20)])]
    got = b"".join(raw[s + a : s + a + n] for s, _, parts in reads for a, n in parts)
    assert got == bytes(tensor_bytes(t[1:5, 2:7].contiguous()))
    assert len(coalesce_runs(runs, 19)) == 4

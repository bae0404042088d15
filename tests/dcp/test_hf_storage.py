"""Hugging Face safetensors storage, one process: what ``transformers`` and ``safetensors``
read back from the writer, what the reader loads, and the signatures torch has."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from safetensors.torch import load_file, save_file

import treeckpt.dcp as dcp
from treeckpt.dcp import _consolidate_hf_safetensors as ours_consolidate
from treeckpt.errors import CheckpointError


def _params(obj: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["HuggingFaceStorageWriter", "HuggingFaceStorageReader", "QuantizedHuggingFaceStorageReader"],
)
def test_classes_have_torchs_signatures(name: str) -> None:
    ours, theirs = getattr(dcp, name), getattr(torch_dcp, name)
    assert ours is not theirs
    assert _params(ours) == _params(theirs)
    for meth, fn in inspect.getmembers(theirs, predicate=inspect.isfunction):
        if not meth.startswith("_"):
            assert _params(getattr(ours, meth)) == _params(fn), meth


def test_consolidate_module_has_torchs_functions() -> None:
    import torch.distributed.checkpoint._consolidate_hf_safetensors as theirs

    for name in ("consolidate_safetensors_files", "consolidate_safetensors_files_on_every_rank"):
        assert _params(getattr(ours_consolidate, name)) == _params(getattr(theirs, name))


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    return GPT2LMHeadModel(cfg)


def test_writer_output_loads_in_transformers_and_safetensors(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _gpt2()
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    mapping = {k: 1 + i % 3 for i, k in enumerate(sd)}
    dcp.save(
        sd,
        storage_writer=dcp.HuggingFaceStorageWriter(str(tmp_path), fqn_to_index_mapping=mapping),
        no_dist=True,
    )
    model.config.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        k: f"model-0000{i}-of-00003.safetensors" for k, i in mapping.items()
    }
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    loaded: dict[str, torch.Tensor] = {}
    for i in (1, 2, 3):
        part = load_file(tmp_path / f"model-0000{i}-of-00003.safetensors")
        assert set(part) == {k for k, j in mapping.items() if j == i}
        loaded.update(part)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_reader_loads_a_save_pretrained_folder(tmp_path: Path) -> None:
    model = _gpt2().to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2
    want: dict[str, torch.Tensor] = {}
    for f in files:
        want.update(load_file(tmp_path / f))
    target = {k: torch.zeros_like(v) for k, v in want.items()}
    reader = dcp.HuggingFaceStorageReader(str(tmp_path), thread_count=3)
    dcp.load(target, storage_reader=reader, no_dist=True)
    for k, v in want.items():
        assert target[k].dtype == torch.bfloat16 and torch.equal(target[k], v), k
    # Each file: its length and its header; then one range per tensor (whole tensors wanted).
    assert reader.counter.ranges == 2 * len(files) + len(want)


def test_reader_refuses_a_cast_naming_the_tensor(tmp_path: Path) -> None:
    save_file(
        {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "model.safetensors"
    )
    target = {"w": torch.zeros(2, 3, dtype=torch.bfloat16)}
    with pytest.raises(CheckpointError, match=r"w .*float32.*bfloat16"):
        dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(str(tmp_path)), no_dist=True)


def test_writer_refuses_values_and_unmapped_tensors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'step': a safetensors folder holds tensors only"):
        dcp.save(
            {"w": torch.ones(2), "step": 3},
            storage_writer=dcp.HuggingFaceStorageWriter(str(tmp_path / "a")),
            no_dist=True,
        )
    with pytest.raises(CheckpointError, match="'v': not in fqn_to_index_mapping"):
        dcp.save(
            {"w": torch.ones(2), "v": torch.ones(2)},
            storage_writer=dcp.HuggingFaceStorageWriter(
                str(tmp_path / "b"), fqn_to_index_mapping={"w": 1}
            ),
            no_dist=True,
        )


def test_distributed_layout_and_consolidation_in_one_process(tmp_path: Path) -> None:
    sd = {"a": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int64)}
    out = tmp_path / "out"
    dcp.save(
        sd,
        storage_writer=dcp.HuggingFaceStorageWriter(
            str(out), save_distributed=True, enable_consolidation=True
        ),
        no_dist=True,
    )
    assert sorted(p.name for p in (out / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors"
    ]
    got = load_file(out / "model-00001-of-00001.safetensors")
    assert set(got) == {"a", "b"} and all(torch.equal(got[k], v) for k, v in sd.items())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 5 * 3 * 4 + 7 * 8},
        "weight_map": {
            "a": "model-00001-of-00001.safetensors",
            "b": "model-00001-of-00001.safetensors",
        },
    }


def test_fsspec_url_and_async_save(tmp_path: Path) -> None:
    import uuid

    sd = {"a": torch.randn(6, 4), "b": torch.arange(5, dtype=torch.int32)}
    url = f"memory://hf-{uuid.uuid4().hex}"
    fut = dcp.async_save(sd, storage_writer=dcp.HuggingFaceStorageWriter(url), no_dist=True)
    fut.result(timeout=60)
    target = {"a": torch.zeros(6, 4), "b": torch.zeros(5, dtype=torch.int32)}
    reader = dcp.HuggingFaceStorageReader(url)
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["a"], sd["a"]) and torch.equal(target["b"], sd["b"])
    assert reader.counter.ranges == 2 + 2  # one header (length, JSON), a range per tensor


def test_a_new_save_replaces_the_model_files_of_the_old(tmp_path: Path) -> None:
    old = {k: torch.ones(3) for k in "abc"}
    dcp.save(
        old,
        storage_writer=dcp.HuggingFaceStorageWriter(
            str(tmp_path), fqn_to_index_mapping={"a": 1, "b": 2, "c": 3}
        ),
        no_dist=True,
    )
    (tmp_path / "config.json").write_text("{}")
    dcp.save(
        {"a": torch.zeros(2)},
        storage_writer=dcp.HuggingFaceStorageWriter(str(tmp_path)),
        no_dist=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    target = {"a": torch.ones(2)}
    dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(str(tmp_path)), no_dist=True)
    assert torch.equal(target["a"], torch.zeros(2))


def test_damaged_header_is_an_error_naming_the_file(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    raw[8:9] = b"["  # the JSON header no longer an object
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the safetensors header is not"):
        dcp.load(
            {"w": torch.zeros(4)},
            storage_reader=dcp.HuggingFaceStorageReader(str(tmp_path)),
            no_dist=True,
        )


def test_object_store_region_is_one_request_for_close_rows() -> None:
    import uuid

    from treeckpt.core.box import Box
    from treeckpt.formats.hf_safetensors.files import ReadCounter, opened, read_folder, read_region

    w = torch.randn(64, 32)
    url = f"memory://hf-{uuid.uuid4().hex}"
    dcp.save({"w": w}, storage_writer=dcp.HuggingFaceStorageWriter(url), no_dist=True)
    with opened(url) as backend:
        folder = read_folder(backend)
        ((file, entry),) = folder.pieces()
        counter = ReadCounter()
        got = read_region(backend, file, entry, Box(offsets=(8, 16), sizes=(40, 16)), counter)
    assert torch.equal(got, w[8:48, 16:32])
    assert counter.ranges == 1 and counter.bytes == (39 * 32 + 16) * 4

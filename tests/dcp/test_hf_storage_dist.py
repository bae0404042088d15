"""Hugging Face safetensors storage on several gloo ranks: a folder transformers wrote loaded
into FSDP2 and column-sharded DTensors, counting the byte ranges each rank reads; the
distributed save consolidated by every rank, as torchtitan runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from tests.dist_utils import run_ranks
from treeckpt.formats.hf_safetensors import read_folder
from treeckpt.store.backends import LocalBackend

pytestmark = pytest.mark.distributed


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    )


def _folder_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recording(reads: list[tuple[str, int, int]]) -> None:
    """Record every byte range this process reads from local files."""
    original = LocalBackend.readinto

    def readinto(self: LocalBackend, name: str, offset: int, out: memoryview) -> int:
        reads.append((name, offset, len(out)))
        return original(self, name, offset, out)

    LocalBackend.readinto = readinto  # type: ignore[method-assign]


def _load_fsdp(rank: int, world: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import treeckpt.dcp as dcp

    stored = _folder_tensors(Path(path))
    model = _gpt2()
    for p in model.parameters():
        p.data.zero_()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sd = {k: v for k, v in model.state_dict().items() if k in stored}
    # One column-sharded (tensor-parallel style) weight too: a range per row.
    wpe = torch.zeros_like(stored["transformer.wpe.weight"])
    sd["transformer.wpe.weight"] = distribute_tensor(wpe, mesh, [Shard(1)])
    reads: list[tuple[str, int, int]] = []
    _recording(reads)
    dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(path))
    local_bytes = {
        k: v.to_local().numel() * v.element_size() for k, v in sd.items() if isinstance(v, DTensor)
    }
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in sd.items()}
    return {"full": full, "reads": reads, "local_bytes": local_bytes}


@pytest.mark.parametrize("world", [2, 3])
def test_transformers_folder_into_fsdp2_reading_only_each_ranks_bytes(
    tmp_path: Path, world: int
) -> None:
    folder = tmp_path / "hf"
    _gpt2().save_pretrained(folder, max_shard_size="40KB")
    stored = _folder_tensors(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    results = run_ranks(world, _load_fsdp, tmp_path, str(folder), timeout=240)
    backend = LocalBackend(str(folder))
    headers = read_folder(backend).headers
    backend.close()
    for rank, res in enumerate(results):
        for k, v in res["full"].items():
            assert v.dtype == stored[k].dtype and torch.equal(v, stored[k]), (rank, k)
        data = [(n, o, ln) for n, o, ln in res["reads"] if o >= headers[n].data_start]
        meta = [r for r in res["reads"] if r not in data]
        # Headers are read once, on rank 0: a length and a JSON per file.
        assert len(meta) == (2 * len(headers) if rank == 0 else 0)
        # Tensor bytes: exactly this rank's shards, never a whole file or tensor it half needs.
        assert sum(ln for _, _, ln in data) == sum(res["local_bytes"].values())
        rows = stored["transformer.wpe.weight"].shape[0]
        assert all(ln <= max(res["local_bytes"].values()) for _, _, ln in data)
        # The column-sharded weight: one range per row, each this rank's columns.
        my_cols = res["local_bytes"]["transformer.wpe.weight"] // (rows * 4)
        wpe_file = next(n for n, h in headers.items() if "transformer.wpe.weight" in h.entries)
        e = headers[wpe_file].entries["transformer.wpe.weight"]
        wpe_reads = [r for r in data if r[0] == wpe_file and e.start <= r[1] < e.stop]
        assert len(wpe_reads) == rows and all(ln == my_cols * 4 for _, _, ln in wpe_reads)


def _save_distributed(rank: int, world: int, out: str, mode: str) -> dict[str, Any]:
    import treeckpt.dcp as dcp
    from treeckpt.dcp._consolidate_hf_safetensors import (
        consolidate_safetensors_files_on_every_rank,
    )

    full = {k: v for k, v in _gpt2().state_dict().items() if k != "lm_head.weight"}
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    sd = {
        k: distribute_tensor(v, mesh, [Shard(i % v.dim())]) for i, (k, v) in enumerate(full.items())
    }
    mapping = {k: 1 + i % 3 for i, k in enumerate(full)}
    reads: list[tuple[str, int, int]] = []
    _recording(reads)
    if mode == "writer":
        dcp.save(
            sd,
            storage_writer=dcp.HuggingFaceStorageWriter(
                out, fqn_to_index_mapping=mapping, save_distributed=True, enable_consolidation=True
            ),
        )
    else:  # torchtitan's: pieces under sharded/, then consolidation on every rank
        dcp.save(
            sd,
            storage_writer=dcp.HuggingFaceStorageWriter(
                f"{out}/sharded", fqn_to_index_mapping=mapping, save_distributed=True
            ),
        )
        consolidate_safetensors_files_on_every_rank(
            input_dir=f"{out}/sharded", output_dir=out, fqn_to_index_mapping=mapping, num_threads=2
        )
    return {"reads": sorted({n for n, _, _ in reads if n.startswith("shard-")})}


@pytest.mark.parametrize("mode", ["writer", "torchtitan"])
def test_consolidation_on_2_ranks_matches_a_single_process_save(tmp_path: Path, mode: str) -> None:
    import treeckpt.dcp as dcp

    full = {k: v for k, v in _gpt2().state_dict().items() if k != "lm_head.weight"}
    mapping = {k: 1 + i % 3 for i, k in enumerate(full)}
    single = tmp_path / "single"
    dcp.save(
        full,
        storage_writer=dcp.HuggingFaceStorageWriter(str(single), fqn_to_index_mapping=mapping),
        no_dist=True,
    )
    out = tmp_path / "out"
    results = run_ranks(2, _save_distributed, tmp_path, str(out), mode, timeout=240)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for name in names:
        want, got = load_file(single / name), load_file(out / name)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (name, k)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((single / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in (out / "sharded").iterdir()) == [
        f"shard-0000{r}-model-0000{i}-of-00003.safetensors" for r in (1, 2) for i in (1, 2, 3)
    ]
    # Both ranks took part in assembling the output files.
    assert all(res["reads"] for res in results)


def _whole_on_every_rank(rank: int, world: int, out: str) -> str:
    import treeckpt.dcp as dcp
    from treeckpt.dcp import CheckpointException

    sd = {"a": torch.full((4,), float(rank)), "b": torch.ones(3)}
    try:
        dcp.save(sd, storage_writer=dcp.HuggingFaceStorageWriter(out))
    except CheckpointException as exc:
        return str(exc)
    return "saved"


def test_whole_tensor_layout_refuses_two_ranks_writing_one_file(tmp_path: Path) -> None:
    msgs = run_ranks(2, _whole_on_every_rank, tmp_path, str(tmp_path / "out"), timeout=120)
    for msg in msgs:
        assert "model-00001-of-00001.safetensors would be written by ranks 0, 1" in msg
    assert not (tmp_path / "out" / "model-00001-of-00001.safetensors").exists()

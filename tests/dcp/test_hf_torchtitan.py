"""torchtitan's own checkpointer code (``CheckpointManager.dcp_load`` / ``dcp_save`` with
Hugging Face conversion) run on 2 gloo ranks with treeckpt.dcp in place of
torch.distributed.checkpoint: the names it imports are replaced, its code runs unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.dist_utils import run_ranks

pytestmark = pytest.mark.distributed


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    )


def _use_treeckpt() -> None:
    """torchtitan's checkpointer, with treeckpt.dcp where it imports torch's DCP names."""
    import torchtitan.components.checkpointer.dcp as titan
    import torchtitan.protocols.state_dict_adapter as adapters

    import treeckpt.dcp as dcp
    from treeckpt.dcp._consolidate_hf_safetensors import (
        consolidate_safetensors_files_on_every_rank,
    )

    titan.dcp = dcp  # type: ignore[attr-defined]
    titan.HuggingFaceStorageWriter = dcp.HuggingFaceStorageWriter  # type: ignore[attr-defined,misc]
    titan.consolidate_safetensors_files_on_every_rank = consolidate_safetensors_files_on_every_rank  # type: ignore[attr-defined]
    adapters.HuggingFaceStorageReader = dcp.HuggingFaceStorageReader  # type: ignore[attr-defined,misc]


def _round_trip(rank: int, world: int, assets: str, out: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpointer.dcp import AsyncMode, CheckpointManager
    from torchtitan.protocols.state_dict_adapter import StateDictAdapter

    _use_treeckpt()

    class Identity(StateDictAdapter):
        def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            assert self.fqn_to_index_mapping is not None
            return {k: v for k, v in state_dict.items() if k in self.fqn_to_index_mapping}

        def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
            return hf_state_dict

    model = _gpt2()
    for p in model.parameters():
        p.data.zero_()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    adapter = Identity(None, assets)  # type: ignore[arg-type]
    wrapper = SimpleNamespace(load_state_dict=lambda sd: model.load_state_dict(sd, strict=False))
    manager = SimpleNamespace(sd_adapter=adapter, states={"model": wrapper}, pg=None)
    CheckpointManager.dcp_load(
        manager,  # type: ignore[arg-type]
        model.state_dict(),
        checkpoint_id=assets,
        from_hf=True,
        from_quantized=False,
    )
    loaded = {k: v.full_tensor() for k, v in model.state_dict().items()}
    CheckpointManager.dcp_save(
        manager,  # type: ignore[arg-type]
        model.state_dict(),
        checkpoint_id=out,
        async_mode=AsyncMode.DISABLED,
        to_hf=True,
    )
    return loaded


def test_torchtitan_loads_a_hub_folder_and_saves_it_back_consolidated(tmp_path: Path) -> None:
    assets, out = tmp_path / "assets", tmp_path / "out"
    _gpt2().save_pretrained(assets, max_shard_size="40KB")
    index = json.loads((assets / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    results = run_ranks(2, _round_trip, tmp_path, str(assets), str(out), timeout=300)
    for f in files:
        want, got = load_file(assets / f), load_file(out / f)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (f, k)
            for loaded in results:
                assert torch.equal(loaded[k], v), k
    again = json.loads((out / "model.safetensors.index.json").read_text())
    assert again["weight_map"] == index["weight_map"]
    assert again["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for f in files for t in load_file(assets / f).values()
    )

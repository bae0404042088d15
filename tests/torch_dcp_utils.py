"""Checkpoints torch's own DCP writes, for the tests of the reader and of the facade.

``dcp_save_fsdp`` runs on each of several ranks (``tests.dist_utils.run_ranks``):
torch's ``dcp.save`` of an FSDP2 bf16 model, its optimizer, a column-sharded
DTensor and plain values; the ``fsdp_dcp_ckpt`` fixture (``tests/conftest.py``)
writes it once per session, raw and with torch's zstd extension.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as tdcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from treeckpt.dcp.state_dict import get_state_dict


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    return m.to(torch.bfloat16)


def full_of(v: Any) -> Any:
    if isinstance(v, DTensor):
        return v.full_tensor()
    if isinstance(v, dict):
        return {k: full_of(x) for k, x in v.items()}
    if isinstance(v, list):
        return [full_of(x) for x in v]
    return v.clone() if isinstance(v, torch.Tensor) else v


def model_mesh(world: int) -> Any:
    return init_device_mesh("cpu", (world,))


def fsdp_of(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def dcp_save_fsdp(rank: int, world: int, path: str, zstd: bool) -> Any:
    """torch's DCP saves an FSDP2 bf16 model, nested FQN-keyed optimizer state, bytes and values."""
    model = fsdp_of(make_model(), world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    model(torch.randn(4, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    torch.manual_seed(2)
    cols = distribute_tensor(torch.randn(5, 7, dtype=torch.float64), model_mesh(world), [Shard(1)])
    state = {
        "model": msd,
        "optim": osd,
        "cols": cols,  # uneven column shards: 4 + 3
        "extra": {"step": 7, "blob": b"\x00\xffbytes", "names": ["a", "b"], "loss": 0.25},
    }
    writer = tdcp.FileSystemWriter(path, _extensions=[ZStandard()] if zstd else None)
    tdcp.save(state, storage_writer=writer)
    return full_of(state)


def flat_of(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
            out.update(flat_of(v, key + "."))
        else:
            out[key] = v
    return out

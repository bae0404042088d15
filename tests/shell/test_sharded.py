"""shell/sharded.py and core/adapter.py: the tensor adapters and their one tuple."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import treeckpt
from tests.dist_utils import run_ranks
from treeckpt.core.adapter import PLAIN_TENSOR, Copy, GlobalTensor, TensorAdapter, adapter_for
from treeckpt.core.box import Box
from treeckpt.core.leaves import TensorLeaf
from treeckpt.core.tree import describe_leaf, flatten_tree
from treeckpt.dcp._shards import ShardSet
from treeckpt.dcp.staging import stage_state_dict
from treeckpt.errors import RankFailureError, UnsupportedLeafError
from treeckpt.shell.sharded import (
    ADAPTERS,
    DTensorAdapter,
    ExplicitShards,
    ShardedTensorAdapter,
    adapter_of,
)
from treeckpt.shell.tensors import local_shards


def test_adapters_are_one_immutable_tuple_with_the_plain_fallback_last() -> None:
    assert isinstance(ADAPTERS, tuple)
    assert [type(a) for a in ADAPTERS] == [
        ExplicitShards,
        DTensorAdapter,
        ShardedTensorAdapter,
        type(PLAIN_TENSOR),
    ]
    assert adapter_of(torch.zeros(2)) is PLAIN_TENSOR
    assert adapter_of(torch.nn.Parameter(torch.zeros(2))) is PLAIN_TENSOR
    assert adapter_of(np.zeros(2)) is None
    assert adapter_of({"a": 1}) is None


def test_explicit_shards_hook() -> None:
    left, right = torch.arange(6.0).view(2, 3), torch.arange(6.0, 12.0).view(2, 3)
    obj = ShardSet((4, 3), torch.float32, [((0, 0), (2, 3), left), ((2, 0), (2, 3), right)])
    assert isinstance(adapter_of(obj), ExplicitShards)
    rec = describe_leaf("x", obj, adapters=ADAPTERS)
    assert isinstance(rec, TensorLeaf) and rec.shape == (4, 3) and rec.dtype == "float32"
    spec, pairs = local_shards("x", obj, rec)
    assert spec.boxes == (Box(offsets=(0, 0), sizes=(2, 3)), Box(offsets=(2, 0), sizes=(2, 3)))
    assert pairs[0][1] is left and pairs[1][1] is right
    assert stage_state_dict({"x": obj})["x"] is obj  # saved from the original


class _Chunk(SimpleNamespace):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class _TwoChunkDTensor:
    """Stands for a DTensor whose local tensor holds two regions of the global tensor."""

    placements = ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
    _local_tensor = torch.zeros(4, 2)

    def __create_chunk_list__(self) -> list[_Chunk]:
        return [_Chunk(offsets=(0, 0), sizes=(2, 2)), _Chunk(offsets=(4, 0), sizes=(2, 2))]

    def to_local(self) -> torch.Tensor:
        return self._local_tensor


def test_dtensor_with_several_local_chunks_is_refused_naming_the_fqn() -> None:
    with pytest.raises(UnsupportedLeafError, match=r"'model\.w'.* 2 regions"):
        DTensorAdapter().local_shards("model.w", _TwoChunkDTensor())


def _save_two_chunk_dtensor(rank: int, world: int, path: str) -> str:
    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(16.0).view(8, 2), mesh, [Shard(0)])
    (box,) = w.__create_chunk_list__()
    half = box.sizes[0] // 2
    first = SimpleNamespace(offsets=box.offsets, sizes=torch.Size([half, 2]))
    second = SimpleNamespace(offsets=torch.Size([box.offsets[0] + half, 0]), sizes=first.sizes)
    # What __create_chunk_list__ gives when the local tensor is itself sharded.
    w.__create_chunk_list__ = lambda: [first, second]  # type: ignore[method-assign]
    try:
        treeckpt.save({"model": {"w": w}, "step": 1}, path)
    except RankFailureError as exc:
        return str(exc)
    return "saved"


@pytest.mark.distributed
def test_dtensor_with_several_local_chunks_refused_at_save_on_2_ranks(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    messages = run_ranks(2, _save_two_chunk_dtensor, tmp_path, path)
    for msg in messages:
        assert msg.startswith("describe failed on rank(s) 0, 1")
        assert "'model.w'" in msg and "2 regions" in msg
    assert not os.path.exists(os.path.join(path, "manifest.json"))  # nothing committed


class _Blocks:
    """A sharded type of a user's own (not a torch.Tensor): rows held as blocks."""

    def __init__(self, rows: int, blocks: dict[int, torch.Tensor]) -> None:
        self.rows, self.blocks = rows, blocks


class _BlocksAdapter:
    def matches(self, obj: Any) -> bool:
        return isinstance(obj, _Blocks)

    def describe(self, fqn: str, obj: Any) -> GlobalTensor:
        width = next(iter(obj.blocks.values())).shape[1]
        return GlobalTensor(dtype=torch.float32, shape=(obj.rows, width))

    def local_shards(self, fqn: str, obj: Any) -> list[tuple[Box, Any]]:
        return [
            (Box(offsets=(start, 0), sizes=tuple(t.shape)), t)
            for start, t in sorted(obj.blocks.items())
        ]

    def stage(self, obj: Any, copy: Copy) -> Any:
        return _Blocks(obj.rows, {k: copy(t) for k, t in obj.blocks.items()})


def test_a_new_type_needs_only_an_adapter() -> None:
    adapter: TensorAdapter = _BlocksAdapter()
    obj = _Blocks(6, {0: torch.ones(2, 3), 4: torch.zeros(2, 3)})
    assert adapter_for(obj, (adapter, *ADAPTERS)) is adapter
    flat = flatten_tree({"emb": obj}, adapters=(adapter, *ADAPTERS))
    assert flat.records["emb"] == TensorLeaf(lib="torch", dtype="float32", shape=(6, 3))
    # Without its adapter the object is not a tensor.
    with pytest.raises(UnsupportedLeafError, match="'emb'"):
        flatten_tree({"emb": obj}, adapters=ADAPTERS)

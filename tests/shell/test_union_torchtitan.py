"""torchtitan's data loader resumes exactly on every rank through treeckpt.

torchtitan's ``ParallelAwareDataloader`` (a torchdata ``StatefulDataLoader``)
saves its state under ``dp_rank_<r>`` on rank r: a key that exists on one
rank only. Each rank must get its own position back and continue with
exactly the batches an uninterrupted run gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchtitan.components.dataloader as dataloader
from torch.utils.data import Dataset, DistributedSampler, IterableDataset

import treeckpt
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.distributed

SEEN, NEXT = 3, 4  # batches drawn before the save, and compared after it


class _Tokens(IterableDataset[dict[str, Any]]):
    """Like torchtitan's text datasets: sharded by data-parallel rank, with its own state."""

    def __init__(self, dp_rank: int, dp_world: int) -> None:
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._sample_idx = 0

    def __iter__(self) -> Any:
        while True:
            i = self._sample_idx * self.dp_world + self.dp_rank
            self._sample_idx += 1
            yield {"input": torch.arange(i, i + 5) % 97, "label": torch.tensor(i)}

    def state_dict(self) -> dict[str, Any]:
        return {"sample_idx": self._sample_idx}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sample_idx = state["sample_idx"]


class _Samples(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, i * i])


def _loader(kind: str, rank: int, world: int) -> Any:
    if kind == "iterable":
        return dataloader.ParallelAwareDataloader(
            _Tokens(rank, world), dp_rank=rank, dp_world_size=world, batch_size=2
        )
    sampler = DistributedSampler(_Samples(), num_replicas=world, rank=rank, shuffle=True, seed=5)
    return dataloader.ParallelAwareDataloader(
        _Samples(), dp_rank=rank, dp_world_size=world, batch_size=3, sampler=sampler
    )


def _run(rank: int, world: int, path: str, kind: str, phase: str) -> list[Any]:
    loader = _loader(kind, rank, world)
    model = torch.nn.Linear(2, 2)
    if phase == "save":
        it = iter(loader)
        for _ in range(SEEN):
            next(it)
        treeckpt.save({"model": model, "dataloader": loader, "step": SEEN}, path)
        return [next(it) for _ in range(NEXT)]  # the uninterrupted run
    out = treeckpt.load({"model": model, "dataloader": loader, "step": 0}, path)
    assert out["step"] == SEEN
    it = iter(loader)
    return [next(it) for _ in range(NEXT)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(torch.equal(a, b))


@pytest.mark.parametrize("kind", ["iterable", "map"])
def test_each_rank_resumes_its_own_batches(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "ckpt")
    expected = run_ranks(2, _run, tmp_path, path, kind, "save")
    assert not _same(expected[0][0], expected[1][0])  # the ranks read different data
    got = run_ranks(2, _run, tmp_path, path, kind, "load")
    for rank in (0, 1):
        assert len(got[rank]) == NEXT
        for a, b in zip(got[rank], expected[rank], strict=True):
            assert _same(a, b), (rank, a, b)
    back = treeckpt.restore(path)
    assert sorted(back["dataloader"]) == ["dp_rank_0", "dp_rank_1", "world_size"]


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata's
def test_a_restart_on_fewer_ranks_is_torchtitans_own_decision(tmp_path: Path) -> None:
    # Inside a Stateful the checkpoint's whole subtree is handed to
    # load_state_dict (every rank's key included); torchtitan refuses to reshard.
    path = str(tmp_path / "ckpt")
    run_ranks(2, _run, tmp_path, path, "iterable", "save")
    template = {"model": torch.nn.Linear(2, 2), "dataloader": _loader("iterable", 0, 1), "step": 0}
    with pytest.raises(
        treeckpt.RankFailureError,
        match=r"^load failed on rank\(s\) 0: rank 0: AssertionError: dp_degree is inconsistent "
        r"before and after checkpoint, dataloader resharding is not supported yet\.$",
    ):
        treeckpt.load(template, path)

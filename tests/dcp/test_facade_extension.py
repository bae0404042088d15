"""DCP's extension points run through ``treeckpt.dcp.save`` / ``load`` with DCP's
documented call sequence: a storage plugin to memory, planners that rename keys
or load a subset."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.futures import Future

import treeckpt
import treeckpt.dcp as dcp
from treeckpt.dcp.metadata import Metadata, MetadataIndex, StorageMeta
from treeckpt.dcp.planner import LoadItemType, LoadPlan, ReadItem, SavePlan, WriteItemType
from treeckpt.dcp.storage import WriteResult


class MemoryWriter(dcp.StorageWriter):
    """A storage plugin as a user writes it for DCP: everything kept in a dict."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store
        self.calls: list[str] = []

    def reset(self, checkpoint_id: Any = None) -> None:
        self.calls.append("reset")

    def set_up_storage_writer(self, is_coordinator: bool) -> None:
        self.calls.append("set_up_storage_writer")

    def storage_meta(self) -> StorageMeta | None:
        self.calls.append("storage_meta")
        return StorageMeta(checkpoint_id="memory")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.calls.append("prepare_local_plan")
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.calls.append("prepare_global_plan")
        return plans

    def write_data(self, plan: SavePlan, planner: dcp.SavePlanner) -> Future[list[WriteResult]]:
        self.calls.append("write_data")
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = f"{item.index.fqn}@{list(item.index.offset or [])}"
            if item.type == WriteItemType.BYTE_IO:
                assert isinstance(data, io.BytesIO)
                self.store[key] = data.getvalue()
            else:
                self.store[key] = data.detach().clone()
            results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=key))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.calls.append("finish")
        storage = {r.index: r.storage_data for rs in results for r in rs}
        metadata.storage_data = storage
        self.store["__metadata__"] = metadata

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class MemoryReader(dcp.StorageReader):
    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store
        self.calls: list[str] = []

    def reset(self, checkpoint_id: Any = None) -> None:
        self.calls.append("reset")

    def read_metadata(self) -> Metadata:
        self.calls.append("read_metadata")
        md = self.store["__metadata__"]
        assert isinstance(md, Metadata)
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool) -> None:
        self.calls.append("set_up_storage_reader")
        self.keys = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        self.calls.append("prepare_local_plan")
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        self.calls.append("prepare_global_plan")
        return plans

    def read_data(self, plan: LoadPlan, planner: dcp.LoadPlanner) -> Future[None]:
        self.calls.append("read_data")
        for item in plan.items:
            stored = self.store[self.keys[item.storage_index]]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(stored))
                continue
            src = stored
            for d, (o, n) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                src = src.narrow(d, o, n)
            target = planner.resolve_tensor(item)
            target.copy_(src)
            planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": {"w": torch.randn(4, 3), "b": torch.randn(3)}, "step": 5, "tags": ["a", "b"]}


def test_memory_storage_plugin_round_trip_with_dcps_call_sequence() -> None:
    store: dict[str, Any] = {}
    writer = MemoryWriter(store)
    state = _state()
    md = dcp.save(state, storage_writer=writer)
    assert writer.calls == [
        "storage_meta",
        "set_up_storage_writer",
        "prepare_local_plan",
        "prepare_global_plan",
        "write_data",
        "finish",
    ]
    assert md.state_dict_metadata["model.w"].size == torch.Size([4, 3])
    # Non-tensor values travel as torch.save bytes, as DCP plugins expect.
    assert torch.load(io.BytesIO(store["step@[]"]), weights_only=True) == 5

    reader = MemoryReader(store)
    target = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}, "step": 0, "tags": []}
    dcp.load(target, storage_reader=reader)
    assert reader.calls == [
        "read_metadata",
        "set_up_storage_reader",
        "prepare_local_plan",
        "prepare_global_plan",
        "read_data",
    ]
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(target["model"]["b"], state["model"]["b"])
    assert target["step"] == 5 and target["tags"] == ["a", "b"]


class Custom:
    """Any class: torch.save pickles it; a weights_only load refuses it."""


def test_plugin_values_that_need_pickle_are_refused_on_load() -> None:
    store: dict[str, Any] = {}
    dcp.save({"obj": Custom(), "w": torch.ones(1)}, storage_writer=MemoryWriter(store))
    with pytest.raises(dcp.CheckpointException, match=r"obj.*weights_only"):
        dcp.load({"obj": None, "w": torch.zeros(1)}, storage_reader=MemoryReader(store))


class RenamingSavePlanner(dcp.DefaultSavePlanner):
    """Store every key under a new prefix (a documented use of a planner subclass)."""

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        renamed = {f"v2.{k}": v for k, v in state_dict.items()}
        super().set_up_planner(renamed, storage_meta, is_coordinator)


class RenamingLoadPlanner(dcp.DefaultLoadPlanner):
    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        self.outer = state_dict
        super().set_up_planner({"v2": state_dict}, metadata, is_coordinator)


def test_renaming_planner_with_treeckpt_storage(tmp_ckpt: str) -> None:
    state = _state()
    md = dcp.save(state, checkpoint_id=tmp_ckpt, planner=RenamingSavePlanner())
    assert set(md.state_dict_metadata) == {"v2.model.w", "v2.model.b", "v2.step", "v2.tags"}
    info = treeckpt.metadata(tmp_ckpt)  # treeckpt's format, with the planner's names
    assert set(info.tensors) == {"v2.model.w", "v2.model.b"}

    target = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}, "step": 0, "tags": []}
    dcp.load(target, checkpoint_id=tmp_ckpt, planner=RenamingLoadPlanner())
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert target["step"] == 5 and target["tags"] == ["a", "b"]

    # The default load planner sees the renamed keys too.
    plain = {"v2": {"model": {"w": torch.zeros(4, 3)}}}
    dcp.load(plain, checkpoint_id=tmp_ckpt)
    assert torch.equal(plain["v2"]["model"]["w"], state["model"]["w"])


class SubsetLoadPlanner(dcp.DefaultLoadPlanner):
    """Load only the keys under ``prefix``, leaving the rest of the state dict alone."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        items = [i for i in plan.items if i.dest_index.fqn.startswith(self.prefix)]
        return LoadPlan(items)


def test_subset_planner_with_treeckpt_storage(tmp_ckpt: str) -> None:
    state = _state()
    dcp.save(state, checkpoint_id=tmp_ckpt)
    target = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}, "step": 0, "tags": []}
    dcp.load(target, checkpoint_id=tmp_ckpt, planner=SubsetLoadPlanner("model.w"))
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(target["model"]["b"], torch.zeros(3))
    assert target["step"] == 0


def test_load_planner_never_casts_with_loss(tmp_ckpt: str) -> None:
    dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_ckpt)
    with pytest.raises(dcp.CheckpointException, match=r"w.*float16"):
        dcp.load(
            {"w": torch.zeros(2, dtype=torch.float16)},
            checkpoint_id=tmp_ckpt,
            planner=SubsetLoadPlanner(""),
        )


def test_planner_error_reaches_the_caller_as_checkpoint_exception(tmp_ckpt: str) -> None:
    class Broken(dcp.DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            raise RuntimeError("planner exploded")

    with pytest.raises(dcp.CheckpointException, match="planner exploded"):
        dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_ckpt, planner=Broken())
    with pytest.raises(treeckpt.CheckpointNotFoundError):
        treeckpt.metadata(tmp_ckpt)  # nothing committed


def test_read_items_name_chunks_of_the_stored_metadata(tmp_ckpt: str) -> None:
    dcp.save({"w": torch.arange(12.0).reshape(4, 3)}, checkpoint_id=tmp_ckpt)
    md = dcp.FileSystemReader(tmp_ckpt).read_metadata()
    planner = dcp.DefaultLoadPlanner()
    planner.set_up_planner({"w": torch.zeros(4, 3)}, md, True)
    plan = planner.create_local_plan()
    assert all(isinstance(i, ReadItem) for i in plan.items)
    assert sum(i.lengths.numel() for i in plan.items) == 12
    assert {i.storage_index.fqn for i in plan.items} == {"w"}
    assert all(isinstance(i.dest_index, MetadataIndex) for i in plan.items)


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_torch_written_directory_is_read_without_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FileSystemReader reads a directory torch's DCP wrote through the pickle-free reader,
    with DCP's planners (treeckpt's and torch's own), and refuses a value that needs pickle."""
    import torch.distributed.checkpoint as torch_dcp

    path = str(tmp_path / "torch-written")
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": 4, "names": ["a", "b"]}
    torch_dcp.save(state, checkpoint_id=path, no_dist=True)
    reader = dcp.FileSystemReader(path)
    md = reader.read_metadata()
    assert set(md.state_dict_metadata) == {"w", "n", "names"}
    for planner in (None, torch_dcp.DefaultLoadPlanner()):
        out = {"w": torch.zeros(2, 3), "n": 0, "names": []}
        dcp.load(out, storage_reader=dcp.FileSystemReader(path), planner=planner)
        assert torch.equal(out["w"], state["w"]) and out["n"] == 4 and out["names"] == ["a", "b"]

    evil = str(tmp_path / "evil")
    torch_dcp.save({"w": torch.ones(2), "obj": _Evil()}, checkpoint_id=evil, no_dist=True)
    ran: list[Any] = []
    monkeypatch.setattr("posix.system", lambda *a: ran.append(a) or 0)  # what the pickle names
    with pytest.raises(
        dcp.CheckpointException, match=r"__0_0\.distcp: 'obj' holds an object that needs pickle"
    ):
        dcp.load({"w": torch.zeros(2), "obj": None}, checkpoint_id=evil)
    assert not ran


class _PlannerPath(dcp.DefaultSavePlanner):
    """A planner subclass: the save takes DCP's planner path."""


@pytest.mark.parametrize("save_path", ["treeckpt", "planner"])
@pytest.mark.parametrize("load_path", ["treeckpt", "planner"])
def test_scalars_empty_tensors_and_dtypes_through_both_paths(
    tmp_ckpt: str, save_path: str, load_path: str
) -> None:
    torch.manual_seed(0)
    state = {
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "int16": torch.arange(4, dtype=torch.int16),
        "bool": torch.tensor([True, False]),
        "bf16": torch.randn(3).bfloat16(),
    }
    dcp.save(
        state, checkpoint_id=tmp_ckpt, planner=_PlannerPath() if save_path == "planner" else None
    )
    out = {k: torch.ones_like(v) for k, v in state.items()}
    planner = SubsetLoadPlanner("") if load_path == "planner" else None
    dcp.load(out, checkpoint_id=tmp_ckpt, planner=planner)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_planner_written_before_storage_meta_still_runs(tmp_ckpt: str) -> None:
    class Legacy(dcp.DefaultSavePlanner):
        def set_up_planner(self, state_dict: Any, is_coordinator: bool) -> None:  # type: ignore[override]
            super().set_up_planner(state_dict, None, is_coordinator)

    with pytest.warns(UserWarning, match="storage_meta"):
        dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_ckpt, planner=Legacy())
    out = {"w": torch.zeros(2)}
    dcp.load(out, checkpoint_id=tmp_ckpt)
    assert torch.equal(out["w"], torch.ones(2))


def test_stateful_through_the_planner_path(tmp_ckpt: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    dcp.save({"model": model, "optim": opt}, checkpoint_id=tmp_ckpt, planner=_PlannerPath())
    torch.manual_seed(1)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    model2(torch.randn(4, 3)).sum().backward()
    opt2.step()  # momentum buffers exist, with other values
    dcp.load(
        {"model": model2, "optim": opt2}, checkpoint_id=tmp_ckpt, planner=SubsetLoadPlanner("")
    )
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    assert opt2.param_groups[0]["lr"] == 0.25
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(opt2.state[p2]["momentum_buffer"], opt.state[p]["momentum_buffer"])

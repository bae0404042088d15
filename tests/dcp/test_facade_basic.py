"""``import treeckpt.dcp as dcp`` in one process: save, load, Stateful, the
default planners' options, FileSystemWriter/Reader parameters, errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp

import treeckpt
import treeckpt.dcp as dcp
from treeckpt.dcp.default_planner import DefaultSavePlanner
from treeckpt.dcp.planner import SavePlan


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.5)


def test_save_load_state_dicts_values_in_place(tmp_ckpt: str) -> None:
    model, _ = _trained()
    sd = {"model": model.state_dict(), "step": 7, "extra": {"name": "run", "lrs": [0.1, 0.2]}}
    md = dcp.save(sd, checkpoint_id=tmp_ckpt)
    assert isinstance(md, dcp.Metadata)
    assert md.state_dict_metadata["model.0.weight"].size == torch.Size([8, 4])
    # treeckpt's format underneath: a committed manifest, readable by treeckpt itself.
    assert os.path.exists(os.path.join(tmp_ckpt, "manifest.json"))
    with open(os.path.join(tmp_ckpt, ".metadata"), "rb") as f:  # the marker, not DCP's pickle
        assert f.read().startswith(b"cbuiltins\ntreeckpt checkpoint")
    assert treeckpt.restore(tmp_ckpt)["step"] == 7

    other, _ = _fresh()
    sd2 = {"model": other.state_dict(), "step": 0, "extra": {"name": "", "lrs": [0.0, 0.0]}}
    dcp.load(sd2, checkpoint_id=tmp_ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert sd2["step"] == 7
    assert sd2["extra"] == {"name": "run", "lrs": [0.1, 0.2]}


def test_stateful_model_and_optimizer(tmp_ckpt: str) -> None:
    class App(dcp.Stateful):
        def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
            self.model, self.opt = model, opt

        def state_dict(self) -> dict[str, object]:
            return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

        def load_state_dict(self, state_dict: dict[str, object]) -> None:
            self.model.load_state_dict(state_dict["model"])  # type: ignore[arg-type]
            self.opt.load_state_dict(state_dict["optim"])  # type: ignore[arg-type]

    model, opt = _trained()
    dcp.save({"app": App(model, opt)}, checkpoint_id=tmp_ckpt)
    model2, opt2 = _fresh()
    dcp.load({"app": App(model2, opt2)}, checkpoint_id=tmp_ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 0.1
    for pid, st in s1["state"].items():
        for name, v in st.items():
            assert torch.equal(s2["state"][pid][name], v), (pid, name)


def test_missing_key_is_an_error_unless_partial_load(tmp_ckpt: str) -> None:
    dcp.save({"a": torch.ones(2)}, checkpoint_id=tmp_ckpt)
    target = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(dcp.CheckpointException, match=r"missing from checkpoint.*b") as info:
        dcp.load(target, checkpoint_id=tmp_ckpt)
    assert "allow_partial_load=True" in str(info.value)
    assert "strict=False" not in str(info.value)
    assert torch.equal(target["a"], torch.zeros(2))  # nothing changed
    dcp.load(
        target, checkpoint_id=tmp_ckpt, planner=dcp.DefaultLoadPlanner(allow_partial_load=True)
    )
    assert torch.equal(target["a"], torch.ones(2))
    assert torch.equal(target["b"], torch.zeros(3))


def test_subset_load_reports_keys_the_state_dict_lacks(
    tmp_ckpt: str, caplog: pytest.LogCaptureFixture
) -> None:
    dcp.save(
        {"model": {"w": torch.arange(4.0)}, "optim": {"m": torch.ones(4)}}, checkpoint_id=tmp_ckpt
    )
    only_model = {"model": {"w": torch.zeros(4)}}
    with caplog.at_level(logging.INFO, logger="treeckpt.dcp"):
        dcp.load(only_model, checkpoint_id=tmp_ckpt)
    assert torch.equal(only_model["model"]["w"], torch.arange(4.0))
    assert "optim.m" in caplog.text and "not loaded" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="treeckpt.dcp"):
        dcp.load(only_model, checkpoint_id=tmp_ckpt, planner=SubsetPlanner())
    assert "optim.m" in caplog.text


class SubsetPlanner(dcp.DefaultLoadPlanner):
    """A planner subclass: the load takes DCP's planner path."""


def test_dtype_and_shape_mismatches_are_errors_naming_the_key(tmp_ckpt: str) -> None:
    dcp.save({"w": torch.ones(2, 3)}, checkpoint_id=tmp_ckpt)
    bf16 = {"w": torch.zeros(2, 3, dtype=torch.bfloat16)}
    with pytest.raises(dcp.CheckpointException, match=r"w .*bfloat16.*float32") as info:
        dcp.load(bf16, checkpoint_id=tmp_ckpt)
    assert isinstance(info.value, treeckpt.CheckpointError)
    assert isinstance(info.value, torch_dcp.CheckpointException)
    assert isinstance(info.value.__cause__, treeckpt.LoadMismatchError)
    assert 0 in info.value.failures
    with pytest.raises(dcp.CheckpointException, match=r"w .*\[3, 2\]"):
        dcp.load({"w": torch.zeros(3, 2)}, checkpoint_id=tmp_ckpt)
    assert torch.equal(bf16["w"], torch.zeros(2, 3, dtype=torch.bfloat16))


def test_missing_checkpoint_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(dcp.CheckpointException, match="CheckpointNotFoundError") as info:
        dcp.load({"a": torch.zeros(1)}, checkpoint_id=str(tmp_path / "nothing"))
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_save_needs_a_checkpoint_id_or_writer() -> None:
    with pytest.raises(treeckpt.CheckpointError, match="checkpoint_id"):
        dcp.save({"a": torch.zeros(1)})


def test_overwrite_false_refuses_an_existing_checkpoint(tmp_ckpt: str) -> None:
    dcp.save({"a": torch.ones(2)}, checkpoint_id=tmp_ckpt)
    writer = dcp.FileSystemWriter(tmp_ckpt, overwrite=False)
    with pytest.raises(dcp.CheckpointException, match="overwrite=False"):
        dcp.save({"a": torch.zeros(2)}, storage_writer=writer)
    out = {"a": torch.zeros(2)}
    dcp.load(out, checkpoint_id=tmp_ckpt)
    assert torch.equal(out["a"], torch.ones(2))
    # overwrite=True (the default) replaces it atomically.
    dcp.save({"a": torch.full((2,), 3.0)}, storage_writer=dcp.FileSystemWriter(tmp_ckpt))
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_ckpt))
    assert torch.equal(out["a"], torch.full((2,), 3.0))


def test_filesystem_writer_parameters(tmp_ckpt: str) -> None:
    writer = dcp.FileSystemWriter(
        tmp_ckpt,
        single_file_per_rank=False,
        sync_files=False,
        thread_count=3,
        per_thread_copy_ahead=1,
    )
    assert writer.options.io_threads == 3 and writer.options.sync is False
    big = {f"t{i}": torch.randn(64) for i in range(6)}
    dcp.save(big, storage_writer=writer)
    out = {k: torch.zeros(64) for k in big}
    dcp.load(out, checkpoint_id=tmp_ckpt)
    for k in big:
        assert torch.equal(out[k], big[k])


def test_checkpoint_id_is_an_fsspec_url() -> None:
    url = "memory://treeckpt-dcp-facade/ckpt"
    dcp.save({"a": torch.arange(5)}, checkpoint_id=url)
    out = {"a": torch.zeros(5, dtype=torch.int64)}
    dcp.load(out, checkpoint_id=url)
    assert torch.equal(out["a"], torch.arange(5))


def test_checkpoint_id_resets_a_given_writer_and_reader(tmp_path: Path) -> None:
    writer = dcp.FileSystemWriter(tmp_path / "first")
    dcp.save({"a": torch.ones(1)}, storage_writer=writer, checkpoint_id=tmp_path / "second")
    assert (tmp_path / "second" / "manifest.json").exists()
    assert not (tmp_path / "first").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_torch_dcp_directory_loads_through_the_default_reader(tmp_path: Path) -> None:
    path = str(tmp_path / "torch-written")
    torch_dcp.save({"a": torch.ones(2), "n": 3}, checkpoint_id=path, no_dist=True)
    out = {"a": torch.zeros(2), "n": 0}
    dcp.load(out, checkpoint_id=path)
    assert torch.equal(out["a"], torch.ones(2)) and out["n"] == 3


def test_deprecated_forms_warn_and_work(tmp_ckpt: str) -> None:
    with pytest.warns(FutureWarning, match="`save_state_dict` is deprecated"):
        dcp.save_state_dict({"a": torch.ones(3)}, dcp.FileSystemWriter(tmp_ckpt))
    out = {"a": torch.zeros(3)}
    with pytest.warns(FutureWarning, match="`load_state_dict` is deprecated"):
        dcp.load_state_dict(out, dcp.FileSystemReader(tmp_ckpt))
    assert torch.equal(out["a"], torch.ones(3))


def test_metadata_lists_every_chunk(tmp_ckpt: str) -> None:
    md = dcp.save({"w": torch.randn(6, 2), "n": 3}, checkpoint_id=tmp_ckpt)
    tmd = md.state_dict_metadata["w"]
    assert isinstance(tmd, dcp.TensorStorageMetadata)
    assert tmd.properties.dtype == torch.float32
    assert sum(c.sizes.numel() for c in tmd.chunks) == 12
    assert isinstance(md.state_dict_metadata["n"], dcp.BytesStorageMetadata)
    again = dcp.FileSystemReader(tmp_ckpt).read_metadata()
    assert again.state_dict_metadata.keys() == md.state_dict_metadata.keys()
    assert again.state_dict_metadata["w"].chunks == tmd.chunks


def _plan(items_by_rank: list[list[tuple[str, int]]]) -> list[SavePlan]:
    """Plans whose items are replicated 1-d tensors (fqn, length) on each rank."""
    planner = DefaultSavePlanner()
    plans = []
    for rank_items in items_by_rank:
        planner.set_up_planner({f: torch.zeros(n) for f, n in rank_items}, None, True)
        plans.append(planner.create_local_plan())
    return plans


def _owners(plans: list[SavePlan]) -> dict[str, int]:
    return {item.index.fqn: r for r, p in enumerate(plans) for item in p.items}


def test_replicas_written_once_least_loaded_or_lowest_rank() -> None:
    plans = _plan([[("a", 100), ("b", 50), ("c", 40)]] * 2)
    spread, md = DefaultSavePlanner().create_global_plan(plans)
    assert sorted(_owners(spread).items()) == [("a", 0), ("b", 1), ("c", 1)]
    assert sum(len(p.items) for p in spread) == 3
    assert md.state_dict_metadata["a"].size == torch.Size([100])
    lowest, _ = DefaultSavePlanner(dedup_save_to_lowest_rank=True).create_global_plan(plans)
    assert set(_owners(lowest).values()) == {0}


def test_plan_caching_reuses_the_global_plan() -> None:
    plans = _plan([[("a", 10)], [("a", 10)]])
    planner = DefaultSavePlanner(enable_plan_caching=True)
    first = planner.create_global_plan(plans)
    second = DefaultSavePlanner(enable_plan_caching=True).create_global_plan(
        _plan([[("a", 10)], [("a", 10)]])
    )
    assert second[0] is first[0] and second[1] is first[1]
    changed = DefaultSavePlanner(enable_plan_caching=True).create_global_plan(
        _plan([[("a", 12)], [("a", 12)]])
    )
    assert changed[1].state_dict_metadata["a"].size == torch.Size([12])


def test_shards_that_leave_a_gap_are_refused_before_writing() -> None:
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    def item(off: int, n: int) -> WriteItem:
        return WriteItem(
            index=MetadataIndex("w", torch.Size([off])),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(torch.Size([off]), torch.Size([n])),
                properties=TensorProperties(dtype=torch.float32),
                size=torch.Size([10]),
            ),
        )

    with pytest.raises(treeckpt.PlanError, match="w"):
        DefaultSavePlanner().create_global_plan([SavePlan([item(0, 4)]), SavePlan([item(6, 4)])])


class _Opaque:
    """An object DCP would pickle."""


def test_values_that_need_pickle_are_refused_at_save_naming_the_key(tmp_ckpt: str) -> None:
    with pytest.raises(dcp.CheckpointException, match=r"'extra\.obj'.*without pickle"):
        dcp.save({"w": torch.ones(1), "extra": {"obj": _Opaque()}}, checkpoint_id=tmp_ckpt)
    assert not os.path.exists(os.path.join(tmp_ckpt, "manifest.json"))


def test_use_collectives_false_is_an_independent_save(tmp_ckpt: str) -> None:
    dcp.save({"w": torch.arange(3)}, checkpoint_id=tmp_ckpt, use_collectives=False)
    out = {"w": torch.zeros(3, dtype=torch.int64)}
    dcp.load(out, checkpoint_id=tmp_ckpt)
    assert torch.equal(out["w"], torch.arange(3))


def test_a_flipped_bit_is_an_error_not_a_wrong_value(tmp_ckpt: str) -> None:
    torch.manual_seed(0)
    dcp.save({"w": torch.randn(256)}, checkpoint_id=tmp_ckpt)
    (data,) = [
        os.path.join(d, f) for d, _, files in os.walk(tmp_ckpt) for f in files if f.endswith(".bin")
    ]
    with open(data, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0x01]))
    out = {"w": torch.zeros(256)}
    with pytest.raises(dcp.CheckpointException, match="w") as info:
        dcp.load(out, checkpoint_id=tmp_ckpt)
    assert isinstance(info.value.__cause__, treeckpt.CorruptChunkError)
    # The planner path reads into its own buffers first: the destination is untouched.
    fresh = {"w": torch.zeros(256)}
    with pytest.raises(dcp.CheckpointException) as info:
        dcp.load(fresh, checkpoint_id=tmp_ckpt, planner=SubsetPlanner())
    assert isinstance(info.value.__cause__, treeckpt.CorruptChunkError)
    assert torch.equal(fresh["w"], torch.zeros(256))

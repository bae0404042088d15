"""torchtitan's own checkpointer runs unchanged on ``treeckpt.dcp``.

torchtitan's ``components/checkpointer/dcp.py`` is loaded from the installed
package, byte for byte, as a module of its own whose imports of
``torch.distributed.checkpoint`` (and its submodules) resolve to
``treeckpt.dcp`` (and the same submodules). The redirection is the module's
own ``__import__`` (its ``__builtins__``), so it covers every import the file
makes, at load time or later inside a function, and changes nothing for any
other module. ``test_every_dcp_name_is_treeckpts`` checks the module's
globals; every run checks that the folders written are treeckpt checkpoints.

The checkpointer class then runs on 2 gloo ranks the way torchtitan's trainer
drives it: a small model under FSDP2 (``fully_shard`` on a 1-D CPU mesh),
torchtitan's ``OptimizersContainer`` (Adam and AdamW groups) and
``LRSchedulersContainer``, a data-loader-like ``Stateful`` keyed per rank and
the trainer's ``train_state``; ``maybe_wait_for_staging`` before each
optimizer step, ``save(step, last_step=...)`` after it.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import treeckpt
import treeckpt.dcp
from tests.dist_utils import run_ranks

torchtitan = pytest.importorskip("torchtitan")

TITAN = Path(torchtitan.__file__).parent
DCP = "torch.distributed.checkpoint"
WORLD = 2
MODES = ("disabled", "async", "async_with_pinned_mem")

# ---------------------------------------------------------------------------
# Loading torchtitan's files with DCP pointed at treeckpt.dcp


class _Overlay(types.ModuleType):
    """A module seen through ``overrides``: those attributes replaced, the rest its own."""

    def __init__(self, module: types.ModuleType, **overrides: Any) -> None:
        super().__init__(module.__name__)
        self.__dict__.update(overrides)
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class Redirected(NamedTuple):
    module: types.ModuleType
    imports: dict[str, str]  # each torch.distributed.checkpoint module the file imports -> ours


def load_on_treeckpt(path: Path, name: str) -> Redirected:
    """Execute the file ``path`` as module ``name``; its DCP imports get ``treeckpt.dcp``."""
    imports: dict[str, str] = {}

    def redirected_import(
        mod: str,
        globals: dict[str, Any] | None = None,
        locals: Any = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        if level != 0 or not (mod == DCP or mod.startswith(DCP + ".")):
            return builtins.__import__(mod, globals, locals, fromlist, level)
        ours = "treeckpt.dcp" + mod[len(DCP) :]
        imports[mod] = ours
        target = importlib.import_module(ours)
        if not fromlist:
            # ``import torch.distributed.checkpoint [as dcp]`` binds ``torch``, whose
            # ``distributed.checkpoint`` it then looks up.
            dcp = importlib.import_module("treeckpt.dcp")
            return _Overlay(torch, distributed=_Overlay(dist, checkpoint=dcp))
        for attr in fromlist:
            if not hasattr(target, attr):
                try:  # a submodule, as ``from package import module`` allows
                    importlib.import_module(f"{ours}.{attr}")
                except ModuleNotFoundError:
                    raise ImportError(f"{ours} has no {attr} (imported by {path})") from None
        return target

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": redirected_import}
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return Redirected(module, imports)


class Titan(NamedTuple):
    checkpointer: Redirected  # components/checkpointer/dcp.py
    adapter: Redirected  # protocols/state_dict_adapter.py (its HuggingFaceStorageReader)


@functools.cache
def titan() -> Titan:
    return Titan(
        load_on_treeckpt(
            TITAN / "components" / "checkpointer" / "dcp.py",
            "torchtitan.components.checkpointer._dcp_on_treeckpt",
        ),
        load_on_treeckpt(
            TITAN / "protocols" / "state_dict_adapter.py",
            "torchtitan.protocols._state_dict_adapter_on_treeckpt",
        ),
    )


def _unredirected(path: Path) -> list[str]:
    """Uses of DCP in the file that do not go through a name its import bound:
    ``import torch.distributed.checkpoint`` without ``as``, or an attribute
    ``.checkpoint`` (``torch.distributed.checkpoint.save``, ``dist.checkpoint``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith(DCP) and a.asname is None
            ]
        elif isinstance(node, ast.Attribute) and node.attr == "checkpoint":
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_every_dcp_name_is_treeckpts() -> None:
    t = titan()
    # Every DCP name the files use is one their imports bound ...
    for r in t:
        assert r.module.__file__ is not None
        assert _unredirected(Path(r.module.__file__)) == []
    # ... and every one of those imports went to treeckpt.dcp.
    assert t.checkpointer.imports == {
        DCP: "treeckpt.dcp",
        f"{DCP}._consolidate_hf_safetensors": "treeckpt.dcp._consolidate_hf_safetensors",
        f"{DCP}.staging": "treeckpt.dcp.staging",
        f"{DCP}.state_dict_saver": "treeckpt.dcp.state_dict_saver",
    }
    assert t.adapter.imports == {DCP: "treeckpt.dcp"}
    g = t.checkpointer.module.__dict__
    import treeckpt.dcp.staging as staging
    import treeckpt.dcp.state_dict_saver as saver

    assert g["dcp"] is treeckpt.dcp
    assert g["DefaultStager"] is staging.DefaultStager
    assert g["DefaultStager"].__module__ == "treeckpt.dcp.staging"
    assert g["StagingOptions"] is staging.StagingOptions
    assert g["AsyncCheckpointerType"] is saver.AsyncCheckpointerType
    assert g["AsyncSaveResponse"] is saver.AsyncSaveResponse
    # Every DCP call in the file is an attribute of ``dcp``: the ones it makes are ours.
    for call in ("save", "async_save", "load"):
        assert getattr(g["dcp"], call).__module__.startswith("treeckpt.dcp."), call
    assert g["HuggingFaceStorageWriter"] is treeckpt.dcp.HuggingFaceStorageWriter  # type: ignore[attr-defined]
    assert t.adapter.module.HuggingFaceStorageReader is treeckpt.dcp.HuggingFaceStorageReader  # type: ignore[attr-defined]
    consolidate = g["consolidate_safetensors_files_on_every_rank"]
    assert consolidate.__module__.startswith("treeckpt.dcp"), consolidate.__module__


# ---------------------------------------------------------------------------
# The training job: what torchtitan's trainer hands its checkpointer


class Tiny(nn.Module):
    """Uneven shapes: a 5-row weight is split 3 + 2 over the two ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 7), nn.Linear(7, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Batches:
    """A data loader's state, keyed by rank as torchtitan's ``ParallelAwareDataloader`` does."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.world = dist.get_world_size()
        self.pos = 0

    def next(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.rank + self.pos)
        self.pos += 1
        return torch.randn(4, 6, generator=g)

    def state_dict(self) -> dict[str, Any]:
        return {f"dp_rank_{self.rank}": {"pos": self.pos}, "world_size": self.world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        assert state_dict["world_size"] == self.world
        self.pos = state_dict[f"dp_rank_{self.rank}"]["pos"]


class TrainState:
    """The trainer's own ``Stateful`` (``states={"train_state": trainer}``)."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]


def tiny_adapter(hf_assets_path: str | None = None) -> Any:
    """A state dict adapter on torchtitan's ``StateDictAdapter`` (HF names: ``model.``...)."""

    class TinyAdapter(titan().adapter.module.StateDictAdapter):  # type: ignore[misc,name-defined]
        def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            return {f"model.{k}": v for k, v in state_dict.items()}

        def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
            return {k.removeprefix("model."): v for k, v in hf_state_dict.items()}

    return TinyAdapter(None, hf_assets_path)


class Job:
    """One rank's training job; the model sharded over the group unless ``sharded=False``."""

    def __init__(
        self,
        rank: int,
        base: str,
        seed: int,
        sharded: bool = True,
        hf_assets_path: str | None = None,
        **config: Any,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torchtitan.components.optimizer import lr_scheduler, optimizer

        torch.manual_seed(seed)
        self.model = Tiny()
        if sharded:
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for layer in self.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        self.optimizers = optimizer.OptimizersContainer(
            optimizer.OptimizersContainer.Config(
                param_groups=[
                    optimizer.ParamGroupConfig(
                        pattern=r"\.bias$", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2}
                    ),
                    optimizer.ParamGroupConfig(
                        pattern=".*",
                        optimizer_name="Adam",
                        optimizer_kwargs={"lr": 3e-2, "weight_decay": 0.1},
                    ),
                ],
                implementation="for-loop",
            ),
            model_parts=[self.model],
        )
        self.lr_schedulers = lr_scheduler.LRSchedulersContainer.Config(
            warmup_steps=2, decay_type="cosine"
        ).build(optimizers=self.optimizers, training_steps=10)
        self.loader = Batches(rank)
        self.train_state = TrainState()
        config = {"enable": True, "folder": "checkpoint", "interval": 1, **config}
        manager = titan().checkpointer.module.CheckpointManager
        self.ckpt = manager.Config(**config).build(
            dataloader=self.loader,
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=tiny_adapter(hf_assets_path),
            base_folder=base,
        )

    def train(self, last: int, save_until: int | None = None, final: int | None = None) -> None:
        """Steps up to ``last``; ``ckpt.save`` after each up to ``save_until``."""
        while self.train_state.step < last:
            self.train_state.step += 1
            x = self.loader.next()
            loss = self.model(x).square().mean()
            loss.backward()
            self.train_state.ntokens_seen += x.numel()
            self.ckpt.maybe_wait_for_staging()
            self.optimizers.step()
            self.lr_schedulers.step()
            self.optimizers.zero_grad()
            if save_until is None or self.train_state.step <= save_until:
                step = self.train_state.step
                self.ckpt.save(step, last_step=step == final)

    def close(self) -> None:
        self.ckpt.maybe_wait_for_saving()
        self.ckpt.close()
        dist.barrier()

    def bits(self) -> dict[str, Any]:
        """Every value of the training state, tensors as (dtype, shape, bytes) of the full tensor."""
        out = {f"model.{k}": _plain(v) for k, v in self.model.state_dict().items()}
        out.update({f"optimizer.{k}": _plain(v) for k, v in self.optimizers.state_dict().items()})
        out["lr"] = [s.get_last_lr() for s in self.lr_schedulers]
        out["lr_scheduler"] = self.lr_schedulers.state_dict()
        out["dataloader"] = self.loader.state_dict()
        out["train_state"] = self.train_state.state_dict()
        return out


@dataclasses.dataclass(frozen=True)
class Bits:
    """A tensor's global value: dtype, shape and bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    raw: bytes


def _plain(v: Any) -> Any:
    if isinstance(v, DTensor):
        v = v.full_tensor()
    if isinstance(v, torch.Tensor):
        t = v.detach().contiguous().reshape(-1)
        return Bits(v.dtype, tuple(v.shape), t.view(torch.uint8).numpy().tobytes())
    return v


def _tensor(b: Bits) -> torch.Tensor:
    return torch.frombuffer(bytearray(b.raw), dtype=b.dtype).reshape(b.shape)


def _model_bits(bits: dict[str, Any]) -> dict[str, Bits]:
    return {k: v for k, v in bits.items() if k.startswith("model.")}


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k


def _assert_kept(mode: str, folder: Path, steps: list[int]) -> None:
    """The step folders left in ``folder`` after purging are ``steps``.

    torchtitan lists the folder right after starting a save: in the
    pinned-memory mode the save (which creates the new step's folder) runs in
    the background and may not have begun, so the folder before the ones kept
    may survive one save longer (as on torch's DCP, whose writer also creates
    the folder in the background). The threaded mode plans, and so creates the
    folder, before ``async_save`` returns.
    """
    kept = sorted(int(n.removeprefix("step-")) for n in os.listdir(folder))
    if mode == "async_with_pinned_mem" and kept[0] == steps[0] - 1:
        kept = kept[1:]
    assert kept == steps


def _is_treeckpt(path: Path) -> treeckpt.api.CheckpointInfo:
    assert (path / "manifest.json").is_file(), f"{path} is not a treeckpt checkpoint"
    return treeckpt.metadata(str(path))


# ---------------------------------------------------------------------------
# Periodic saves, purge, restart


def _first_run(rank: int, world: int, base: str, mode: str) -> dict[str, Any]:
    """Steps 1..6 uninterrupted, saving after steps 1..4 (the job is "killed" after 4)."""
    job = Job(rank, base, seed=0, async_mode=mode, keep_latest_k=2)
    job.train(4)
    at4 = job.bits()
    job.train(6, save_until=4)
    job.close()
    return {"at4": at4, "at6": job.bits()}


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """``mode -> (folder, states)`` of the first run in that async mode, run once.

    Tests that change the folder work on a copy."""
    done: dict[str, Any] = {}

    def get(mode: str) -> Any:
        if mode not in done:
            base = tmp_path_factory.mktemp(f"titan-{mode}")
            states = run_ranks(WORLD, _first_run, base, str(base), mode, timeout=180)[0]
            done[mode] = base / "checkpoint", states
        return done[mode]

    return get


def _resumed_run(rank: int, world: int, base: str, mode: str) -> dict[str, Any]:
    """Fresh processes, another initialisation: load the latest, train to 6, save the last step."""
    job = Job(
        rank,
        base,
        seed=1,
        async_mode=mode,
        keep_latest_k=2,
        last_save_model_only=True,
        export_dtype="bfloat16",
    )
    before = job.bits()
    assert job.ckpt.load() is True
    loaded = job.bits()
    job.train(6, final=6)
    job.close()
    return {"before": before, "loaded": loaded, "at6": job.bits()}


@pytest.mark.parametrize("mode", MODES)
def test_periodic_saves_are_treeckpt_checkpoints_and_old_ones_are_purged(
    first_runs: Callable[[str], Any], mode: str
) -> None:
    folder, states = first_runs(mode)
    # keep_latest_k=2 after saves 1..4; the purge thread has finished at close().
    _assert_kept(mode, folder, [3, 4])
    info = _is_treeckpt(folder / "step-4")
    at4 = states["at4"]
    tensors = {f"model.{k}" if k.startswith("layers.") else k: v for k, v in info.tensors.items()}
    want = {k: v for k, v in at4.items() if isinstance(v, Bits)}
    assert set(tensors) == set(want)
    for k, b in want.items():
        assert (tensors[k].dtype, tensors[k].shape) == (
            str(b.dtype).removeprefix("torch."),
            b.shape,
        ), k
    assert info.values["train_state.step"] == 4
    assert info.values["lr_scheduler.last_epoch"] == 4
    assert info.values["dataloader.dp_rank_0.pos"] == 4
    assert info.values["dataloader.dp_rank_1.pos"] == 4


@pytest.mark.parametrize("mode", MODES)
def test_a_restart_resumes_the_latest_step_bit_exactly(
    first_runs: Callable[[str], Any], mode: str, tmp_path: Path
) -> None:
    saved, first = first_runs(mode)
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    # torchtitan takes a step-N folder only if it holds a .metadata file.
    assert (folder / "step-4" / ".metadata").is_file()
    got = run_ranks(WORLD, _resumed_run, tmp_path, str(tmp_path), mode, timeout=180)
    for r in got:
        assert r["before"]["train_state"]["step"] == 0
        assert r["before"]["model.layers.0.weight"] != first["at4"]["model.layers.0.weight"]
        _same(r["loaded"], first["at4"] | {"dataloader": r["loaded"]["dataloader"]})
        _same(r["at6"], first["at6"] | {"dataloader": r["at6"]["dataloader"]})
    assert [r["loaded"]["dataloader"] for r in got] == [
        {f"dp_rank_{rank}": {"pos": 4}, "world_size": WORLD} for rank in range(WORLD)
    ]
    # Step 5 saved (3 purged), the last step 6 model only, in bfloat16 (not purged).
    _assert_kept(mode, folder, [4, 5, 6])
    last = _is_treeckpt(folder / "step-6")
    assert not last.values
    assert {k: (str(v.dtype), v.shape) for k, v in last.tensors.items()} == {
        k.removeprefix("model."): ("bfloat16", b.shape)
        for k, b in _model_bits(first["at6"]).items()
    }


def _seed_run(rank: int, world: int, base: str) -> dict[str, Any]:
    """torchtitan's ``create_seed_checkpoint``: one process, the model unsharded, step 0."""
    job = Job(rank, base, seed=2, sharded=False, keep_latest_k=0)
    assert job.ckpt.save(0, last_step=True) is True
    job.close()
    return job.bits()


def _seeded_run(rank: int, world: int, base: str) -> dict[str, Any]:
    job = Job(rank, base, seed=1, keep_latest_k=0)
    before = job.bits()
    assert job.ckpt.load() is True
    after = job.bits()
    job.close()
    return {"before": before, "after": after}


def test_a_seed_checkpoint_of_one_process_starts_the_sharded_job(tmp_path: Path) -> None:
    seed = run_ranks(1, _seed_run, tmp_path, str(tmp_path), timeout=180)[0]
    step0 = tmp_path / "checkpoint" / "step-0"
    info = _is_treeckpt(step0)
    assert not info.values
    assert set(info.tensors) == {k.removeprefix("model.") for k in _model_bits(seed)}
    assert (step0 / ".metadata").is_file()
    # Step 0 loads the model alone, each rank its shards; the rest stays fresh.
    for r in run_ranks(WORLD, _seeded_run, tmp_path, str(tmp_path), timeout=180):
        _same(r["after"], r["before"] | _model_bits(seed))


def _excluding_run(rank: int, world: int, base: str) -> dict[str, Any]:
    job = Job(
        rank, base, seed=1, keep_latest_k=0, exclude_from_loading=["dataloader", "lr_scheduler"]
    )
    job.loader.pos = 7
    before = job.bits()
    assert job.ckpt.load(step=4) is True
    after = job.bits()
    job.close()
    return {"before": before, "after": after}


def test_exclude_from_loading_leaves_those_states_alone(
    first_runs: Callable[[str], Any], tmp_path: Path
) -> None:
    saved, first = first_runs("disabled")
    shutil.copytree(saved, tmp_path / "checkpoint")
    got = run_ranks(WORLD, _excluding_run, tmp_path, str(tmp_path), timeout=180)
    assert [r["before"]["dataloader"] for r in got] == [
        {f"dp_rank_{rank}": {"pos": 7}, "world_size": WORLD} for rank in range(WORLD)
    ]
    for r in got:
        kept = ("dataloader", "lr_scheduler", "lr")
        _same(
            r["after"],
            {k: v for k, v in first["at4"].items() if k not in kept}
            | {k: r["before"][k] for k in kept},
        )


# ---------------------------------------------------------------------------
# The last save: model only, exported in bfloat16 or in Hugging Face format


def _export_run(rank: int, world: int, base: str, config: dict[str, Any]) -> dict[str, Any]:
    """Two steps, the second the last: a model-only export."""
    job = Job(rank, base, seed=0, interval=10, keep_latest_k=0, last_save_model_only=True, **config)
    job.train(2, final=2)
    job.close()
    return job.bits()


def _initial_load_run(rank: int, world: int, base: str, config: dict[str, Any]) -> dict[str, Any]:
    """A fresh job whose folder is empty: ``load()`` takes ``initial_load_path``."""
    job = Job(rank, base, seed=1, keep_latest_k=0, **config)
    before = job.bits()
    assert job.ckpt.load() is True
    after = job.bits()
    job.close()
    return {"before": before, "after": after}


def test_a_bfloat16_export_is_the_initial_load_of_a_float32_model(tmp_path: Path) -> None:
    exported = tmp_path / "export"
    trained = run_ranks(
        WORLD, _export_run, tmp_path, str(exported), {"export_dtype": "bfloat16"}, timeout=180
    )[0]
    step = exported / "checkpoint" / "step-2"
    info = _is_treeckpt(step)
    assert not info.values
    assert {k: (v.dtype, v.shape) for k, v in info.tensors.items()} == {
        k.removeprefix("model."): ("bfloat16", b.shape) for k, b in _model_bits(trained).items()
    }
    for k, b in _model_bits(trained).items():
        stored = treeckpt.read_tensor(str(step), k.removeprefix("model."))
        assert _plain(stored) == _plain(_tensor(b).to(torch.bfloat16)), k

    fresh = tmp_path / "fresh"
    got = run_ranks(
        WORLD,
        _initial_load_run,
        tmp_path,
        str(fresh),
        {"initial_load_path": str(step), "initial_load_model_only": True},
        timeout=180,
    )
    widened = {
        k: _plain(_tensor(b).to(torch.bfloat16).to(torch.float32))
        for k, b in _model_bits(trained).items()
    }
    for r in got:
        # The model is the export, widened exactly; the rest is untouched.
        _same(r["after"], r["before"] | widened)
    assert not (fresh / "checkpoint").exists()


# The HF names of the Tiny model (the adapter's ``model.`` prefix) and, for a
# sharded export, the file each goes to (an adapter reads it from the hub's index).
HF_FILES = {
    "model.layers.0.weight": 1,
    "model.layers.0.bias": 1,
    "model.layers.1.weight": 2,
    "model.layers.1.bias": 2,
    "model.layers.2.weight": 2,
    "model.layers.2.bias": 1,
}


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "fqn_to_index_mapping"])
def test_a_hugging_face_export_is_the_initial_load_of_a_fresh_model(
    tmp_path: Path, sharded: bool
) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    config: dict[str, Any] = {"last_save_in_hf": True}
    if sharded:
        # With a mapping, torchtitan saves the pieces to step-N/sharded and then
        # calls consolidate_safetensors_files_on_every_rank.
        assets = tmp_path / "assets"
        assets.mkdir()
        index = {k: f"model-{i:05d}-of-00002.safetensors" for k, i in HF_FILES.items()}
        (assets / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
        config["hf_assets_path"] = str(assets)
    exported = tmp_path / "export"
    trained = run_ranks(WORLD, _export_run, tmp_path, str(exported), config, timeout=180)[0]
    step = exported / "checkpoint" / "step-2"
    assert not (step / "manifest.json").exists()
    weight_map = json.loads((step / "model.safetensors.index.json").read_text())["weight_map"]
    if sharded:
        assert weight_map == {k: f"model-{i:05d}-of-00002.safetensors" for k, i in HF_FILES.items()}
    else:
        assert set(weight_map) == set(HF_FILES)
        assert len(set(weight_map.values())) == 1
    stored = {}
    for name in set(weight_map.values()):
        for k, v in load_file(str(step / name)).items():
            assert weight_map[k] == name, k
            stored[k] = _plain(v)
    # _model_bits names the model's tensors "model.<fqn>", as the adapter does.
    assert stored == _model_bits(trained)

    got = run_ranks(
        WORLD,
        _initial_load_run,
        tmp_path,
        str(tmp_path / "fresh"),
        {"initial_load_path": str(step), "initial_load_in_hf": True},
        timeout=180,
    )
    for r in got:
        _same(r["after"], r["before"] | _model_bits(trained))

"""Every public module and name of the installed ``torch.distributed.checkpoint`` exists in
``treeckpt.dcp`` under the same module path, with the same parameters and defaults.

The public surface is found by walking torch's package, not from a list kept
by hand: a module or name torch adds in its next release is a failure here.
Public means a module whose name does not start with ``_`` (``_experimental``
and the other private modules are skipped), and in it the names of
``__all__`` (or, for a module without ``__all__``, the public names it
defines). A few private paths are covered too, because a real framework
imports them (``FRAMEWORK_PRIVATE``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import pytest
import torch.distributed.checkpoint as torch_dcp

# Private paths of torch's DCP that a framework imports, so the facade covers them:
# Lightning's ``_load_distributed_checkpoint`` (lightning/fabric/utilities/load.py);
# torchtitan's checkpointer and transformers' distributed checkpoint (the consolidation
# of Hugging Face safetensors).
FRAMEWORK_PRIVATE: dict[str, list[str]] = {
    "state_dict_loader": ["_load_state_dict"],
    "format_utils": ["_EmptyStateDictLoadPlanner"],
    "_consolidate_hf_safetensors": [
        "consolidate_safetensors_files",
        "consolidate_safetensors_files_on_every_rank",
    ],
}


def _public_modules() -> list[str]:
    """torch's public modules, and the private ones a framework imports."""
    found = [
        m.name.rsplit(".", 1)[1]
        for m in pkgutil.iter_modules(torch_dcp.__path__, f"{torch_dcp.__name__}.")
    ]
    private = [n for n in found if n.startswith("_") and n in FRAMEWORK_PRIVATE]
    return sorted(n for n in found if not n.startswith("_")) + private


def _public_names(module: Any) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and not inspect.ismodule(v)
        and getattr(v, "__module__", None) == module.__name__
    ]


def _top_level_names() -> list[str]:
    return [
        n for n, v in vars(torch_dcp).items() if not n.startswith("_") and not inspect.ismodule(v)
    ]


def _params(obj: Any) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(obj)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def _same_signature(ours: Any, theirs: Any, where: str) -> None:
    assert _params(ours) == _params(theirs), where


def _public_methods(cls: type) -> dict[str, Any]:
    return {
        n: f
        for n, f in inspect.getmembers(cls, predicate=inspect.isfunction)
        if not n.startswith("_") or n == "__init__"
    }


def _compare(ours: Any, theirs: Any, where: str) -> None:
    if ours is theirs:
        return  # torch's own class, function or constant, re-exported
    if inspect.isclass(theirs):
        assert inspect.isclass(ours), where
        _same_signature(ours, theirs, where)
        mine = _public_methods(ours)
        for meth, fn in _public_methods(theirs).items():
            assert meth in mine, f"{where}.{meth} is missing"
            _same_signature(mine[meth], fn, f"{where}.{meth}")
    elif callable(theirs):
        assert callable(ours), where
        _same_signature(ours, theirs, where)
    else:
        assert ours == theirs, where


def _param(name: str) -> Any:
    return pytest.param(name, id=name)


def test_the_walk_finds_torchs_modules() -> None:
    modules = _public_modules()
    assert {"state_dict_saver", "filesystem", "optimizer", "state_dict"} <= set(modules)
    assert not any(m.startswith("_") and m not in FRAMEWORK_PRIVATE for m in modules)
    assert "_experimental" not in modules


@pytest.mark.parametrize("sub", [_param(m) for m in _public_modules()])
def test_submodule_has_torchs_public_names_and_signatures(sub: str) -> None:
    theirs = importlib.import_module(f"torch.distributed.checkpoint.{sub}")
    ours = importlib.import_module(f"treeckpt.dcp.{sub}")
    private_module = sub.startswith("_")
    names = ([] if private_module else _public_names(theirs)) + FRAMEWORK_PRIVATE.get(sub, [])
    if hasattr(theirs, "__all__") and not private_module:
        assert set(ours.__all__) >= set(theirs.__all__), sub
    for name in names:
        assert hasattr(ours, name), f"treeckpt.dcp.{sub}.{name} is missing"
        _compare(getattr(ours, name), getattr(theirs, name), f"{sub}.{name}")


@pytest.mark.parametrize("name", [_param(n) for n in _top_level_names()])
def test_top_level_name_and_signature(name: str) -> None:
    import treeckpt.dcp as ours

    assert hasattr(ours, name), f"treeckpt.dcp.{name} is missing"
    assert name in ours.__all__, name
    _compare(getattr(ours, name), getattr(torch_dcp, name), name)


def test_behaviour_is_treeckpts_and_interfaces_are_torchs() -> None:
    import treeckpt.dcp as ours

    theirs = torch_dcp
    # Interfaces and plain data: the same classes, so user subclasses and
    # isinstance checks work unchanged.
    for name in ("SavePlanner", "LoadPlanner", "StorageWriter", "StorageReader", "Metadata"):
        assert getattr(ours, name) is getattr(theirs, name)
    # Behaviour: treeckpt's own classes and functions, implementing torch's interfaces.
    for name in (
        "save",
        "load",
        "async_save",
        "FileSystemWriter",
        "DefaultSavePlanner",
        "load_sharded_optimizer_state_dict",
    ):
        assert getattr(ours, name) is not getattr(theirs, name)
    assert issubclass(ours.FileSystemWriter, theirs.StorageWriter)
    assert issubclass(ours.FileSystemReader, theirs.StorageReader)
    assert issubclass(ours.DefaultSavePlanner, theirs.SavePlanner)
    assert issubclass(ours.DefaultLoadPlanner, theirs.LoadPlanner)
    assert issubclass(ours.CheckpointException, theirs.CheckpointException)
    assert issubclass(ours.CheckpointException, Exception)

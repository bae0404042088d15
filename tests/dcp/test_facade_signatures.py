"""Every public name of ``torch.distributed.checkpoint`` that the facade covers exists in
``treeckpt.dcp`` under the same module path, with the same parameters and defaults."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

# Submodules of the facade, as in torch.
SUBMODULES = [
    "api",
    "default_planner",
    "filesystem",
    "metadata",
    "planner",
    "staging",
    "state_dict_loader",
    "state_dict_saver",
    "stateful",
    "storage",
    "state_dict",
    "format_utils",
]

# Names torch.distributed.checkpoint exports at top level that the facade does
# not cover (the ShardedTensor optimizer function is outside DCP's documented
# core API; see docs/dcp.md).
NOT_COVERED = {
    "load_sharded_optimizer_state_dict",
}


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


def _compare(name: str, ours: Any, theirs: Any, where: str) -> None:
    if ours is theirs:
        return  # torch's own class or function, re-exported
    if inspect.isclass(theirs):
        assert inspect.isclass(ours), where
        _same_signature(ours, theirs, where)
        mine = _public_methods(ours)
        for meth, fn in _public_methods(theirs).items():
            assert meth in mine, f"{where}.{meth} is missing"
            _same_signature(mine[meth], fn, f"{where}.{meth}")
    elif callable(theirs):
        _same_signature(ours, theirs, where)


@pytest.mark.parametrize("sub", SUBMODULES)
def test_submodule_has_torchs_public_names_and_signatures(sub: str) -> None:
    theirs = importlib.import_module(f"torch.distributed.checkpoint.{sub}")
    ours = importlib.import_module(f"treeckpt.dcp.{sub}")
    names = list(theirs.__all__)
    assert names
    for name in names:
        assert hasattr(ours, name), f"treeckpt.dcp.{sub}.{name} is missing"
        _compare(name, getattr(ours, name), getattr(theirs, name), f"{sub}.{name}")


def test_top_level_names_and_signatures() -> None:
    import torch.distributed.checkpoint as theirs

    import treeckpt.dcp as ours

    names = [
        n
        for n, v in vars(theirs).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n not in NOT_COVERED
    ]
    assert "save" in names and "FileSystemWriter" in names
    for name in names:
        assert hasattr(ours, name), f"treeckpt.dcp.{name} is missing"
        _compare(name, getattr(ours, name), getattr(theirs, name), name)


def test_behaviour_is_treeckpts_and_interfaces_are_torchs() -> None:
    import torch.distributed.checkpoint as theirs

    import treeckpt.dcp as ours

    # Interfaces and plain data: the same classes, so user subclasses and
    # isinstance checks work unchanged.
    for name in ("SavePlanner", "LoadPlanner", "StorageWriter", "StorageReader", "Metadata"):
        assert getattr(ours, name) is getattr(theirs, name)
    # Behaviour: treeckpt's own classes and functions, implementing torch's interfaces.
    for name in ("save", "load", "async_save", "FileSystemWriter", "DefaultSavePlanner"):
        assert getattr(ours, name) is not getattr(theirs, name)
    assert issubclass(ours.FileSystemWriter, theirs.StorageWriter)
    assert issubclass(ours.FileSystemReader, theirs.StorageReader)
    assert issubclass(ours.DefaultSavePlanner, theirs.SavePlanner)
    assert issubclass(ours.DefaultLoadPlanner, theirs.LoadPlanner)
    assert issubclass(ours.CheckpointException, theirs.CheckpointException)
    assert issubclass(ours.CheckpointException, Exception)

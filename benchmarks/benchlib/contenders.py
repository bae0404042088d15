"""The checkpointing contenders the harness compares, all behind one small interface.

Each contender saves a tree to a (not yet existing) directory and loads it
back. Durability is not the contender's business here: the harness fsyncs
every file and directory of every checkpoint after ``save`` returns, inside
the timed region, so all contenders are held to the same rule.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from .tree import Tree, as_bytes, assert_same_tree, iter_tensors, zeros_template

IO_CHUNK_BYTES = 64 * 1024 * 1024
_DCP_NO_DIST_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"


class Contender(ABC):
    """One way of saving and loading a checkpoint."""

    key: str = ""
    label: str = ""
    description: str = ""

    def prepare(self, state: Tree) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Called once per state before the rounds start (outside any timing)."""

    def release(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Called once per state after the rounds (free anything ``prepare`` built)."""

    @abstractmethod
    def save(self, state: Tree, path: str) -> None:
        """Write ``state`` as a checkpoint at ``path`` (a directory that does not exist yet)."""

    def make_template(self, state: Tree) -> Tree:
        """The pre-allocated destination for a load (built outside the timed region)."""
        return zeros_template(state)

    @abstractmethod
    def load(self, template: Tree, path: str) -> Tree:
        """Load the checkpoint at ``path``; return the loaded tree."""

    def verify(self, state: Tree, loaded: Tree) -> None:
        """Raise unless ``loaded`` equals ``state`` bit for bit."""
        assert_same_tree(state, loaded)


class TreeCkptContender(Contender):
    key = "treeckpt"
    label = "treeckpt (defaults)"
    description = "treeckpt.save(tree, path) / treeckpt.load(template, path), default SaveOptions"

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def save(self, state: Tree, path: str) -> None:
        self._module.save(state, path)

    def load(self, template: Tree, path: str) -> Tree:
        return self._module.load(template, path)


class TreeCkptOptionsContender(TreeCkptContender):
    """treeckpt with one ``Compression`` setting changed, to show what a default buys."""

    def __init__(self, module: ModuleType, key: str, label: str, **compression: object) -> None:
        super().__init__(module)
        self.key = key
        self.label = label
        args = ", ".join(f"{k}={v!r}" for k, v in compression.items())
        self.description = (
            f"treeckpt.save(tree, path, options=SaveOptions(compression=Compression({args})))"
        )
        self._options = module.SaveOptions(compression=module.Compression(**compression))

    def save(self, state: Tree, path: str) -> None:
        self._module.save(state, path, options=self._options)


@contextmanager
def _quiet_dcp_no_dist() -> Iterator[None]:
    """Silence DCP's per-call 'assuming the intent is to save/load in a single process' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_NO_DIST_WARNING, category=UserWarning)
        yield


class DcpDefaultsContender(Contender):
    key = "dcp"
    label = "DCP defaults"
    description = (
        "dcp_save(tree, checkpoint_id=path) / dcp_load(template, checkpoint_id=path), no process group "
        "(FileSystemWriter defaults: thread_count=1, sync_files=True, one file per rank)"
    )

    def save(self, state: Tree, path: str) -> None:
        with _quiet_dcp_no_dist():
            dcp_save(state, checkpoint_id=path)

    def load(self, template: Tree, path: str) -> Tree:
        with _quiet_dcp_no_dist():
            dcp_load(template, checkpoint_id=path)
        return template


class DcpThreadsContender(Contender):
    key = "dcp-threads2"
    label = "DCP `FileSystemWriter(thread_count=2)`"
    description = (
        "dcp_save(tree, storage_writer=FileSystemWriter(path, thread_count=2)) / "
        "dcp_load(template, storage_reader=FileSystemReader(path)), no process group"
    )

    def save(self, state: Tree, path: str) -> None:
        with _quiet_dcp_no_dist():
            dcp_save(state, storage_writer=FileSystemWriter(path, thread_count=2))

    def load(self, template: Tree, path: str) -> Tree:
        with _quiet_dcp_no_dist():
            dcp_load(template, storage_reader=FileSystemReader(path))
        return template


class TorchSaveContender(Contender):
    key = "torch-save"
    label = "`torch.save` + fsync / `torch.load`"
    description = (
        "torch.save(tree, path/state.pt) / torch.load(..., weights_only=True, mmap=False); "
        "torch.load allocates fresh tensors, no copy into a template"
    )
    file_name = "state.pt"

    def save(self, state: Tree, path: str) -> None:
        os.mkdir(path)
        torch.save(state, os.path.join(path, self.file_name))

    def make_template(self, state: Tree) -> Tree:
        return None

    def load(self, template: Tree, path: str) -> Tree:
        return torch.load(
            os.path.join(path, self.file_name), map_location="cpu", weights_only=True, mmap=False
        )


def _write_all(fd: int, data: memoryview) -> None:
    offset = 0
    while offset < len(data):
        offset += os.write(fd, data[offset : offset + IO_CHUNK_BYTES])


def _read_exactly(fd: int, into: memoryview) -> None:
    offset = 0
    while offset < len(into):
        got = os.readv(fd, [into[offset : offset + IO_CHUNK_BYTES]])
        if got == 0:
            raise EOFError(f"checkpoint ended after {offset} of {len(into)} bytes")
        offset += got


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view sharing memory with contiguous tensor ``t``."""
    if not t.is_contiguous():
        raise ValueError("raw I/O needs contiguous tensors")
    return as_bytes(t).numpy().data


class RawBytesContender(Contender):
    key = "raw-bytes"
    label = "raw bytes, no format"
    description = (
        "every tensor's bytes written back to back into one file with os.write; loaded with "
        "readv straight into the template's tensors (structure and non-tensor leaves come from the template)"
    )
    file_name = "tensors.bin"

    def save(self, state: Tree, path: str) -> None:
        os.mkdir(path)
        fd = os.open(
            os.path.join(path, self.file_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
        )
        try:
            for tensor in iter_tensors(state):
                _write_all(fd, _byte_view(tensor))
        finally:
            os.close(fd)

    def load(self, template: Tree, path: str) -> Tree:
        fd = os.open(os.path.join(path, self.file_name), os.O_RDONLY)
        try:
            for tensor in iter_tensors(template):
                _read_exactly(fd, _byte_view(tensor))
        finally:
            os.close(fd)
        return template


class DiskFloorContender(Contender):
    key = "disk-floor"
    label = "disk floor (write+fsync / read, 1 file)"
    description = (
        "one buffer holding all the state's tensor bytes, written to one file in 64 MiB os.write "
        "calls and read back in 64 MiB readv calls into one preallocated buffer"
    )
    file_name = "floor.bin"

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def _require_buffer(self) -> torch.Tensor:
        if self._buffer is None:
            raise RuntimeError("DiskFloorContender.prepare() was not called")
        return self._buffer

    def prepare(self, state: Tree) -> None:
        self._buffer = torch.cat([as_bytes(t) for t in iter_tensors(state)])

    def release(self) -> None:
        self._buffer = None

    def save(self, state: Tree, path: str) -> None:
        os.mkdir(path)
        fd = os.open(
            os.path.join(path, self.file_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
        )
        try:
            _write_all(fd, _byte_view(self._require_buffer()))
        finally:
            os.close(fd)

    def make_template(self, state: Tree) -> Tree:
        return torch.zeros_like(self._require_buffer())

    def load(self, template: Tree, path: str) -> Tree:
        fd = os.open(os.path.join(path, self.file_name), os.O_RDONLY)
        try:
            _read_exactly(fd, _byte_view(template))
        finally:
            os.close(fd)
        return template

    def verify(self, state: Tree, loaded: Tree) -> None:
        assert_same_tree(self._require_buffer(), loaded, "floor")


def import_treeckpt(repo_root: Path) -> tuple[ModuleType | None, str]:
    """Import treeckpt (installed, else from ``repo_root/src``); return (module or None, a note)."""
    module, error = _try_import_treeckpt()
    if module is None:
        src = str(repo_root / "src")
        if src not in sys.path:
            sys.path.insert(0, src)
        module, error = _try_import_treeckpt()
    if module is None:
        return None, f"treeckpt skipped: import failed ({error})"
    missing = [name for name in ("save", "load") if not callable(getattr(module, name, None))]
    if missing:
        return (
            None,
            f"treeckpt skipped: {module.__name__} from {_module_origin(module)} lacks {', '.join(missing)}",
        )
    version = getattr(module, "__version__", "unknown version")
    return module, f"treeckpt {version} from {_module_origin(module)}"


def _try_import_treeckpt() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("treeckpt"), ""
    except Exception as exc:  # a half-written library may raise anything
        sys.modules.pop("treeckpt", None)
        return None, f"{type(exc).__name__}: {exc}"


def _module_origin(module: ModuleType) -> str:
    origin = getattr(module, "__file__", None)
    if origin:
        return str(origin)
    return ", ".join(getattr(module, "__path__", [])) or "<unknown>"


def make_contenders(
    treeckpt_module: ModuleType | None, selected: list[str] | None
) -> list[Contender]:
    """All available contenders (treeckpt only if importable), optionally filtered by key."""
    contenders: list[Contender] = []
    if treeckpt_module is not None:
        contenders.append(TreeCkptContender(treeckpt_module))
        contenders.append(
            TreeCkptOptionsContender(
                treeckpt_module, "treeckpt-raw", 'treeckpt `mode="never"`', mode="never"
            )
        )
        contenders.append(
            TreeCkptOptionsContender(
                treeckpt_module,
                "treeckpt-ratio-1.15",
                "treeckpt `min_ratio=1.15`",
                min_ratio=1.15,
            )
        )
        contenders.append(
            TreeCkptOptionsContender(
                treeckpt_module,
                "treeckpt-always",
                'treeckpt `mode="always"`',
                mode="always",
            )
        )
    contenders.extend(
        [
            DcpDefaultsContender(),
            DcpThreadsContender(),
            TorchSaveContender(),
            RawBytesContender(),
            DiskFloorContender(),
        ]
    )
    if selected is None:
        return contenders
    return [c for c in contenders if c.key in selected]


ALL_CONTENDER_KEYS = [
    "treeckpt",
    "treeckpt-raw",
    "treeckpt-ratio-1.15",
    "treeckpt-always",
    *(
        cls.key
        for cls in (
            DcpDefaultsContender,
            DcpThreadsContender,
            TorchSaveContender,
            RawBytesContender,
            DiskFloorContender,
        )
    ),
]

DEFAULT_CONTENDER_KEYS = [k for k in ALL_CONTENDER_KEYS if not k.startswith("treeckpt-")]
"""Every contender but the treeckpt option variants, which are opt-in."""

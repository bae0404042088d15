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
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from . import throttle
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

    def _target(self, path: str) -> object:
        """``path``, or with ``--throttle`` a ``ThrottledBackend`` over it (a fresh link per call)."""
        bps = throttle.bytes_per_s()
        if bps is None:
            return path
        backends = importlib.import_module(f"{self._module.__name__}.store.backends")
        return backends.ThrottledBackend(backends.LocalBackend(path), bps)

    def save(self, state: Tree, path: str) -> None:
        self._module.save(state, self._target(path))

    def load(self, template: Tree, path: str) -> Tree:
        return self._module.load(template, self._target(path))


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
        self._module.save(state, self._target(path), options=self._options)


@contextmanager
def _quiet_dcp_no_dist() -> Iterator[None]:
    """Silence DCP's per-call 'assuming the intent is to save/load in a single process' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_NO_DIST_WARNING, category=UserWarning)
        yield


class DcpContender(Contender):
    """DCP's file-system writer with ``thread_count`` threads; with ``--throttle``, its fsspec
    writer and reader on the throttled file system (the same link as every contender)."""

    def __init__(self, threads: int = 1, *, zstd: bool = False) -> None:
        self.threads = threads
        self.zstd = zstd
        if zstd:
            self.key = "dcp-zstd"
            self.label = "DCP zstd extension (`_extensions=[ZStandard()]`)"
        elif threads == 1:
            self.key = "dcp"
            self.label = "DCP defaults"
        else:
            self.key = f"dcp-threads{threads}"
            self.label = f"DCP `FileSystemWriter(thread_count={threads})`"
        ext = ", _extensions=[ZStandard()]" if zstd else ""
        self.description = (
            f"dcp_save(tree, storage_writer=FileSystemWriter(path, thread_count={threads}{ext})) / "
            "dcp_load(template, storage_reader=FileSystemReader(path)), no process group; with "
            "--throttle FsspecWriter/FsspecReader on the throttled:// file system"
        )

    def _extensions(self) -> list[object] | None:
        if not self.zstd:
            return None
        from torch.distributed.checkpoint._extension import ZStandard

        return [ZStandard()]

    def save(self, state: Tree, path: str) -> None:
        writer: object
        if throttle.new_link() is None:
            writer = FileSystemWriter(
                path, thread_count=self.threads, _extensions=self._extensions()
            )
        else:
            writer = FsspecWriter(
                throttle.url(path), thread_count=self.threads, _extensions=self._extensions()
            )
        with _quiet_dcp_no_dist():
            dcp_save(state, storage_writer=writer)  # type: ignore[arg-type]

    def load(self, template: Tree, path: str) -> Tree:
        reader: object
        if throttle.new_link() is None:
            reader = FileSystemReader(path)
        else:
            reader = FsspecReader(throttle.url(path))
        with _quiet_dcp_no_dist():
            dcp_load(template, storage_reader=reader)  # type: ignore[arg-type]
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
        file = os.path.join(path, self.file_name)
        torch.save(state, file)
        if throttle.new_link() is not None:
            throttle.take(os.path.getsize(file))

    def make_template(self, state: Tree) -> Tree:
        return None

    def load(self, template: Tree, path: str) -> Tree:
        file = os.path.join(path, self.file_name)
        out = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
        if throttle.new_link() is not None:
            throttle.take(os.path.getsize(file))
        return out


def _write_all(fd: int, data: memoryview) -> None:
    offset = 0
    while offset < len(data):
        n = os.write(fd, data[offset : offset + IO_CHUNK_BYTES])
        throttle.take(n)
        offset += n


def _read_exactly(fd: int, into: memoryview) -> None:
    offset = 0
    while offset < len(into):
        got = os.readv(fd, [into[offset : offset + IO_CHUNK_BYTES]])
        if got == 0:
            raise EOFError(f"checkpoint ended after {offset} of {len(into)} bytes")
        throttle.take(got)
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
        throttle.new_link()
        fd = os.open(
            os.path.join(path, self.file_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
        )
        try:
            for tensor in iter_tensors(state):
                _write_all(fd, _byte_view(tensor))
        finally:
            os.close(fd)

    def load(self, template: Tree, path: str) -> Tree:
        throttle.new_link()
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
        throttle.new_link()
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
        throttle.new_link()
        fd = os.open(os.path.join(path, self.file_name), os.O_RDONLY)
        try:
            _read_exactly(fd, _byte_view(template))
        finally:
            os.close(fd)
        return template

    def verify(self, state: Tree, loaded: Tree) -> None:
        assert_same_tree(self._require_buffer(), loaded, "floor")


class ParallelFloorContender(DiskFloorContender):
    """The floor of a writer with several threads: the state's bytes split over ``files`` files,
    each written (64 MiB ``os.write`` calls) and fsynced by its own thread, read back by
    ``read_threads`` threads (``readv`` at offsets) into one preallocated buffer."""

    def __init__(self, files: int = 2, read_threads: int = 4) -> None:
        super().__init__()
        self.files = files
        self.read_threads = read_threads
        self.key = "disk-floor-parallel"
        self.label = f"parallel disk floor ({files} threads/files write+fsync, {read_threads} read)"
        self.description = (
            f"the state's bytes in one buffer, split over {files} files, each written in 64 MiB "
            f"os.write calls and fsynced by its own thread; read back with {read_threads} threads "
            "(os.preadv at offsets) into one preallocated buffer"
        )

    def _parts(self, n: int, k: int) -> list[tuple[int, int]]:
        step = -(-n // k)
        return [(a, min(n, a + step)) for a in range(0, n, step)]

    def save(self, state: Tree, path: str) -> None:
        os.mkdir(path)
        throttle.new_link()
        data = _byte_view(self._require_buffer())

        def write(i: int, a: int, b: int) -> None:
            fd = os.open(os.path.join(path, f"floor-{i}.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                _write_all(fd, data[a:b])
                os.fsync(fd)
            finally:
                os.close(fd)

        _run_threads(
            [
                lambda i=i, a=a, b=b: write(i, a, b)
                for i, (a, b) in enumerate(self._parts(len(data), self.files))
            ]
        )

    def load(self, template: Tree, path: str) -> Tree:
        throttle.new_link()
        out = _byte_view(template)
        jobs = []
        per_file = max(1, self.read_threads // self.files)
        for i, (a, b) in enumerate(self._parts(len(out), self.files)):
            for lo, hi in self._parts(b - a, per_file):
                jobs.append(
                    lambda i=i, a=a, lo=lo, hi=hi: _pread_exactly(
                        os.path.join(path, f"floor-{i}.bin"), lo, out[a + lo : a + hi]
                    )
                )
        _run_threads(jobs)
        return template


def _pread_exactly(file: str, offset: int, into: memoryview) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < len(into):
            got = os.preadv(fd, [into[done : done + IO_CHUNK_BYTES]], offset + done)
            if got == 0:
                raise EOFError(f"{file} ended after {offset + done} bytes")
            throttle.take(got)
            done += got
    finally:
        os.close(fd)


def _run_threads(fns: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]


def _flat_tensors(tree: Tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of ``tree`` under its dotted path (dict keys only, as the states here have)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out.update(_flat_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


class SafetensorsContender(Contender):
    key = "safetensors"
    label = "safetensors `save_file` / `load_file`"
    description = (
        "every tensor of the state under its dotted path in one safetensors file "
        "(safetensors.torch.save_file), loaded with load_file and copied into the template's "
        "tensors (other leaves come from the template)"
    )
    file_name = "state.safetensors"

    def save(self, state: Tree, path: str) -> None:
        from safetensors.torch import save_file

        os.mkdir(path)
        file = os.path.join(path, self.file_name)
        save_file(_flat_tensors(state), file)
        if throttle.new_link() is not None:
            throttle.take(os.path.getsize(file))

    def load(self, template: Tree, path: str) -> Tree:
        from safetensors.torch import load_file

        file = os.path.join(path, self.file_name)
        loaded = load_file(file)
        if throttle.new_link() is not None:
            throttle.take(os.path.getsize(file))
        for name, t in _flat_tensors(template).items():
            t.copy_(loaded[name])
        return template


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
                'treeckpt `mode="auto", min_ratio=1.15`',
                mode="auto",
                min_ratio=1.15,
            )
        )
        contenders.append(
            TreeCkptOptionsContender(
                treeckpt_module,
                "treeckpt-auto",
                'treeckpt `mode="auto"` (fixed ratio, blind to time)',
                mode="auto",
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
            DcpContender(1),
            DcpContender(2),
            DcpContender(4),
            DcpContender(8),
            DcpContender(1, zstd=True),
            TorchSaveContender(),
            SafetensorsContender(),
            RawBytesContender(),
            DiskFloorContender(),
            ParallelFloorContender(),
        ]
    )
    if selected is None:
        return contenders
    return [c for c in contenders if c.key in selected]


ALL_CONTENDER_KEYS = [
    "treeckpt",
    "treeckpt-raw",
    "treeckpt-ratio-1.15",
    "treeckpt-auto",
    "treeckpt-always",
    "dcp",
    "dcp-threads2",
    "dcp-threads4",
    "dcp-threads8",
    "dcp-zstd",
    "torch-save",
    "safetensors",
    "raw-bytes",
    "disk-floor",
    "disk-floor-parallel",
]

DEFAULT_CONTENDER_KEYS = [
    "treeckpt",
    "dcp",
    "dcp-threads2",
    "torch-save",
    "raw-bytes",
    "disk-floor",
    "disk-floor-parallel",
]
"""The reference set; the option variants, the other DCP thread counts, DCP's zstd extension
and safetensors are opt-in (``bench_compare.py`` runs them)."""

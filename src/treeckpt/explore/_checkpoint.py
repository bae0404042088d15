"""``treeckpt.open``: the lazy checkpoint and its groups (subtrees)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

from treeckpt.core.leaves import LeafRecord, PickleLeaf, TensorLeaf, ValueLeaf
from treeckpt.core.options import LoadOptions
from treeckpt.errors import CheckpointError, LeafNotFoundError
from treeckpt.explore import _display
from treeckpt.explore._handle import TensorHandle
from treeckpt.explore._source import Node, Source, nbytes
from treeckpt.shell.load import value_of
from treeckpt.store.backends import Backend, open_backend
from treeckpt.store.reader import read_manifest

__all__ = ["Checkpoint", "Group", "open"]


def _entry(src: Source, fqn: str) -> Any:
    """A tensor's one handle (made on first use, kept by the source), or a value."""
    rec = src.manifest.records[fqn]
    if isinstance(rec, TensorLeaf):
        handle = src.handles.get(fqn)
        if not isinstance(handle, TensorHandle):
            handle = src.handles[fqn] = TensorHandle(src, fqn, rec)
        return handle
    return value_of(fqn, rec, allow_pickle=src.allow_pickle)


def open(
    path: str | os.PathLike[str] | Backend,
    *,
    allow_pickle: bool = False,
    options: LoadOptions | None = None,
) -> Checkpoint:
    """Open the checkpoint at ``path`` for browsing, reading only its manifest.

    Nothing else is read until it is needed: the chunk indexes the first time
    stored sizes, codecs, layout or data are asked for, and tensor bytes only
    by ``read()``, slicing and ``stats()``, which fetch just the chunks (and,
    for raw chunks, the checksummed blocks) covering the request. Every byte
    read is verified as a load verifies it.

    Args:
        path: checkpoint directory, fsspec URL (``memory://``, ``s3://``...),
            or an already opened store ``Backend``.
        allow_pickle: let ``ckpt[fqn]`` unpickle leaves saved with pickle
            (runs code from the checkpoint; off by default).
        options: I/O threads for reads.

    Raises:
        CheckpointNotFoundError / IncompleteCheckpointError: nothing committed at ``path``.
        ManifestError: the manifest is damaged.
    """
    backend = path if isinstance(path, Backend) else open_backend(os.fspath(path))
    try:
        manifest = read_manifest(backend)
    except BaseException:
        backend.close()
        raise
    return Checkpoint(
        Source(backend, manifest, options or LoadOptions(), allow_pickle=allow_pickle)
    )


class Group(Mapping[str, Any]):
    """A subtree of the checkpoint: a mapping from child names to children.

    A child is a :class:`Group`, a :class:`TensorHandle` or a plain value.
    Keys may also be dotted paths below this group (``g["layers.0.weight"]``).
    Nothing is read from tensor data to list or index a group.
    """

    def __init__(self, source: Source, node: Node) -> None:
        self._src = source
        self._node = node

    @property
    def fqn(self) -> str:
        """The FQN prefix of this subtree (``""`` at the root)."""
        return self._node.fqn

    def __getitem__(self, key: str | int) -> Any:
        name = str(key)
        full = f"{self.fqn}.{name}" if self.fqn else name
        records = self._src.manifest.records
        child = self._node.children.get(name)
        if isinstance(child, Node):
            return Group(self._src, child)
        if isinstance(child, str):
            return _entry(self._src, child)
        if full in records:
            return _entry(self._src, full)
        if full in self._src.groups:
            return Group(self._src, self._src.groups[full])
        near = difflib.get_close_matches(full, [*records, *self._src.groups], n=3)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise LeafNotFoundError(
            f"{full!r} is not a leaf or subtree of the checkpoint at {self._src.backend.root}{hint}"
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._node.children)

    def __len__(self) -> int:
        return len(self._node.children)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str | int):
            return False
        name = str(key)
        full = f"{self.fqn}.{name}" if self.fqn else name
        return (
            name in self._node.children
            or full in self._src.manifest.records
            or full in self._src.groups
        )

    def fqns(self) -> list[str]:
        """Every leaf FQN below this group, in saved order."""
        out: list[str] = []
        stack: list[Node | str] = [self._node]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                out.append(item)
            else:
                stack.extend(reversed(item.children.values()))
        return out

    def tensors(self) -> dict[str, TensorHandle]:
        """FQN -> handle of every tensor below this group."""
        recs = self._src.manifest.records
        return {f: _entry(self._src, f) for f in self.fqns() if isinstance(recs[f], TensorLeaf)}

    def leaf_values(self) -> dict[str, Any]:
        """FQN -> value of every non-tensor leaf below this group (pickles shown, not loaded)."""
        recs = self._src.manifest.records
        return {f: _preview(recs[f]) for f in self.fqns() if not isinstance(recs[f], TensorLeaf)}

    @property
    def tree(self) -> dict[str, Any]:
        """This subtree as nested dicts of tensor handles and values."""

        def build(node: Node) -> dict[str, Any]:
            return {
                name: build(c) if isinstance(c, Node) else _entry(self._src, c)
                for name, c in node.children.items()
            }

        return build(self._node)

    @property
    def raw_bytes(self) -> int:
        """Raw size of every tensor below (from the manifest; no index read)."""
        recs = self._src.manifest.records
        return sum(nbytes(r) for f in self.fqns() if isinstance(r := recs[f], TensorLeaf))

    @property
    def stored_bytes(self) -> int:
        """Stored size of every tensor below (reads the chunk indexes once)."""
        return sum(h.stored_bytes for h in self.tensors().values())

    def __repr__(self) -> str:
        return _display.render_text(self, max_lines=60)

    def summary(self, max_lines: int | None = None) -> str:
        """The plain-text tree (every line unless ``max_lines``)."""
        return _display.render_text(self, max_lines=max_lines)

    def _repr_html_(self) -> str:
        return _display.render_html(self)

    @property
    def _title(self) -> str:
        """The header's first words (for display)."""
        return f"treeckpt subtree {self.fqn!r}"

    def _children(self) -> list[tuple[str, Group | str]]:
        """(name, subgroup or leaf FQN) in saved order (for display)."""
        return [
            (n, Group(self._src, c) if isinstance(c, Node) else c)
            for n, c in self._node.children.items()
        ]

    def _record(self, fqn: str) -> LeafRecord:
        return self._src.manifest.records[fqn]

    def _handle(self, fqn: str) -> TensorHandle:
        handle = _entry(self._src, fqn)
        assert isinstance(handle, TensorHandle)
        return handle


class Checkpoint(Group):
    """An open checkpoint: the root :class:`Group` plus what describes the save.

    Use it as a context manager (or call :meth:`close`) to release the storage
    handles; handles and groups taken from it need it open to read data.
    """

    def __init__(self, source: Source) -> None:
        super().__init__(source, source.root)

    @property
    def _title(self) -> str:
        return (
            f"treeckpt checkpoint {self.path} (save {self.save_id}, "
            f"{self.world_size} writer rank(s))"
        )

    @property
    def path(self) -> str:
        """Where the checkpoint is (absolute path, or the URL's path)."""
        return self._src.backend.root

    @property
    def save_id(self) -> str:
        """The id of the save that committed this checkpoint (names its data files)."""
        return self._src.manifest.save_id

    @property
    def world_size(self) -> int:
        """How many ranks wrote this checkpoint."""
        return self._src.manifest.world_size

    @property
    def format_version(self) -> int:
        """The on-disk format version of the manifest."""
        return self._src.manifest.format_version

    @property
    def structure(self) -> dict[str, Any]:
        """The saved tree's structure record (see the format specification)."""
        return self._src.manifest.structure

    @property
    def user_metadata(self) -> dict[str, Any]:
        """The ``user_metadata`` dict given to ``save``."""
        return dict(self._src.manifest.user_metadata)

    @property
    def files(self) -> dict[str, int]:
        """Data file name -> size in bytes (reads the chunk indexes)."""
        return {f.name: f.size for ix in self._src.indexes for f in ix.files}

    @property
    def bytes_read(self) -> int:
        """Stored tensor bytes read so far through this object (indexes and manifest excluded)."""
        return self._src.bytes_read

    def close(self) -> None:
        """Release cached storage handles (a later read opens what it needs again)."""
        self._src.backend.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _preview(rec: LeafRecord) -> Any:
    if isinstance(rec, ValueLeaf):
        return rec.value
    if isinstance(rec, PickleLeaf):
        return f"<pickled object, {len(rec.data)} bytes>"
    raise CheckpointError("not a value")  # pragma: no cover

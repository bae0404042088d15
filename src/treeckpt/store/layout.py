"""File names inside a checkpoint directory.

::

    manifest.json                      the commit record (root manifest)
    .metadata                          a marker for tools that look for torch DCP's file
    data-<save_id>/r<rank>-<k>.bin     chunk data written by rank <rank>, I/O thread <k>
    data-<save_id>/index-r<rank>.idx   the chunk index of rank <rank> (binary)
    data-<save_id>/index-r<rank>.json  the same as JSON (what earlier versions wrote)

Names are generated here and nowhere else, and every name read from a
manifest must match these patterns exactly: relative, no ``..``, no
separators beyond the one shown, bound to the save id of the commit.
"""

from __future__ import annotations

import re

__all__ = [
    "DCP_MARKER",
    "DCP_MARKER_BYTES",
    "DCP_MARKER_HEAD_BYTES",
    "MANIFEST",
    "binary_index_file",
    "data_dir",
    "data_file",
    "index_file",
    "is_binary_index",
    "is_data_file",
    "is_dcp_marker",
    "is_index_file",
    "is_reference_file",
    "is_save_id",
]

MANIFEST = "manifest.json"

#: Written after each commit, under the name of torch DCP's metadata file, so
#: that tools deciding "is this folder a checkpoint?" by that name (torchtitan's
#: resume) find treeckpt's. Its bytes are a pickle that fails at its first
#: opcode: a lookup of this message as an attribute of ``builtins``, which
#: loads no module and runs no code. torch's ``pickle.load`` of it raises
#: ``AttributeError: Can't get attribute '<message>' on <module 'builtins'>``.
DCP_MARKER = ".metadata"
_MARKER_HEAD = b"cbuiltins\ntreeckpt checkpoint"
DCP_MARKER_BYTES = (
    _MARKER_HEAD + b" (manifest.json), not torch DCP's format: load it with treeckpt.dcp.load or "
    b"treeckpt.load, or convert it with `treeckpt convert PATH OUT --to dcp`\n.\n"
)


def is_dcp_marker(head: bytes) -> bool:
    """True when a ``.metadata`` file starting with ``head`` is treeckpt's marker.

    A ``.metadata`` torch's DCP wrote is a pickle starting with a protocol
    opcode (``\\x80``), never with this line. ``head``: at least the file's
    first :data:`DCP_MARKER_HEAD_BYTES` bytes.
    """
    return head.startswith(_MARKER_HEAD)


#: Bytes of a ``.metadata`` file to read to tell the marker from DCP's pickle.
DCP_MARKER_HEAD_BYTES = len(_MARKER_HEAD)
_SAVE_ID = re.compile(r"[0-9a-f]{16}")


def is_save_id(value: object) -> bool:
    return isinstance(value, str) and _SAVE_ID.fullmatch(value) is not None


def data_dir(save_id: str) -> str:
    return f"data-{save_id}"


def data_file(save_id: str, rank: int, k: int) -> str:
    return f"data-{save_id}/r{rank}-{k}.bin"


def index_file(save_id: str, rank: int) -> str:
    return f"data-{save_id}/index-r{rank}.json"


def binary_index_file(save_id: str, rank: int) -> str:
    return f"data-{save_id}/index-r{rank}.idx"


def is_index_file(name: object, save_id: str, rank: int) -> bool:
    """True when ``name`` is rank ``rank``'s chunk index of save ``save_id``, of either form."""
    return name in (index_file(save_id, rank), binary_index_file(save_id, rank))


def is_binary_index(name: str) -> bool:
    """Whether a chunk index name (already checked by :func:`is_index_file`) is the binary form."""
    return name.endswith(".idx")


def is_data_file(name: object, save_id: str, rank: int) -> bool:
    """True when ``name`` is a data file name rank ``rank`` of save ``save_id`` may write."""
    return (
        isinstance(name, str)
        and re.fullmatch(rf"data-{re.escape(save_id)}/r{rank}-(0|[1-9][0-9]{{0,5}})\.bin", name)
        is not None
    )


#: A data file of a sibling checkpoint (an incremental save's reference):
#: ``../<sibling>/data-<save_id>/r<rank>-<k>.bin``. The sibling name has no dot,
#: so the only ``..`` is the leading one, and it leaves the checkpoint by
#: exactly one level: into the directory that holds its siblings.
_REFERENCE = re.compile(
    r"\.\./[A-Za-z0-9_-]{1,128}/data-[0-9a-f]{16}/r(0|[1-9][0-9]{0,7})-(0|[1-9][0-9]{0,5})\.bin"
)


def is_reference_file(name: object) -> bool:
    """True when ``name`` is a data file of a sibling checkpoint (incremental saves)."""
    return isinstance(name, str) and _REFERENCE.fullmatch(name) is not None

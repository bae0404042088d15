"""Pure decisions of incremental saves: reuse tables, reference names, files in use."""

from __future__ import annotations

from treeckpt.core.box import Box
from treeckpt.core.incremental import build_reuse_table, files_in_use, reference_name
from treeckpt.core.manifest import ChunkIndex, ChunkRef, DataFile

D1 = "xxh3-128:" + "1" * 32
D2 = "xxh3-128:" + "2" * 32


def _chunk(fqn: str, file: str, digest: str, raw_length: int = 16) -> ChunkRef:
    return ChunkRef(
        fqn=fqn,
        box=Box(offsets=(0,), sizes=(4,)),
        file=file,
        offset=0,
        length=raw_length,
        codec="raw",
        raw_length=raw_length,
        checksum="xxh3-64:" + "0" * 16,
        digest=digest,
    )


def _index(files: dict[str, int], chunks: list[ChunkRef]) -> ChunkIndex:
    return ChunkIndex(
        save_id="0" * 16,
        rank=0,
        files=tuple(DataFile(name=n, size=s) for n, s in files.items()),
        chunks=tuple(chunks),
    )


def test_reference_names_chain_through_siblings() -> None:
    assert reference_name("data-aa/r0-0.bin", "step-1") == "../step-1/data-aa/r0-0.bin"
    assert reference_name("../step-0/data-bb/r0-0.bin", "step-1") == "../step-0/data-bb/r0-0.bin"


def test_reuse_table_keys_on_digest_and_itemsize() -> None:
    own = "data-aaaaaaaaaaaaaaaa/r0-0.bin"
    old = "../step-0/data-bbbbbbbbbbbbbbbb/r0-0.bin"
    ix = _index(
        {own: 100, old: 200}, [_chunk("a", own, D1), _chunk("b", old, D2), _chunk("c", own, "")]
    )
    table = build_reuse_table([("step-1", [ix])], {"a": 4, "b": 2, "c": 4})
    hit = table.find(D1, 4, 16)
    assert hit is not None and hit.file == "../step-1/" + own
    assert table.find(D1, 2, 16) is None  # another item size: a shuffled chunk would decode wrong
    assert table.find(D1, 4, 32) is None  # another length
    assert table.find(D2, 2, 16) is not None and table.find(D2, 2, 16).file == old  # type: ignore[union-attr]
    assert table.files == {"../step-1/" + own: 100, old: 200}
    assert len(table.chunks) == 2  # chunks without digests are not reusable


def test_files_in_use_are_relative_to_the_root() -> None:
    ix = _index(
        {"data-aaaaaaaaaaaaaaaa/r0-0.bin": 1, "../step-0/data-bbbbbbbbbbbbbbbb/r0-1.bin": 1}, []
    )
    assert files_in_use("step-1", [ix]) == {
        "step-1/data-aaaaaaaaaaaaaaaa/r0-0.bin",
        "step-0/data-bbbbbbbbbbbbbbbb/r0-1.bin",
    }

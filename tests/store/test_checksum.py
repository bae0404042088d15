"""Checksum format: xxh3-64, lower-case hex, one pattern accepted on read."""

from __future__ import annotations

import numpy as np
import pytest

from treeckpt.store.checksum import ALGORITHM, are_checksums, checksum, is_checksum


def test_known_vectors() -> None:
    # XXH3_64bits of the empty input (the reference implementation's test vector).
    assert checksum(b"") == "xxh3-64:2d06800538d394c2"
    assert ALGORITHM == "xxh3-64"


def test_format() -> None:
    c = checksum(b"hello world")
    assert c.startswith("xxh3-64:")
    assert len(c) == len("xxh3-64:") + 16
    assert c == c.lower()
    assert is_checksum(c)


def test_accepts_every_bytes_like_alike() -> None:
    data = bytes(range(256)) * 10
    arr = np.frombuffer(data, dtype=np.uint8)
    assert checksum(data) == checksum(bytearray(data)) == checksum(memoryview(data))
    assert checksum(data) == checksum(arr.data)


def test_detects_single_bit_flips() -> None:
    data = bytearray(b"\x00" * 4096)
    base = checksum(data)
    seen = {base}
    for bit in range(0, 4096 * 8, 97):
        data[bit // 8] ^= 1 << (bit % 8)
        seen.add(checksum(data))
        data[bit // 8] ^= 1 << (bit % 8)
    assert checksum(data) == base
    assert len(seen) == 1 + len(range(0, 4096 * 8, 97))


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        b"xxh3-64:2d06800538d394c2",
        "xxh3-64:2D06800538D394C2",
        "xxh3-64:2d06800538d394c",
        "xxh3-64:2d06800538d394c20",
        "xxh3-64:2d06800538d394c2\n",
        "crc32c:2d06800538d394c2",
        " xxh3-64:2d06800538d394c2",
        "xxh3-64:2d06800538d394g2",
    ],
)
def test_rejects_malformed(value: object) -> None:
    assert not is_checksum(value)
    good = [checksum(b"a"), checksum(b"b")]
    assert are_checksums(good) and are_checksums([])
    for at in range(3):  # one bad element anywhere spoils the list
        assert not are_checksums([*good[:at], value, *good[at:]])


def test_a_list_check_is_not_fooled_by_joined_elements() -> None:
    a, b = checksum(b"a"), checksum(b"b")
    assert not are_checksums([f"{a}\n{b}"])
    assert not are_checksums([a[:-1] + "\n", b])

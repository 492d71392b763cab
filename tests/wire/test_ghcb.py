"""The SEV-SNP certificate table in auxblob (GHCB): each entry's bounds, read from what a guest sent."""

from __future__ import annotations

import struct

import pytest

from keybroker.errors import EvidenceError
from keybroker.wire import ghcb

VCEK, ARK = ghcb.GUIDS["VCEK"], ghcb.GUIDS["ARK"]


def entry(guid, offset: int, length: int) -> bytes:
    return guid.bytes + struct.pack("<II", offset, length)


def test_a_table_round_trips_its_entries_side_by_side_and_reads_mixed_endian_guids():
    table = ghcb.build([(VCEK, b"v" * 10), (ARK, b"a" * 5)])  # adjacent: the first ends where the second starts
    assert ghcb.parse(table) == [(VCEK, b"v" * 10), (ARK, b"a" * 5)]
    assert ghcb.parse(VCEK.bytes_le + table[16:])[0] == (VCEK, b"v" * 10)
    assert ghcb.parse(b"") == []


@pytest.mark.parametrize("table, message", [
    (entry(VCEK, 0, 10) + bytes(24) + b"x" * 10, "points outside"),        # into the table's own entries
    (entry(VCEK, 48, 0) + bytes(24) + b"x", "points outside"),             # an empty certificate
    (entry(VCEK, 48, 2) + bytes(24) + b"x", "points outside"),             # past the end
    (entry(VCEK, 72, 10) + entry(ARK, 81, 10) + bytes(24) + b"x" * 19, "entries overlap"),  # by one byte
    (entry(VCEK, 48, 1) + b"x", "no terminator"),
    (b"".join(entry(VCEK, 24 * 66 + i, 1) for i in range(65)) + bytes(24) + b"x" * 65, "more than 64 entries"),
])
def test_a_malformed_table_is_refused_naming_what_is_wrong(table, message):
    with pytest.raises(EvidenceError, match=message):
        ghcb.parse(table)

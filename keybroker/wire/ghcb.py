"""The SEV-SNP certificate table (GHCB 2.03, "extended guest request"), as ``sev_guest`` puts it in auxblob.

24-byte entries ``{GUID, u32 offset, u32 length}`` up to an all-zero terminator, then the
certificates (DER). Trustee's SNP evidence carries the same entries as ``cert_chain``
(``{"cert_type": "VCEK", "data": [...]}``): the table and the list are two spellings of one
thing, and this module turns either into the other.
"""

from __future__ import annotations

import itertools
import struct
import uuid

from ..errors import EvidenceError

#: The certificate kinds the table names, by GUID (and by the name Trustee's cert_type gives them).
KINDS = {
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ARK",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ASK",
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "VCEK",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "VLEK",
    uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea"): "CRL",
}
GUIDS = {name: guid for guid, name in KINDS.items()}
ENTRIES_MAX = 64


def parse(blob: bytes) -> list[tuple[uuid.UUID, bytes]]:
    """The (GUID, DER) entries of a table; EvidenceError for one that is malformed.

    GUIDs are RFC 4122 byte order; a table written in the mixed-endian order is accepted
    too. Entries with unknown GUIDs are kept (they are checked by what they contain).
    """
    if not blob:
        return []
    entries, pos = [], 0
    while True:
        if pos + 24 > len(blob):
            raise EvidenceError("certificate table in auxblob has no terminator")
        raw_guid = blob[pos:pos + 16]
        offset, length = struct.unpack_from("<II", blob, pos + 16)
        if not any(blob[pos:pos + 24]):
            break
        guid = uuid.UUID(bytes=raw_guid)
        if guid not in KINDS and uuid.UUID(bytes_le=raw_guid) in KINDS:
            guid = uuid.UUID(bytes_le=raw_guid)
        entries.append((guid, offset, length))
        pos += 24
        if len(entries) > ENTRIES_MAX:
            raise EvidenceError(f"certificate table has more than {ENTRIES_MAX} entries")
    header_end = pos + 24
    out = []
    for guid, offset, length in entries:
        if offset < header_end or offset + length > len(blob) or length == 0:
            raise EvidenceError(f"certificate table entry {guid} points outside the table "
                                f"(offset {offset}, length {length}, table {len(blob)} bytes)")
        out.append((guid, blob[offset:offset + length]))
    # Each byte is one entry's: entries that share bytes would have the same bytes parsed again
    # and again (64 entries over one large region), for nothing a table needs.
    spans = sorted((offset, offset + length) for _, offset, length in entries)
    if any(end > next_start for (_, end), (next_start, _) in itertools.pairwise(spans)):
        raise EvidenceError("certificate table entries overlap")
    return out


def build(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """A table of (GUID, DER) entries."""
    if len(entries) > ENTRIES_MAX:
        raise EvidenceError(f"a certificate table holds at most {ENTRIES_MAX} entries")
    offset = 24 * (len(entries) + 1)
    head, body = bytearray(), bytearray()
    for guid, der in entries:
        head += guid.bytes + struct.pack("<II", offset + len(body), len(der))
        body += der
    return bytes(head) + bytes(24) + bytes(body)

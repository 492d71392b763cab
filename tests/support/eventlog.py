"""Build TCG crypto-agile event logs field by field (TCG PC Client PFP, ACPI 6.5 CCEL) for tests."""

from __future__ import annotations

import hashlib
import struct

from support import VECTORS

CCEL_VECTORS = VECTORS / "ccel"
SHA384 = 0xC
SPEC_ID = b"Spec ID Event03\0"


def header(sizes: dict[int, int] | None = None, *, signature: bytes = SPEC_ID, mr_index: int = 1,
           event_type: int = 3, vendor: bytes = b"") -> bytes:
    """The first event: a TCG_PCR_EVENT (SHA-1 layout) carrying the Spec ID Event03."""
    sizes = {SHA384: 48} if sizes is None else sizes
    body = (signature + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(sizes))
            + b"".join(struct.pack("<HH", alg, size) for alg, size in sizes.items())
            + bytes([len(vendor)]) + vendor)
    return struct.pack("<II", mr_index, event_type) + bytes(20) + struct.pack("<I", len(body)) + body


def record(mr_index: int, event_type: int, data: bytes, digests: dict[int, bytes] | None = None) -> bytes:
    """A TCG_PCR_EVENT2; by default one SHA-384 digest, of the data."""
    digests = {SHA384: hashlib.sha384(data).digest()} if digests is None else digests
    return (struct.pack("<III", mr_index, event_type, len(digests))
            + b"".join(struct.pack("<H", alg) + d for alg, d in digests.items())
            + struct.pack("<I", len(data)) + data)


def extend(rtmr: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(rtmr + digest).digest()


def ccel_table(laml: int = 0x10000, *, cc_type: int = 2, signature: bytes = b"CCEL") -> bytes:
    """An ACPI CCEL table with a correct checksum."""
    body = bytearray(signature + struct.pack("<IBB6s8sIII", 56, 1, 0, b"TEST  ", b"TESTTBL ", 1, 0, 0)
                     + struct.pack("<BBHQQ", cc_type, 0, 0, laml, 0x7D000000))
    body[9] = (-sum(body)) % 256
    return bytes(body)

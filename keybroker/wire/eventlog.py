"""Measurement event logs, the format both sides share: TCG crypto-agile logs, the ACPI CCEL table,
guest-components' runtime events (AAEL).

A TD's firmware logs what it extends into RTMR0-2 as a TCG PC Client crypto-agile event log, found
through the ACPI CCEL table (``/sys/firmware/acpi/tables/data/CCEL``). The log opens with one
TCG_PCR_EVENT (SHA-1 layout) holding the Spec ID Event03 (the algorithms and their digest sizes),
followed by TCG_PCR_EVENT2 records::

    u32 MR index | u32 event type | u32 digest count | count x (u16 alg id, digest) | u32 size | data

The MR index is the CC measurement register: 0 MRTD, 1-4 RTMR0-3. The log ends at 8 bytes of 0xFF
or 0x00 (the unused log area). guest-components' attestation agent appends its runtime events to a
file of bare TCG_PCR_EVENT2 records, each an EV_EVENT_TAG for RTMR3 (MR index 4) whose data is a
TCG_PCClientTaggedEvent (u32 tag "AAEL" 0x4141454c, u32 size, text ``DOMAIN OPERATION CONTENT``) and
whose one SHA-384 digest, the one extended, is that of the tagged event. It sends the CCEL log cut
at its end, the runtime records, then 8 bytes of 0xFF as ``cc_eventlog``; without a CCEL it puts a
Spec ID header whose signature is 16 zero bytes in front (accepted here too).

Every size is checked before use and bounded: the log, the event count, each event's data.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import EventLogError

LOG_MAX = 4 * 1024 * 1024  # real CCEL areas are 64 KiB to 1 MiB
EVENTS_MAX = 10_000
EVENT_DATA_MAX = 256 * 1024  # the largest real events are EFI variables (db, dbx): tens of KiB
DIGESTS_MAX = 8

ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_SM3_256 = 0x4, 0xB, 0xC, 0xD, 0x12
ALGORITHMS = {ALG_SHA1: ("sha1", 20), ALG_SHA256: ("sha256", 32), ALG_SHA384: ("sha384", 48),
              ALG_SHA512: ("sha512", 64), ALG_SM3_256: ("sm3_256", 32)}
DIGEST_SIZE_MAX = 64  # an algorithm the Spec ID event names but keybroker does not know

EV_NO_ACTION, EV_SEPARATOR, EV_EVENT_TAG, EV_IPL = 0x3, 0x4, 0x6, 0xD
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EVENT_TYPES = {
    0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x2: "EV_UNUSED", 0x3: "EV_NO_ACTION", 0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION", 0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS", 0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE", 0xA: "EV_PLATFORM_CONFIG_FLAGS", 0xB: "EV_TABLE_OF_DEVICES", 0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL", 0xE: "EV_IPL_PARTITION_DATA", 0xF: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS", 0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT", 0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER", 0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT", 0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2", 0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB", 0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
AAEL_TAG = 0x4141454C  # "AAEL"
RUNTIME_MR_INDEX = 4   # RTMR3
RUNTIME_TEXT_MAX = 16 * 1024
END_MARKERS = (b"\xff" * 8, b"\0" * 8)
END_FLAG = b"\xff" * 8  # what guest-components puts after the last record


def type_name(event_type: int) -> str:
    return EVENT_TYPES.get(event_type, f"EV_0x{event_type:08x}")


@dataclass(frozen=True)
class SpecId:
    """The Spec ID Event03 of the log's first event: digest sizes per algorithm id."""

    digest_sizes: Mapping[int, int]
    spec_version: tuple[int, int, int]  # major, minor, errata
    uintn_size: int
    signature: bytes  # "Spec ID Event03\0", or 16 zero bytes in guest-components' own header


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2 record: ``digests`` maps a TCG algorithm id to its digest."""

    mr_index: int
    event_type: int
    digests: Mapping[int, bytes]
    data: bytes
    offset: int  # where the record starts in the log, for messages

    @property
    def type_name(self) -> str:
        return type_name(self.event_type)


@dataclass(frozen=True)
class EventLog:
    spec: SpecId
    events: tuple[Event, ...]
    end: int       # offset of the end marker (or of the end of the bytes)
    trailing: int  # bytes after ``end``: the unused log area


@dataclass(frozen=True)
class CcelTable:
    """The ACPI CCEL table: which CC technology, and the log area (LASA, LAML bytes)."""

    revision: int
    oem_id: str
    cc_type: int      # 1 SEV, 2 TDX
    cc_subtype: int
    laml: int         # log area minimum length
    lasa: int         # log area start address

    @property
    def cc_name(self) -> str:
        return {1: "SEV", 2: "TDX"}.get(self.cc_type, f"CC type {self.cc_type}")

    def check_area(self, area: bytes) -> None:
        """``area`` (the log area as read, /sys/firmware/acpi/tables/data/CCEL) fits the table's LAML."""
        if len(area) > self.laml:
            raise EventLogError(f"the event log is {len(area)} bytes, longer than the CCEL table's log area "
                                f"(LAML {self.laml} bytes): it is not the log this table describes")


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, size: int, what: str) -> bytes:
        if self.pos + size > len(self.data):
            raise EventLogError(f"event log truncated at offset {self.pos}: {what} needs {size} bytes, "
                                f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + size]
        self.pos += size
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def _check_size(raw: bytes, what: str) -> None:
    if len(raw) > LOG_MAX:
        raise EventLogError(f"{what} is {len(raw)} bytes, more than the {LOG_MAX} accepted")


def _spec_id(r: _Reader) -> SpecId:
    start = r.pos
    mr_index, event_type = r.u32("the first event's MR index"), r.u32("the first event's type")
    r.take(20, "the first event's SHA-1 digest")
    size = r.u32("the Spec ID event size")
    if event_type != EV_NO_ACTION or mr_index > 1:  # TDVF logs it for MR index 1, td-shim for 0
        raise EventLogError(f"the event log does not start with a Spec ID event (MR index {mr_index}, "
                            f"{type_name(event_type)}; expected EV_NO_ACTION): not a crypto-agile TCG event log")
    if not 29 <= size <= 1024:
        raise EventLogError(f"the Spec ID event is {size} bytes: not a Spec ID Event03")
    body = _Reader(r.take(size, "the Spec ID event"))
    signature = body.take(16, "the Spec ID signature")
    if signature not in (SPEC_ID_SIGNATURE, bytes(16)):
        raise EventLogError(f"the first event's signature {signature!r} is not 'Spec ID Event03': the log is "
                            "not crypto-agile (SHA-1-only TPM 1.2 logs are not read)")
    body.u32("platform class")
    minor, major, errata, uintn = body.u8("version"), body.u8("version"), body.u8("errata"), body.u8("uintn size")
    count = body.u32("the number of algorithms")
    if not 1 <= count <= DIGESTS_MAX:
        raise EventLogError(f"the Spec ID event lists {count} algorithms (1 to {DIGESTS_MAX} accepted)")
    sizes: dict[int, int] = {}
    for _ in range(count):
        alg, digest_size = body.u16("an algorithm id"), body.u16("a digest size")
        known = ALGORITHMS.get(alg)
        if alg in sizes or (known and known[1] != digest_size) or not 1 <= digest_size <= DIGEST_SIZE_MAX:
            raise EventLogError(f"the Spec ID event gives algorithm 0x{alg:04x} digest size {digest_size}"
                                + (" twice" if alg in sizes else "") + f" (at offset {start})")
        sizes[alg] = digest_size
    body.take(body.u8("the vendor info size"), "the vendor info")
    return SpecId(sizes, (major, minor, errata), uintn, signature)


def _at_end(head: bytes) -> bool:
    """The unused log area starts here: 8 bytes of 0xFF or 0x00 (or the last few bytes, all of one)."""
    return head in END_MARKERS or (len(head) < 8 and head in (b"\xff" * len(head), b"\0" * len(head)))


def _records(raw: bytes, spec: SpecId, start: int, count: int = 0) -> tuple[list[Event], int]:
    """The TCG_PCR_EVENT2 records from ``start`` to the end marker (or the end of the bytes)."""
    events: list[Event] = []
    r = _Reader(raw, start)
    while r.pos < len(raw) and not _at_end(raw[r.pos:r.pos + 8]):
        if count + len(events) >= EVENTS_MAX:
            raise EventLogError(f"the event log has more than {EVENTS_MAX} events")
        at = r.pos
        mr_index, event_type = r.u32("an MR index"), r.u32("an event type")
        n = r.u32("a digest count")
        if n > len(spec.digest_sizes):
            raise EventLogError(f"event at offset {at} has {n} digests; the Spec ID event lists "
                                f"{len(spec.digest_sizes)} algorithms")
        digests: dict[int, bytes] = {}
        for _ in range(n):
            alg = r.u16("a digest algorithm")
            if alg not in spec.digest_sizes or alg in digests:
                raise EventLogError(f"event at offset {at} has a digest of algorithm 0x{alg:04x}, "
                                    + ("twice" if alg in digests else "which the Spec ID event does not list"))
            digests[alg] = r.take(spec.digest_sizes[alg], "a digest")
        size = r.u32("an event size")
        if size > EVENT_DATA_MAX:
            raise EventLogError(f"event at offset {at} claims {size} bytes of data (at most {EVENT_DATA_MAX})")
        events.append(Event(mr_index, event_type, digests, r.take(size, "the event data"), at))
    return events, r.pos


def parse_event_log(raw: bytes) -> EventLog:
    """Parse a crypto-agile event log: the Spec ID event, then records up to the end marker."""
    _check_size(raw, "the event log")
    r = _Reader(raw)
    spec = _spec_id(r)
    events, end = _records(raw, spec, r.pos)
    return EventLog(spec, tuple(events), end, len(raw) - end)


def join_logs(first: bytes, *more: bytes) -> bytes:
    """One log from a full log (the CCEL) and files of bare records (runtime logs), in order: each cut
    at its end marker, as guest-components assembles ``cc_eventlog``."""
    log = parse_event_log(first)
    parts, count = [first[:log.end]], len(log.events)
    for raw in more:
        _check_size(raw, "a runtime event log")
        events, end = _records(raw, log.spec, 0, count)
        parts.append(raw[:end])
        count += len(events)
    joined = b"".join(parts)
    _check_size(joined, "the joined event log")
    return joined


def parse_ccel_table(raw: bytes) -> CcelTable:
    """The ACPI CCEL table (ACPI 6.5, 5.2.34): a 36-byte header, CC type and sub-type, LAML, LASA."""
    if len(raw) < 56 or raw[:4] != b"CCEL":
        raise EventLogError(f"not an ACPI CCEL table: signature {raw[:4]!r}, {len(raw)} bytes (expected 'CCEL', "
                            "56 bytes, as in /sys/firmware/acpi/tables/CCEL)")
    length, revision, _, oem_id = struct.unpack_from("<IBB6s", raw, 4)
    if length != len(raw) or length > 4096:
        raise EventLogError(f"the CCEL table says it is {length} bytes but is {len(raw)}")
    if sum(raw) % 256:
        raise EventLogError("the CCEL table's checksum does not add up: the table is damaged")
    cc_type, cc_subtype = raw[36], raw[37]
    laml, lasa = struct.unpack_from("<QQ", raw, 40)
    return CcelTable(revision, oem_id.decode("latin-1").rstrip(), cc_type, cc_subtype, laml, lasa)


def tagged_event(data: bytes) -> tuple[int, bytes] | None:
    """An EV_EVENT_TAG's TCG_PCClientTaggedEvent as (tag id, tagged data), or None when it is not one."""
    if len(data) < 8:
        return None
    tag, size = struct.unpack_from("<II", data)
    return (tag, data[8:]) if size == len(data) - 8 else None


_WORD = re.compile(r"[^\s\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class RuntimeEvent:
    """A guest-components runtime event: ``DOMAIN OPERATION CONTENT``, extended into RTMR3."""

    domain: str
    operation: str
    content: str

    def __post_init__(self) -> None:
        for what, word in (("domain", self.domain), ("operation", self.operation)):
            if not _WORD.fullmatch(word):
                raise EventLogError(f"a runtime event's {what} must be one word without spaces or control "
                                    f"characters, got {word[:64]!r}")
        if "\n" in self.content:
            raise EventLogError("a runtime event's content must not contain a newline")
        if len(self.text.encode()) > RUNTIME_TEXT_MAX:
            raise EventLogError(f"a runtime event is longer than {RUNTIME_TEXT_MAX} bytes")

    @property
    def text(self) -> str:
        return f"{self.domain} {self.operation} {self.content}"

    def tagged(self) -> bytes:
        """The TCG_PCClientTaggedEvent: the event data, and what the digest covers."""
        text = self.text.encode()
        return struct.pack("<II", AAEL_TAG, len(text)) + text

    def digest(self) -> bytes:
        """The SHA-384 digest extended into RTMR3."""
        return hashlib.sha384(self.tagged()).digest()

    def encode(self, mr_index: int = RUNTIME_MR_INDEX) -> bytes:
        """The TCG_PCR_EVENT2 record guest-components appends to its runtime log (for RTMR3, MR index 4;
        keybroker can measure into RTMR2, MR index 3, too)."""
        data = self.tagged()
        return (struct.pack("<IIIH", mr_index, EV_EVENT_TAG, 1, ALG_SHA384) + self.digest()
                + struct.pack("<I", len(data)) + data)


def encode_runtime_event(domain: str, operation: str, content: str) -> bytes:
    """The TCG_PCR_EVENT2 record for one runtime event (RTMR3, EV_EVENT_TAG "AAEL", SHA-384)."""
    return RuntimeEvent(domain, operation, content).encode()


def decode_runtime_event(event: Event) -> RuntimeEvent | None:
    """The runtime event an EV_EVENT_TAG "AAEL" record holds; None for any other event."""
    tagged = tagged_event(event.data) if event.event_type == EV_EVENT_TAG else None
    if event.event_type == EV_EVENT_TAG and tagged is None and event.data[:4] == struct.pack("<I", AAEL_TAG):
        raise EventLogError(f"runtime event at offset {event.offset}: the tagged event size does not match its data")
    if tagged is None or tagged[0] != AAEL_TAG:
        return None
    try:
        text = tagged[1].decode()
    except UnicodeDecodeError:
        raise EventLogError(f"runtime event at offset {event.offset} is not UTF-8") from None
    parts = text.split(" ", 2)
    if len(parts) != 3:
        raise EventLogError(f"runtime event at offset {event.offset} is not 'DOMAIN OPERATION CONTENT': {text[:64]!r}")
    return RuntimeEvent(*parts)


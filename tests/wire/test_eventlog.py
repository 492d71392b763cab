"""The event log format: crypto-agile logs, the CCEL table, guest-components' runtime events,
and hostile bytes (every failure is an EventLogError, never a traceback)."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from keybroker.errors import EventLogError, EvidenceError
from keybroker.wire import eventlog as el
from support import eventlog as eb


def test_a_built_log_parses_to_its_records():
    raw = (eb.header() + eb.record(1, 0x80000007, b"Calling EFI Application")
           + eb.record(0, el.EV_NO_ACTION, b"StartupLocality\0\x03", {}) + eb.record(3, el.EV_IPL, b"cmd"))
    log = el.parse_event_log(raw + b"\xff" * 100)
    assert log.spec.digest_sizes == {el.ALG_SHA384: 48} and log.spec.signature == el.SPEC_ID_SIGNATURE
    assert [(e.mr_index, e.type_name) for e in log.events] == [
        (1, "EV_EFI_ACTION"), (0, "EV_NO_ACTION"), (3, "EV_IPL")]
    assert log.events[2].digests == {el.ALG_SHA384: hashlib.sha384(b"cmd").digest()}
    assert (log.end, log.trailing) == (len(raw), 100)
    assert el.parse_event_log(raw).trailing == 0  # no end marker: the bytes end the log
    assert el.parse_event_log(raw + b"\0" * 7).events == log.events  # a short tail of padding


def test_several_algorithms_and_an_unknown_one_by_its_declared_size():
    sizes = {el.ALG_SHA256: 32, el.ALG_SHA384: 48, 0x27: 64}  # 0x27 (SHA3-512) is not known here
    digests = {el.ALG_SHA256: bytes(32), el.ALG_SHA384: bytes(range(48)), 0x27: b"\x01" * 64}
    log = el.parse_event_log(eb.header(sizes) + eb.record(2, 6, b"x", digests))
    assert log.events[0].digests == digests


def test_runtime_event_matches_guest_components():
    # guest-components' attestation-agent test_event_digest (SHA-384 case): the same text, the same digest
    event = el.RuntimeEvent("domain", "operation", "content")
    assert event.digest().hex() == ("dad5f0e226318ffa9839b75a472c6aa7fdb5834949d0a0a22990cf04d5692440"
                                    "fb00f3aa0609db7e49cd8d793f670d02")
    assert event.tagged() == b"LEAA" + struct.pack("<I", 24) + b"domain operation content"


@pytest.mark.parametrize("content", ["content", "with spaces  and {\"json\": [1, 2]}", "", "ünïcode ✓"])
def test_runtime_event_round_trip(content):
    record = el.encode_runtime_event("example.org", "image-pull", content)
    mr_index, event_type, count, alg = struct.unpack_from("<IIIH", record)
    assert (mr_index, event_type, count, alg) == (4, el.EV_EVENT_TAG, 1, el.ALG_SHA384)
    log = el.parse_event_log(eb.header() + record + el.END_FLAG)
    (event,) = log.events
    decoded = el.decode_runtime_event(event)
    assert decoded == el.RuntimeEvent("example.org", "image-pull", content)
    assert event.digests[el.ALG_SHA384] == decoded.digest() == hashlib.sha384(event.data).digest()


@pytest.mark.parametrize("domain, operation, content, text", [
    ("two words", "op", "c", "domain must be one word"),
    ("", "op", "c", "domain must be one word"),
    ("d", "tab\there", "c", "operation must be one word"),
    ("d", "op", "line\nbreak", "must not contain a newline"),
    ("d", "op", "x" * el.RUNTIME_TEXT_MAX, "longer than"),
])
def test_runtime_events_guest_components_could_not_read_back_are_refused(domain, operation, content, text):
    with pytest.raises(EventLogError, match=text):
        el.encode_runtime_event(domain, operation, content)


def test_other_events_are_not_runtime_events_and_broken_aael_is_an_error():
    tag = eb.record(3, el.EV_EVENT_TAG, struct.pack("<II", 0x8F3B22ED, 4) + b"abc\0")
    ipl = eb.record(3, el.EV_IPL, b"LEAA")
    short = eb.record(4, el.EV_EVENT_TAG, struct.pack("<II", el.AAEL_TAG, 99) + b"d o c")
    words = eb.record(4, el.EV_EVENT_TAG, struct.pack("<II", el.AAEL_TAG, 5) + b"d o-c")
    latin = eb.record(4, el.EV_EVENT_TAG, struct.pack("<II", el.AAEL_TAG, 5) + b"d o \xff")
    events = el.parse_event_log(eb.header() + tag + ipl + short + words + latin).events
    assert el.decode_runtime_event(events[0]) is None and el.decode_runtime_event(events[1]) is None
    for event, text in zip(events[2:], ("size does not match", "not 'DOMAIN OPERATION CONTENT'", "not UTF-8"),
                           strict=True):
        with pytest.raises(EventLogError, match=text):
            el.decode_runtime_event(event)


def test_guest_components_header_without_a_ccel():
    """Without a CCEL, guest-components puts its own Spec ID header (zero signature, SHA-384 and SM3)
    in front of the runtime records."""
    head = eb.header({el.ALG_SHA384: 48, el.ALG_SM3_256: 32}, signature=bytes(16), mr_index=0)
    raw = head + el.encode_runtime_event("d", "o", "c") + el.END_FLAG
    log = el.parse_event_log(raw)
    assert log.spec.signature == bytes(16) and len(log.events) == 1 and log.trailing == 8


def test_join_logs_cuts_each_at_its_end():
    ccel = eb.header() + eb.record(1, 4, bytes(4)) + b"\xff" * 4096
    runtime = el.encode_runtime_event("a", "b", "one") + el.encode_runtime_event("a", "b", "two")
    joined = el.join_logs(ccel, runtime + el.END_FLAG, b"", el.encode_runtime_event("a", "b", "three"))
    log = el.parse_event_log(joined)
    assert [e.mr_index for e in log.events] == [1, 4, 4, 4] and log.trailing == 0
    assert [el.decode_runtime_event(e).content for e in log.events[1:]] == ["one", "two", "three"]
    with pytest.raises(EventLogError, match="truncated"):
        el.join_logs(ccel, runtime[:-3])


def test_ccel_table():
    table = el.parse_ccel_table(eb.ccel_table(0x20000))
    assert (table.cc_name, table.laml, table.lasa, table.oem_id) == ("TDX", 0x20000, 0x7D000000, "TEST")
    table.check_area(bytes(0x20000))
    with pytest.raises(EventLogError, match="longer than the CCEL table's log area"):
        table.check_area(bytes(0x20001))
    real = eb.CCEL_VECTORS / "go-eventlog" / "CCEL.bin"
    if real.exists():
        assert el.parse_ccel_table(real.read_bytes()).laml == 0x10000


@pytest.mark.parametrize("raw, text", [
    (eb.ccel_table(signature=b"TDEL"), "not an ACPI CCEL table"),
    (eb.ccel_table()[:40], "not an ACPI CCEL table"),
    (eb.ccel_table() + b"\0", "says it is 56 bytes but is 57"),
    (eb.ccel_table()[:20] + b"\x01" + eb.ccel_table()[21:], "checksum"),
    (b"", "not an ACPI CCEL table"),
])
def test_damaged_ccel_tables(raw, text):
    with pytest.raises(EventLogError, match=text):
        el.parse_ccel_table(raw)


GOOD = eb.header() + eb.record(1, 4, bytes(4)) + el.encode_runtime_event("d", "o", "content") + el.END_FLAG


@pytest.mark.parametrize("raw, text", [
    (b"", "truncated"),
    (b"\xff" * 64, "does not start with a Spec ID event"),
    (eb.header(signature=b"Spec ID Event02\0"), "not 'Spec ID Event03'"),
    (eb.header({}), "lists 0 algorithms"),
    (eb.header({el.ALG_SHA384: 32}), "digest size 32"),
    (eb.header({0x99: 4096}), "digest size 4096"),
    (eb.header() + eb.record(1, 4, b"x", {el.ALG_SHA256: bytes(32)}), "which the Spec ID event does not list"),
    (eb.header() + struct.pack("<III", 1, 4, 2) + b"\x0c\x00" + bytes(48) + b"\x0c\x00" + bytes(48), "2 digests"),
    # two SHA-384 digests in one event (the Spec ID event lists two algorithms): which one would be replayed?
    (eb.header({el.ALG_SHA256: 32, el.ALG_SHA384: 48}) + struct.pack("<III", 1, 4, 2) + b"\x0c\x00" + bytes(48)
     + b"\x0c\x00" + b"\x01" * 48 + struct.pack("<I", 1) + b"x", "twice"),
    (eb.header() + struct.pack("<IIIH", 1, 4, 1, 0xC) + bytes(48) + struct.pack("<I", 0xFFFFFFFF), "claims"),
    (eb.header() + struct.pack("<IIIH", 1, 4, 1, 0xC) + bytes(48) + struct.pack("<I", 100) + b"x", "truncated"),
    (eb.header() + b"\x01\x00\x00", "truncated"),
    (bytes(el.LOG_MAX + 1), "more than"),
    (eb.header() + eb.record(1, 4, bytes(el.EVENT_DATA_MAX + 1)), f"claims {el.EVENT_DATA_MAX + 1} bytes"),
    (eb.header(mr_index=2), "does not start with a Spec ID event"),  # MR index 0 (td-shim) or 1 (TDVF)
    (eb.header()[:28] + struct.pack("<I", 28) + eb.header()[32:60], "is 28 bytes: not a Spec ID Event03"),
    (eb.header({el.ALG_SHA256: 32, el.ALG_SHA384: 48}).replace(b"\x0b\x00\x20\x00", b"\x0c\x00\x30\x00"),
     "digest size 48 twice"),  # one algorithm listed twice: which size would its digests have?
])
def test_hostile_logs(raw, text):
    with pytest.raises(EventLogError, match=text):
        el.parse_event_log(raw)


def test_too_many_events():
    one = eb.record(2, 4, b"")
    with pytest.raises(EventLogError, match=f"more than {el.EVENTS_MAX} events"):
        el.parse_event_log(eb.header() + one * (el.EVENTS_MAX + 1))
    with pytest.raises(EventLogError, match="more than"):
        el.join_logs(eb.header() + one * el.EVENTS_MAX, one)


def test_every_cut_and_random_damage_is_a_clean_error():
    """A cut anywhere, a flipped byte anywhere: a parse or an EventLogError (an EvidenceError), nothing else."""
    for cut in range(len(GOOD)):
        try:
            el.parse_event_log(GOOD[:cut])
        except EvidenceError:
            pass
    rng = random.Random(7)
    for _ in range(2000):
        damaged = bytearray(GOOD)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            for event in el.parse_event_log(bytes(damaged)).events:
                el.decode_runtime_event(event)
        except EventLogError:
            pass
    for _ in range(200):
        garbage = rng.randbytes(rng.randrange(300))
        for parse in (el.parse_event_log, el.parse_ccel_table):
            try:
                parse(garbage)
            except EventLogError:
                pass

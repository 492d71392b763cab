"""The Linux evidence envelope: round trip and strict decoding."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from keybroker.errors import EnvelopeError
from keybroker.wire import envelope
from keybroker.wire.envelope import TsmReport

REPORT = TsmReport(provider="sev_guest", generation=2, inblob=bytes(64), outblob=b"\x01" * 1184,
                   auxblob=b"\x02" * 100, privlevel=1, privlevel_floor=0)


def doc(**changes):
    obj = envelope.to_json(REPORT)
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


def test_round_trip_keeps_every_attribute():
    svsm = TsmReport(provider="sev_guest", generation=3, inblob=b"n" * 64, outblob=b"r" * 1184,
                     auxblob=b"c", manifestblob=b"m", privlevel=2, privlevel_floor=2,
                     service_provider="svsm", service_guid="c476f1eb-0123-45a5-9641-b4e7dde5bfe3",
                     service_manifest_version=0)
    for report in (REPORT, svsm):
        assert envelope.loads(envelope.dumps(report)) == report
    obj = json.loads(envelope.dumps(REPORT))
    assert obj["version"] == 1 and "manifestblob" not in obj and "service_provider" not in obj


@pytest.mark.parametrize("text, message", [
    (doc(version=3), "unsupported envelope version 3"),
    (doc(event_log="AQ=="), "'event_log' needs envelope version 2, not 1"),
    (doc(version=2, event_log="AQ"), "'event_log' is not valid base64"),
    (doc(version=2, event_log=5), "'event_log' must be a base64 string"),
    (doc(version=True), "unsupported envelope version True"),
    (doc(outblob=...), "missing field(s): outblob"),
    (doc(extra="x"), "unknown field(s): 'extra'"),
    (doc(inblob=base64.b64encode(bytes(65)).decode()), "'inblob' is 65 bytes, more than the limit of 64"),
    (doc(outblob="not base64!"), "'outblob' is not valid base64"),
    (doc(outblob="AQ"), "'outblob' is not valid base64"),
    (doc(auxblob="AR=="), "'auxblob' is not canonical base64"),
    (doc(outblob=""), "'outblob' must not be empty"),
    (doc(inblob=""), "'inblob' must not be empty"),
    (doc(inblob=base64.b64encode(bytes(66)).decode()), "'inblob' is 66 bytes, more than the limit of 64"),
    (doc(provider="SEV guest"), "'provider' must be 1-32 characters"),
    (doc(generation=-1), "'generation' must be an integer between 0"),
    (doc(generation="1"), "'generation' must be an integer"),
    (doc(privlevel=4), "'privlevel' must be an integer between 0 and 3"),
    (doc(service_guid="C476F1EB-0123-45A5-9641-B4E7DDE5BFE3"), "'service_guid' must be a lower-case GUID"),
    ("[]", "must be a JSON object"),
    ("{", "not valid JSON"),
])
def test_strict_decoding_names_the_problem(text, message):
    with pytest.raises(EnvelopeError) as info:
        envelope.loads(text)
    assert message in str(info.value)


def test_size_is_checked_before_parsing():
    with pytest.raises(EnvelopeError, match="more than the limit"):
        envelope.loads(" " * (envelope.ENVELOPE_MAX + 1))


def test_version_2_carries_the_event_log_and_only_then():
    report = TsmReport(provider="tdx_guest", generation=1, inblob=bytes(64), outblob=b"q" * 1000, event_log=b"log")
    obj = envelope.to_json(report)
    assert obj["version"] == 2 and base64.b64decode(obj["event_log"]) == b"log"
    assert envelope.loads(envelope.dumps(report)) == report
    assert envelope.to_json(REPORT)["version"] == 1  # without a log, what version-1 readers read
    assert envelope.loads(doc(version=2)) == REPORT  # version 2 without the (optional) log
    with pytest.raises(EnvelopeError, match="more than the limit"):
        TsmReport(provider="tdx_guest", generation=1, inblob=bytes(64), outblob=b"q",
                  event_log=bytes(envelope.EVENT_LOG_MAX + 1))


@pytest.mark.parametrize("name, refused, accepted", [
    ("provider", "a" * 33, "a" * 32),
    ("generation", 2**64, 2**64 - 1),
    ("privlevel_floor", 4, 3),
    ("service_provider", "a" * 65, "a" * 64),
    ("service_manifest_version", 2**32, 2**32 - 1),
])
def test_each_attribute_is_bounded_where_the_kernel_bounds_it(name, refused, accepted):
    assert getattr(envelope.loads(doc(**{name: accepted})), name) == accepted
    with pytest.raises(EnvelopeError, match=f"'{name}' must be"):
        envelope.loads(doc(**{name: refused}))


@pytest.mark.parametrize("name", ["version", "provider", "generation", "inblob", "outblob"])
def test_each_required_field_is_named_when_missing(name):
    with pytest.raises(EnvelopeError, match=rf"missing field\(s\): {name}$"):
        envelope.loads(doc(**{name: ...}))


def test_a_blob_longer_than_its_bound_is_refused_by_its_text_before_it_is_decoded():
    with pytest.raises(EnvelopeError, match="'inblob' is longer than 64 bytes"):
        envelope.loads(doc(inblob="A" * 92))
    log = "A" * (4 * ((envelope.EVENT_LOG_MAX + 2) // 3) + 4)  # from_json reads what a larger body carried
    with pytest.raises(EnvelopeError, match=f"'event_log' is longer than {envelope.EVENT_LOG_MAX} bytes"):
        envelope.from_json(envelope.to_json(REPORT) | {"version": 2, "event_log": log})


@pytest.mark.parametrize("change", [{"inblob": "n" * 64}, {"privlevel": True}])
def test_a_report_made_in_process_is_held_to_the_same_grammar(change):
    with pytest.raises(EnvelopeError):
        dataclasses.replace(REPORT, **change)

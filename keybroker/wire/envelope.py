"""The Linux evidence envelope: configfs-tsm report attributes, verbatim, as versioned JSON.

The envelope is the contract between the guest and any verifier. It carries what the
kernel's report interface exposed and nothing vendor-specific, so that a verifier can
dispatch on ``provider`` and parse the blobs itself. The README documents the format.
Decoding is strict: unknown versions, unknown or missing fields, oversized values and
non-canonical base64 are errors.

Version 2 adds one optional field, ``event_log``: a TDX guest's measurement log (its CCEL log and
any runtime events, joined as Trustee's ``cc_eventlog``). An envelope without it stays version 1,
so that servers that read only version 1 still read it; one with it says version 2, which such a
server refuses by its version, not by an unknown field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import EnvelopeError
from . import parse_json, shown, shown_names

VERSION = 1
VERSION_EVENT_LOG = 2  # version 1 and the optional event_log
VERSIONS = (VERSION, VERSION_EVENT_LOG)

#: configfs-tsm limits (include/linux/tsm.h): inblob is at most 64 bytes; outblob and the
#: other blobs at most TSM_REPORT_OUTBLOB_MAX, 16 MiB since Linux 7.0 (32 KiB before).
INBLOB_MAX = 64
BLOB_MAX = 16 * 1024 * 1024

#: A measurement event log: real CCEL logs are tens of KiB, the log area at most a few MiB.
EVENT_LOG_MAX = 4 * 1024 * 1024

#: The largest envelope text accepted: every blob at its maximum, base64-encoded, is far
#: beyond any real report; real evidence is a few KiB. Keep the JSON itself bounded.
ENVELOPE_MAX = 4 * 1024 * 1024

#: The grammars of the configfs-tsm attributes the envelope carries (the TSM client and the
#: client configuration check the same values against them).
PROVIDER = re.compile(r"[a-z0-9_]{1,32}")
SERVICE_PROVIDER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class TsmReport:
    """One configfs-tsm report: the attributes written and the blobs read back.

    Optional attributes are ``None`` when they were not written (or not visible for the
    provider); blobs the provider did not fill are empty.
    """

    provider: str
    generation: int
    inblob: bytes
    outblob: bytes
    auxblob: bytes = b""
    manifestblob: bytes = b""
    privlevel: int | None = None
    privlevel_floor: int | None = None
    service_provider: str | None = None
    service_guid: str | None = None
    service_manifest_version: int | None = None
    event_log: bytes = b""  # not an attribute: the TD's measurement log, sent beside the report

    def __post_init__(self) -> None:
        for name in _ATTRIBUTES:
            value = getattr(self, name)
            problem = None if value is None else attribute_problem(name, value)
            if problem:
                raise EnvelopeError(f"envelope field {name!r} {problem}")
        if len(self.event_log) > EVENT_LOG_MAX:
            raise EnvelopeError(f"envelope field 'event_log' is {len(self.event_log)} bytes, more than the limit "
                                f"of {EVENT_LOG_MAX}")


#: The configfs-tsm attributes and their grammar: text (a pattern and what it says), an
#: unsigned integer (its maximum), or a blob (its smallest and largest size in bytes).
_ATTRIBUTES: dict[str, tuple[str, Any, Any]] = {
    "provider": ("text", PROVIDER, "1-32 characters of [a-z0-9_]"),
    "generation": ("uint", _U64_MAX, None),
    "inblob": ("blob", 1, INBLOB_MAX),
    "outblob": ("blob", 1, BLOB_MAX),
    "auxblob": ("blob", 0, BLOB_MAX),
    "manifestblob": ("blob", 0, BLOB_MAX),
    "privlevel": ("uint", 3, None),
    "privlevel_floor": ("uint", 3, None),
    "service_provider": ("text", SERVICE_PROVIDER, "1-64 characters of [A-Za-z0-9_.-]"),
    "service_guid": ("text", GUID, "a lower-case GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"),
    "service_manifest_version": ("uint", _U32_MAX, None),
}


def attribute_problem(name: str, value: Any) -> str | None:
    """What breaks the kernel's grammar of the configfs-tsm attribute ``name``, or None.

    The phrase completes a sentence that names the attribute ("'privlevel' must be ...").
    """
    kind, a, b = _ATTRIBUTES[name]
    if kind == "text":
        return None if isinstance(value, str) and a.fullmatch(value) else f"must be {b}"
    if kind == "uint":
        return None if type(value) is int and 0 <= value <= a else f"must be an integer between 0 and {a}"
    if not isinstance(value, bytes):
        return "must be bytes"
    if len(value) > b:
        return f"is {len(value)} bytes, more than the limit of {b}"
    return "must not be empty" if len(value) < a else None


_BLOBS = ("inblob", "outblob", "auxblob", "manifestblob")
_OPTIONAL = ("privlevel", "privlevel_floor", "service_provider", "service_guid",
             "service_manifest_version")
_REQUIRED = ("version", "provider", "generation", "inblob", "outblob")
_FIELDS = frozenset(_REQUIRED) | frozenset(_BLOBS) | frozenset(_OPTIONAL) | {"event_log"}
_LIMITS = {"inblob": INBLOB_MAX, "event_log": EVENT_LOG_MAX}


def to_json(report: TsmReport) -> dict[str, Any]:
    """The envelope of ``report`` as a JSON-compatible dict (empty and unset fields omitted)."""
    out: dict[str, Any] = {"version": VERSION_EVENT_LOG if report.event_log else VERSION,
                           "provider": report.provider, "generation": report.generation}
    for name in _OPTIONAL:
        value = getattr(report, name)
        if value is not None:
            out[name] = value
    for name in _BLOBS:
        blob = getattr(report, name)
        if blob or name in _REQUIRED:
            out[name] = base64.b64encode(blob).decode("ascii")
    if report.event_log:
        out["event_log"] = base64.b64encode(report.event_log).decode("ascii")
    return out


def dumps(report: TsmReport) -> str:
    return json.dumps(to_json(report), separators=(",", ":"), sort_keys=True)


def from_json(obj: Any) -> TsmReport:
    """Decode an envelope from parsed JSON, strictly."""
    if not isinstance(obj, dict):
        raise EnvelopeError("envelope must be a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise EnvelopeError(f"envelope has unknown field(s): {shown_names(unknown)}")
    missing = [name for name in _REQUIRED if name not in obj]
    if missing:
        raise EnvelopeError(f"envelope is missing field(s): {', '.join(missing)}")
    version = obj["version"]
    if type(version) is not int or version not in VERSIONS:
        raise EnvelopeError(f"unsupported envelope version {shown(version)} (this keybroker reads versions "
                            f"{VERSION} and {VERSION_EVENT_LOG})")
    if "event_log" in obj and version < VERSION_EVENT_LOG:
        raise EnvelopeError(f"envelope field 'event_log' needs envelope version {VERSION_EVENT_LOG}, not {version}")
    provider = obj["provider"]
    if not isinstance(provider, str):
        raise EnvelopeError("envelope field 'provider' must be a string")
    fields: dict[str, Any] = {"provider": provider, "generation": _int_field(obj, "generation")}
    for name in (*_BLOBS, "event_log"):
        if name in obj:
            fields[name] = _b64_field(obj, name)
    for name in ("privlevel", "privlevel_floor", "service_manifest_version"):
        if name in obj:
            fields[name] = _int_field(obj, name)
    for name in ("service_provider", "service_guid"):
        if name in obj:
            if not isinstance(obj[name], str):
                raise EnvelopeError(f"envelope field {name!r} must be a string")
            fields[name] = obj[name]
    return TsmReport(**fields)


def loads(text: str | bytes) -> TsmReport:
    """Decode an envelope from JSON text, strictly (size first, then grammar)."""
    if len(text) > ENVELOPE_MAX:
        raise EnvelopeError(f"envelope is {len(text)} bytes, more than the limit of {ENVELOPE_MAX}")
    try:
        obj = parse_json(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"envelope is not valid JSON: {exc}") from None
    return from_json(obj)


def _int_field(obj: dict[str, Any], name: str) -> int:
    value = obj[name]
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise EnvelopeError(f"envelope field {name!r} must be an integer")
    return value


def _b64_field(obj: dict[str, Any], name: str) -> bytes:
    text = obj[name]
    if not isinstance(text, str):
        raise EnvelopeError(f"envelope field {name!r} must be a base64 string")
    limit = _LIMITS.get(name, BLOB_MAX)
    if len(text) > 4 * ((limit + 2) // 3):
        raise EnvelopeError(f"envelope field {name!r} is longer than {limit} bytes")
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"envelope field {name!r} is not valid base64") from None
    if base64.b64encode(blob).decode("ascii") != text:
        raise EnvelopeError(f"envelope field {name!r} is not canonical base64")
    return blob

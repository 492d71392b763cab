"""Intel TDX, the event log replayed: each RTMR recomputed from the events and compared with the quote's.

RTMR[i] = SHA-384(RTMR[i] || event digest), from 48 zero bytes, for every event of MR index i+1
but EV_NO_ACTION (MR index 0 is MRTD, which the TDX module builds, not the log). The log is the
whole story or nothing: each of RTMR0-3 must replay exactly, so an RTMR the log does not touch must
be zero, and an extend the log does not show fails the check.

Only what a digest covers becomes a claim. Firmware digests cover the loaded image or variable,
not the description beside it, so an event's claims carry its text (``text``) only when its digest
is that of the text; an unmeasured description is a ``label``, for people, not for policies.
guest-components' runtime events must be covered by their digest, or the log is refused.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from ...errors import EventLogError
from ...wire import eventlog as wire
from ...wire.eventlog import ALG_SHA384, EV_NO_ACTION, Event, EventLog

RTMRS = 4
TEXT_MAX = 4096       # a kernel command line is at most a few KiB
LENGTH_PREFIXED = (0x8000000A, 0x8000000B)  # EV_EFI_PLATFORM_FIRMWARE_BLOB2, EV_EFI_HANDOFF_TABLES2
#: The RTMR the OS and applications (guest-components, keybroker measure) extend: the firmware never does.
RUNTIME_RTMR = 3


@dataclass(frozen=True)
class Replay:
    rtmrs: tuple[bytes, ...]    # RTMR0-3 as the log computes them
    counts: tuple[int, ...]     # events extended into each
    extended: tuple[Event, ...]  # those events, in order

    def mismatches(self, quoted: tuple[bytes, ...]) -> list[tuple[int, bytes, bytes]]:
        """(RTMR number, computed, quoted) for every RTMR that differs."""
        return [(i, c, q) for i, (c, q) in enumerate(zip(self.rtmrs, quoted, strict=True)) if c != q]


def replay(log: EventLog) -> Replay:
    """Replay every extended event (SHA-384) into RTMR0-3."""
    values, counts, extended = [bytes(48)] * RTMRS, [0] * RTMRS, []
    for number, event in enumerate(log.events):
        if event.event_type == EV_NO_ACTION or event.mr_index == 0:
            continue
        if event.mr_index > RTMRS:
            raise EventLogError(f"event #{number} ({event.type_name}, offset {event.offset}) extends MR index "
                                f"{event.mr_index}; a TD has MR indices 1-4 (RTMR0-3)")
        digest = event.digests.get(ALG_SHA384)
        if digest is None:
            raise EventLogError(f"event #{number} ({event.type_name}, offset {event.offset}) has no SHA-384 "
                                "digest, the one a TD's RTMRs extend")
        i = event.mr_index - 1
        values[i] = hashlib.sha384(values[i] + digest).digest()
        counts[i] += 1
        extended.append(event)
    return Replay(tuple(values), tuple(counts), tuple(extended))


def _text(data: bytes) -> str | None:
    """The event data as text (UTF-8, or UTF-16 as UEFI writes it, up to the first NUL), or None."""
    utf16 = _utf16(data)
    cut = data.decode("utf-16-le", "replace").split("\0", 1)[0].encode() if utf16 else data.split(b"\0", 1)[0]
    if not cut or len(cut) > TEXT_MAX:
        return None
    try:
        text = cut.decode()
    except UnicodeDecodeError:
        return None
    if utf16 and not text.isascii():
        return None  # binary data that only looked like UTF-16
    return text if all(c.isprintable() or c in "\n\t" for c in text) else None


def _measured(event: Event, digest: bytes) -> dict[str, str]:
    """``text`` (what the digest covers) and ``label`` (the unmeasured rest) of a text event."""
    text = _text(event.data)
    if text is None:
        return {}
    covers = [text.encode(), text.encode() + b"\0"]
    if _only_padding_after(event.data, text):  # the text is all the data says: a digest over the data covers it
        covers.append(event.data)
    if any(hashlib.sha384(c).digest() == digest for c in covers):
        return {"text": text}
    label, sep, rest = text.partition(" ")
    if sep and any(hashlib.sha384(c).digest() == digest for c in (rest.encode(), rest.encode() + b"\0")):
        return {"label": label, "text": rest}  # grub: "grub_cmd: CMD", the digest over CMD
    return {"label": text}


def _only_padding_after(data: bytes, text: str) -> bool:
    """Whether ``data`` is ``text`` (as :func:`_text` read it) and NULs only."""
    rest = data.decode("utf-16-le", "replace").rstrip("\0") if _utf16(data) else \
        data.rstrip(b"\0").decode("utf-8", "replace")
    return rest == text


def _utf16(data: bytes) -> bool:
    """Whether text event data looks like UTF-16 (as UEFI writes it) rather than UTF-8."""
    return len(data) >= 4 and data[1] == data[3] == 0 and data[0] != 0


def _image_path(data: bytes) -> str | None:
    """The file path of an EV_EFI_BOOT_SERVICES_APPLICATION's device path (UEFI_IMAGE_LOAD_EVENT)."""
    if len(data) < 32:
        return None
    length = struct.unpack_from("<Q", data, 24)[0]
    path, pos, end = [], 32, min(32 + length, len(data))
    while pos + 4 <= end:
        kind, sub, size = struct.unpack_from("<BBH", data, pos)
        if size < 4 or kind == 0x7F:
            break
        if (kind, sub) == (4, 4):  # media device path, file path: UTF-16LE, NUL-terminated
            path.append(data[pos + 4:pos + size].decode("utf-16-le", "replace").rstrip("\0"))
        pos += size
    text = "".join(path)[:TEXT_MAX]
    return text if text.isprintable() else None


def _event_claim(event: Event) -> dict[str, Any]:
    digest = event.digests[ALG_SHA384]
    claim: dict[str, Any] = {"rtmr": event.mr_index - 1, "type": event.type_name, "digest": digest.hex()}
    if event.mr_index - 1 == RUNTIME_RTMR:
        # Every RTMR3 event must be a runtime event whose digest covers its data: an event type or tag is
        # not measured, so anything else there could be a runtime event disguised to hide from a policy.
        runtime = wire.decode_runtime_event(event)
        if runtime is None:
            raise EventLogError(f"event at offset {event.offset} in RTMR{RUNTIME_RTMR} is {event.type_name}, not a "
                                "runtime event (EV_EVENT_TAG \"AAEL\"): RTMR3 holds only those")
        if runtime.digest() != digest:
            raise EventLogError(f"runtime event at offset {event.offset} ({runtime.domain} {runtime.operation}): "
                                "its SHA-384 digest is not that of its data, so its content was not measured")
        claim.update(domain=runtime.domain, operation=runtime.operation, content=runtime.content)
    elif event.event_type == wire.EV_EFI_BOOT_SERVICES_APPLICATION:
        path = _image_path(event.data)
        if path:
            claim["label"] = path
    elif event.event_type in LENGTH_PREFIXED:  # u8 size, then the description (a table or volume name)
        label = _text(event.data[1:1 + event.data[0]]) if event.data else None
        if label:
            claim["label"] = label
    elif event.event_type == wire.EV_EVENT_TAG:  # the digest covers what was loaded, the tag names it
        tagged = wire.tagged_event(event.data)
        label = _text(tagged[1]) if tagged else None
        if label:
            claim["label"] = label
    else:
        claim.update(_measured(event, digest))
    return claim


def claims(result: Replay) -> dict[str, Any]:
    """The replayed events as claims: ``tdx.events`` and, from RTMR3, ``tdx.runtime_events``.

    An event's ``digest`` is measured; its ``type`` and ``label`` are not (nor is which of
    several measured strings is, say, the kernel command line: pin ``tdx.rtmr2`` for that),
    and ``text`` only says what the digest covers. A runtime event's fields are all measured.
    """
    events = [_event_claim(e) for e in result.extended]
    out: dict[str, Any] = {"tdx.events": events}
    runtime = [e for e in events if "domain" in e]
    if runtime:
        out["tdx.runtime_events"] = [{k: e[k] for k in ("rtmr", "domain", "operation", "content")} for e in runtime]
    return out


def describe(result: Replay, quoted: tuple[bytes, ...] | None = None) -> list[str]:
    """One line per RTMR: the replayed value, and against the quote's when given."""
    lines = []
    for i, (value, count) in enumerate(zip(result.rtmrs, result.counts, strict=True)):
        line = f"RTMR{i}  {count:3d} events  {value.hex()}"
        if quoted is not None:
            line += "  matches the quote" if quoted[i] == value else f"  DIFFERS: the quote has {quoted[i].hex()}"
        lines.append(line)
    return lines

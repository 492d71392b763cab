"""The answer a handler's forked worker sends it over a pipe: a key and its lease, or a rejection.

A frame is a 4-byte big-endian length, then its fields, each a 4-byte length and the bytes
(text in UTF-8, numbers in ASCII decimal): no JSON, whose import (re, enum) would cost the
handler milliseconds on every key request that it does itself:

    key, size, lease  and the key's bytes     or     rejected, errno, timeout, reason
"""

from __future__ import annotations

from ..wire.resource import VALUE_MAX

ANSWER_HEADER_MAX = 16 * 1024
REASON_MAX = 2000  # characters of a rejection's reason
_FIELDS_MAX = 16


def frame(*fields: str | bytes | int | float) -> bytes:
    body = bytearray()
    for field in fields:
        data = field if isinstance(field, bytes) else (
            field.encode("utf-8", "surrogatepass") if isinstance(field, str) else repr(field).encode("ascii"))
        body += len(data).to_bytes(4, "big") + data
    return len(body).to_bytes(4, "big") + bytes(body)


def fields(body: bytes | bytearray, *, tag: bytes, count: int) -> list[bytes]:
    """The ``count`` fields of a frame's body whose first field is ``tag``; ValueError for anything else."""
    out: list[bytes] = []
    at = 0
    while at < len(body) and len(out) < _FIELDS_MAX:
        size = int.from_bytes(body[at:at + 4], "big")
        if at + 4 + size > len(body):
            raise ValueError("a field runs past the frame")
        out.append(bytes(body[at + 4:at + 4 + size]))
        at += 4 + size
    if at != len(body) or len(out) != count or out[0] != tag:
        raise ValueError(f"not a {tag.decode()} frame of {count} fields")
    return out


def number(field: bytes, low: float, high: float) -> int:
    """A decimal integer field within [low, high]."""
    if not (field.isdigit() and len(field) <= 12 and low <= int(field) <= high):
        raise ValueError(f"{field[:20]!r} is not a number from {low:g} to {high:g}")
    return int(field)


def text(field: bytes) -> str:
    """A text field: any str sent (a description with undecodable bytes, a server's lone surrogate) comes back."""
    return field.decode("utf-8", "surrogatepass")


def encode_answer(header: dict[str, object]) -> bytes:
    """The answer frame of ``header``: ``{"size", "lease"}`` for a key, ``{"errno", "timeout", "reason"}``."""
    if "errno" in header:
        return frame("rejected", int(str(header["errno"])), int(str(header["timeout"])),
                     str(header["reason"])[:REASON_MAX])
    lease = header.get("lease")
    return frame("key", int(str(header["size"])), lease if isinstance(lease, int) else 0)


def decode_answer(body: bytes | bytearray) -> dict[str, object]:
    """The header an answer frame carries (see :func:`encode_answer`); ValueError when malformed."""
    if body[4:12] == b"rejected":
        _, errno, timeout, reason = fields(body, tag=b"rejected", count=4)
        return {"errno": number(errno, 1, 4095), "timeout": number(timeout, 1, 2**32 - 1), "reason": text(reason)}
    _, size, lease = fields(body, tag=b"key", count=3)
    return {"size": number(size, 0, VALUE_MAX), "lease": number(lease, 0, 2**32 - 1) or None}

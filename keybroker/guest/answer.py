"""The handler's exchanges: with the agent over its socket, and with its own worker over a pipe.

Kept apart from :mod:`.agent` so that the handler imports only this to ask, and the agent
and the handler do not import each other. The handler asks before it has read its
configuration (the agent reads it, warm); so the agent's first frame says the configured
deadline, and the handler waits for the key until half of it (the other half is for doing
the round itself should the agent not answer):

    handler -> agent   request, config, type, description, callout, uid, gid, start
    agent -> handler   deadline, milliseconds              within ACK_WAIT of start, then
    agent -> handler   an answer: key, size, lease  and the key's bytes, or  rejected, errno, timeout, reason

(a configuration the agent cannot use is answered at once, without the first frame). A
frame is a 4-byte big-endian length, then its fields, each a 4-byte length and the bytes
(text in UTF-8, numbers in ASCII decimal): no JSON, whose import (re, enum) would cost the
handler milliseconds on every key request. The worker answers its handler the same way.
"""

from __future__ import annotations

# _socket, not socket: the handler runs once per key request, and the socket module's enum
# classes cost it several milliseconds of start-up; the C module (which socket.socket subclasses)
# is all it needs here.
import _socket
import sys
import time

SOCKET = "/run/keybroker/agent.sock"
REQUEST_MAX = 64 * 1024
ANSWER_HEADER_MAX = 16 * 1024
KEY_MAX = 32767
REASON_MAX = 2000  # characters of a rejection's reason
#: How long the handler waits for the agent's first frame: well under half the smallest
#: deadline a configuration may set (2 s), so that the handler's own round still fits.
ACK_WAIT = 0.25
#: The largest deadline a configuration may set (``[handler] deadline``), in seconds.
DEADLINE_MAX = 600.0
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


def read_frame(conn: _socket.socket, limit: int, until: float) -> bytearray:
    """A frame's body, at most ``limit`` bytes, all of it read by ``until`` (CLOCK_MONOTONIC)."""
    head = bytearray(4)
    receive_into(conn, memoryview(head), until)
    size = int.from_bytes(head, "big")
    if not 4 <= size <= limit:
        raise ValueError(f"frame of {size} bytes")
    body = bytearray(size)
    receive_into(conn, memoryview(body), until)
    return body


def receive_into(conn: _socket.socket, view: memoryview, until: float) -> None:
    """Fill ``view``, every read bounded by ``until``, however the peer trickles its bytes."""
    filled = 0
    while filled < len(view):
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        conn.settimeout(remaining)
        got = conn.recv_into(view[filled:])
        if not got:
            raise ValueError("the peer closed the connection")
        filled += got


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
    return {"size": number(size, 0, KEY_MAX), "lease": number(lease, 0, 2**32 - 1) or None}


def ask(socket_path: str, config: str, key_type: str, description: str, callout: bytes, uid: int, gid: int,
        start: float) -> tuple[dict[str, object], bytearray] | None:
    """The agent's answer (header, key bytes) to the request the handler read at ``start`` (a
    CLOCK_MONOTONIC time, the same in every process), or None when no agent answers in time:
    its first frame within ACK_WAIT of ``start``, the answer within half the deadline it
    announced (the agent drops a request whose time passed while it waited).
    """
    try:
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    value = bytearray()
    limit = start + ACK_WAIT
    try:
        conn.settimeout(max(limit - time.monotonic(), 0.001))
        conn.connect(socket_path)
        # Only root's agent: the socket's folder is root's, and the peer must be too (SO_PEERCRED: pid, uid, gid).
        cred = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(cred[4:8], sys.byteorder) != 0:
            return None
        conn.sendall(frame("request", config, key_type, description, callout, uid, gid, start))
        body = read_frame(conn, ANSWER_HEADER_MAX, limit)
        if body[4:12] == b"deadline":
            limit = start + number(fields(body, tag=b"deadline", count=2)[1], 2000, DEADLINE_MAX * 1000) / 2000
            body = read_frame(conn, ANSWER_HEADER_MAX, limit)
        header = decode_answer(body)
        size = header.get("size", 0)
        value = bytearray(size if isinstance(size, int) else 0)
        with memoryview(value) as view:
            receive_into(conn, view, limit)
        answer, value = (header, value), bytearray()
        return answer
    except (OSError, ValueError):
        return None
    finally:
        value[:] = bytes(len(value))  # a key only partly received is wiped too
        conn.close()

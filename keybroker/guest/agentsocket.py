"""The agent's socket: where it listens, its framing, and the handler's side of the exchange.

Kept apart from :mod:`.agent` so that the handler imports only this (sockets and JSON) to
ask, and the agent and the handler do not import each other.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

SOCKET = Path("/run/keybroker/agent.sock")
REQUEST_MAX = 64 * 1024
ANSWER_HEADER_MAX = 16 * 1024
KEY_MAX = 32767


def read_frame(conn: socket.socket, limit: int) -> bytes:
    head = read_exactly(conn, 4)
    size = int.from_bytes(head, "big")
    if not 2 <= size <= limit:
        raise ValueError(f"frame of {size} bytes")
    return read_exactly(conn, size)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("the peer closed the connection")
        data += chunk
    return bytes(data)


def ask(socket_path: Path, config: str, key_type: str, description: str, callout: bytes, uid: int, gid: int,
        deadline: float) -> tuple[dict[str, object], bytearray] | None:
    """The agent's answer (header, key bytes) to this request, or None when no agent answers by
    ``deadline`` (a CLOCK_MONOTONIC time, the same in every process: the agent drops a request
    whose deadline passed while it waited).

    Called by the handler with as few imports as it can: socket and json only.
    """
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError:
        return None
    value = bytearray()
    try:
        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            return remaining

        conn.settimeout(left())
        conn.connect(str(socket_path))
        body = json.dumps({"config": config, "type": key_type, "description": description,
                           "callout": base64.b64encode(callout).decode(), "uid": uid, "gid": gid,
                           "deadline": deadline}).encode()
        conn.sendall(len(body).to_bytes(4, "big") + body)
        conn.settimeout(left())
        header = json.loads(read_frame(conn, ANSWER_HEADER_MAX))
        size = header.get("size", 0) if isinstance(header, dict) else 0
        if not isinstance(size, int) or not 0 <= size <= KEY_MAX:
            return None
        value = bytearray(size)
        with memoryview(value) as view:
            filled = 0
            while filled < size:
                conn.settimeout(left())
                got = conn.recv_into(view[filled:])
                if not got:
                    raise ValueError("the agent's answer was cut short")
                filled += got
        answer, value = (header, value), bytearray()
        return answer
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        value[:] = bytes(len(value))  # a key only partly received is wiped too
        conn.close()

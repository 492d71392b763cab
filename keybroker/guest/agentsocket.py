"""The handoff of a key construction from request-key to ``keybroker agent``, over its socket.

``keybroker-handoff`` (what the request-key drop-in runs: a POSIX sh script, so that a key
request does not start an interpreter) gives the agent the authority to end the construction:

    handoff             links the request's authorisation key (@a) into root's user keyring, which
                        the agent reaches from its process keyring (root's processes alone do)
    handoff -> agent    construct SERIAL SINCE SHARE CONFIG
                            the key; when the handoff started, in seconds since boot (/proc/uptime);
                            the agent's share of the deadline in seconds; the client configuration
    agent -> handoff    done    once it has instantiated or rejected the key

The handoff gives up on the agent SHARE seconds after SINCE; the agent stops short of that
(``MARGIN``), so that it never ends a construction the handler has begun to do.

The agent assumes that authority (KEYCTL_ASSUME_AUTHORITY finds the authorisation key through
its process keyring; it then unlinks it from root's user keyring, holding it in its thread's
credentials), reads the request from the kernel as the handler does, decides access,
obtains the key and ends the construction itself: the key never leaves its process, nor does
the description or the callout pass through the handoff. Anything but ``done`` (no agent, a busy
one, one that leaves a configuration to the handler, one silent past its share) and the handoff
runs ``keybroker-request-key``, which does the round itself in the rest of the deadline.
"""

from __future__ import annotations

import os
import re
import socket
import time

SOCKET = "/run/keybroker/agent.sock"
REQUEST_MAX = 4200  # bytes of a construct line: a path of up to 4095 and the rest
#: The largest share of the deadline (half of the largest a configuration may set).
SHARE_MAX = 300.0
#: Seconds before the handoff gives up on it that the agent stops: it ends no construction after.
MARGIN = 0.5
DONE = b"done\n"
_REQUEST = re.compile(rb"construct ([1-9][0-9]{0,9}) ([0-9]{1,10}\.[0-9]{2}) ([0-9]{1,3}(?:\.[0-9]{1,3})?) "
                      rb"(/[^\s\0]{0,4095})\n")


def parse_request(line: bytes) -> tuple[int, float, float, str]:
    """(serial, since, share, configuration) of a ``construct`` line; ValueError for anything else."""
    match = _REQUEST.fullmatch(line)
    if not match or int(match[1]) > 0x7FFFFFFF or not 0 < float(match[3]) <= SHARE_MAX:
        raise ValueError(f"not a construct line: {line[:80]!r}")
    return int(match[1]), float(match[2]), float(match[3]), os.fsdecode(match[4])


def read_line(conn: socket.socket, limit: int, until: float) -> bytes:
    """One line, newline included, of at most ``limit`` bytes, all of it read by ``until``
    (CLOCK_MONOTONIC) however the peer trickles it; ValueError or TimeoutError otherwise."""
    line = bytearray()
    while not line.endswith(b"\n"):
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        conn.settimeout(remaining)
        got = conn.recv(limit + 1 - len(line))
        if not got:
            raise ValueError("the peer closed the connection")
        line += got
        if len(line) > limit or b"\n" in line[:-1]:
            raise ValueError("not one line within the limit")
    return bytes(line)

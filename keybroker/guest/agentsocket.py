"""The handoff of a key construction from request-key to ``keybroker agent``, over its socket.

``keybroker-handoff`` (what the request-key drop-in runs: a POSIX sh script, so that a key
request does not start an interpreter) gives the agent the authority to end the construction:

    handoff             links the request's authorisation key (@a) into root's user keyring, which
                        the agent reaches from its process keyring (root's processes alone do)
    handoff -> agent    construct SERIAL SHARE CONFIG    the key, the agent's share of the deadline in
                                                         seconds, the client configuration
    agent -> handoff    done                             once it has instantiated or rejected the key

The agent assumes that authority (KEYCTL_ASSUME_AUTHORITY finds the authorisation key through
its process keyring), reads the request from the kernel as the handler does, decides access,
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
DONE = b"done\n"
_REQUEST = re.compile(rb"construct ([1-9][0-9]{0,9}) ([0-9]{1,3}(?:\.[0-9]{1,3})?) (/[^\s\0]{0,4095})\n")


def parse_request(line: bytes) -> tuple[int, float, str]:
    """(serial, share, configuration) of a ``construct`` line; ValueError for anything else."""
    match = _REQUEST.fullmatch(line)
    if not match or int(match[1]) > 0x7FFFFFFF or not 0 < float(match[2]) <= SHARE_MAX:
        raise ValueError(f"not a construct line: {line[:80]!r}")
    return int(match[1]), float(match[2]), os.fsdecode(match[3])


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

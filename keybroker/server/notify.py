"""systemd's readiness protocol (sd_notify): one datagram to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` the server sends ``READY=1`` once its socket is bound and listening,
and ``STOPPING=1`` when it starts shutting down. Without ``$NOTIFY_SOCKET`` (not run by
systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> None:
    """Send ``state`` (e.g. ``READY=1``) to systemd, when run under a notify socket."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return
    if address[0] == "@":
        address = "\0" + address[1:]  # the abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())

"""The two systemd service protocols the unlock services speak: sd_notify and socket activation.

Both are small, stable wire protocols (sd_notify(3), sd_listen_fds(3)); implementing them
here keeps the initramfs free of libsystemd bindings that would have to be compiled.
"""

from __future__ import annotations

import os
import socket

LISTEN_FDS_START = 3


def notify(*assignments: str) -> bool:
    """Send ``VAR=value`` lines to the service manager; ``False`` when there is none."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not address.startswith(("/", "@")):
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    message = "\n".join(line.replace("\n", " ") for line in assignments).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, target)
    except OSError:
        return False
    return True


def listen_fds() -> list[socket.socket]:
    """The sockets passed by socket activation (LISTEN_PID/LISTEN_FDS), taken over once."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets

"""What keybroker speaks to systemd and syslog: sd_notify, socket activation, log lines; and the
one process setting a unit cannot make for every way a program is started: no core dumps.

All three are small, stable wire protocols (sd_notify(3), sd_listen_fds(3), syslog(3) and
the journal's native socket); implementing them here keeps the initramfs free of
libsystemd bindings that would have to be compiled. Nothing here ever carries key material.
"""

from __future__ import annotations

# The C modules under socket and threading: the request-key handler logs through Journal on
# every key request, and the Python modules' start-up (socket's enums) costs it milliseconds.
import _socket
import _thread
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from socket import socket as Socket

LISTEN_FDS_START = 3
#: Bytes of an AF_UNIX socket path, without the terminating NUL (the key-file socket, ask-password sockets).
SUN_PATH_MAX = 107
#: syslog priorities.
ERROR, WARNING, NOTICE, INFO = 3, 4, 5, 6
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"


def notify(*assignments: str) -> bool:
    """Send ``VAR=value`` lines to the service manager; ``False`` when there is none."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not address.startswith(("/", "@")):
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    message = "\n".join(line.replace("\n", " ") for line in assignments).encode("utf-8", "replace")
    return _send(target, message, wait=True)


def no_core_dumps() -> None:
    """This process (and what it forks: the flag is kept) may neither dump core nor be traced by
    non-root users: the handler, the agent, the unlock services and the key server hold keys in
    memory, and a core file would put them on disk."""
    import ctypes

    pr_set_dumpable = 4
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def listen_fds() -> list[Socket]:
    """The sockets passed by socket activation (LISTEN_PID/LISTEN_FDS), taken over once."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if not (pid.isascii() and pid.isdigit() and int(pid) == os.getpid() and count.isascii() and count.isdigit()):
        return []
    import socket

    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


class Journal:
    """One line per event, with a syslog priority, where this program's logs belong.

    A service (``stream=True``) logs to standard error: under systemd (``JOURNAL_STREAM``)
    that is the journal, and each line carries a ``<N>`` priority prefix. A program whose
    standard error goes nowhere (the request-key handler, run by the kernel) logs to syslog
    (``/dev/log``), else to the journal's native socket, else to standard error.
    """

    def __init__(self, ident: str, *, stream: bool, facility: int = 3) -> None:
        self.ident, self.stream, self.facility = ident, stream, facility  # 3: daemon; 10: authpriv
        self.journal_stream = "JOURNAL_STREAM" in os.environ
        self._lock = _thread.allocate_lock()

    def line(self, priority: int, message: str) -> None:
        text = " ".join(message.split())  # one line, whatever a peer or a file put in it
        if not self.stream and (_send(SYSLOG_SOCKET, self._syslog(priority, text), wait=False)
                                or _send(JOURNAL_SOCKET, self._native(priority, text), wait=False)):
            return
        prefix = f"<{priority}>" if self.journal_stream else ("" if self.stream else f"{self.ident}[{os.getpid()}]: ")
        with self._lock:
            print(f"{prefix}{text}", file=sys.stderr, flush=True)

    def _syslog(self, priority: int, text: str) -> bytes:
        stamp = time.strftime("%b %e %H:%M:%S")
        return f"<{self.facility * 8 + priority}>{stamp} {self.ident}[{os.getpid()}]: {text}".encode("utf-8", "replace")

    def _native(self, priority: int, text: str) -> bytes:
        return (f"MESSAGE={text}\nPRIORITY={priority}\nSYSLOG_IDENTIFIER={self.ident}\n"
                f"SYSLOG_FACILITY={self.facility}\n").encode("utf-8", "replace")


def _send(address: str, datagram: bytes, *, wait: bool) -> bool:
    """One datagram to an AF_UNIX socket (``\0``-prefixed: abstract); False when nobody listens there,
    or, unless ``wait``, when its queue is full. Log lines do not wait: the kernel holds a key's
    requester until the request-key handler exits, so a syslog daemon that stalls must not hold
    the handler. sd_notify does (a READY=1 lost would fail the unit's start)."""
    if not address.startswith("\0") and not os.path.exists(address):
        return False
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC |
                              (0 if wait else _socket.SOCK_NONBLOCK))
    except OSError:
        return False
    try:
        sock.sendto(datagram, address)
        return True
    except OSError:
        return False
    finally:
        sock.close()

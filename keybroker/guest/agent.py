"""``keybroker agent``: a warm, root-only helper that obtains keys for the request-key handler.

Each key request starts a fresh handler, which pays for an interpreter and its imports
before any work. The agent keeps that work warm: the handler (still the one that reads the
request, ends the construction and keeps its deadline) hands the request to the agent over
``/run/keybroker/agent.sock`` and gets the outcome back; the agent loads the configuration
(with the same ownership checks: its own code once when it starts, the configuration and its CA
for each request), decides access, and obtains the key (under a kept token, else one
attestation) exactly as the handler's own worker would. A configuration it cannot load, or
whose runtime log its view does not hold as the system does (or cannot write, to measure a
release), it leaves to the handler, whose view its unit does not narrow (ProtectHome=,
PrivateTmp=, ProtectSystem=). When
no agent answers, the handler does the round itself: the agent is an accelerator, never a
dependency.

The socket is 0600 in a 0700 folder, and the agent answers only peers whose credentials
(SO_PEERCRED) say uid 0. Requests are bounded in size; ``WORKERS`` threads, started once,
serve one request each at a time: when all are busy (a provider blocking a read, a server
stalling) a new request is closed at once and its handler does the round itself. The
handler gives the agent half of its deadline, so that it can still do the round when the
agent does not answer; a request whose time passed before the agent took it is dropped.
The exchange is :mod:`.agentsocket`'s; the key's bytes are wiped after sending.

systemd starts it on demand through ``keybroker-agent.socket``.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from ..errors import ConfigError
from ..systemd import listen_fds, no_core_dumps, notify
from .agentsocket import (
    DEADLINE_MAX,
    REQUEST_MAX,
    SOCKET,
    fields,
    frame,
    number,
    read_frame,
    text,
)
from .client import Links
from .handler import answer_frame, load_config, obtain_for
from .unlock.keyfile import bind, peer

WORKERS = 16
REQUEST_WAIT = 10.0  # seconds for a handler's request to arrive whole


def _serve_one(conn: socket.socket, slots: threading.BoundedSemaphore, links: Links) -> None:
    value = bytearray()
    try:
        handler, handler_uid = peer(conn)
        if handler_uid != 0:
            return  # only root's handler may ask
        _, config, key_type, description, callout, uid, gid, started = fields(
            read_frame(conn, REQUEST_MAX, time.monotonic() + REQUEST_WAIT), tag=b"request", count=8)
        start = float(started)
        if not time.monotonic() - DEADLINE_MAX <= start <= time.monotonic():
            return  # not a time this handler can have started at (nor a number)
        try:
            cfg = load_config(text(config), code_checked=True)
        except Exception:
            # Left to the handler, which loads it itself and rejects it if it must: the agent's view
            # may lack what the handler's has (its unit hides /root, /home and /tmp).
            return
        if not _sees_the_runtime_log(cfg.measure.log.parent, writes=cfg.measure.releases, handler=handler):
            return  # left to the handler too: the agent would read (or extend) another log than RTMR3's
        deadline = start + cfg.deadline / 2
        if not deadline > time.monotonic():
            return  # its handler has given up on the agent already
        conn.sendall(frame("deadline", round(cfg.deadline * 1000)))
        header, value = obtain_for(cfg, text(key_type), text(description), callout,
                                   number(uid, 0, 2**32 - 1), number(gid, 0, 2**32 - 1), deadline, links)
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        for part in answer_frame(header, value):
            conn.sendall(part)
    except (OSError, ValueError):
        pass  # a peer gone or a malformed request: nothing to answer; the handler decides on its own
    finally:
        value[:] = bytes(len(value))
        conn.close()
        slots.release()


def _sees_the_runtime_log(folder: Path, *, writes: bool, handler: int) -> bool:
    """Whether the runtime log's ``folder`` (or the nearest folder above it that exists, where the log
    would make it) is, in the agent's view, the one the process ``handler`` sees and, when it ``writes``
    (measured releases), writable: the agent's unit makes the file system read-only but /run/keybroker
    (ProtectSystem=strict) and gives it a /tmp of its own (PrivateTmp=); the handler runs outside it."""
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        mine, handlers = os.stat(folder), os.stat(f"/proc/{handler}/root{folder}")
    except OSError:
        return False
    same = (mine.st_dev, mine.st_ino) == (handlers.st_dev, handlers.st_ino)
    return same and (not writes or os.access(folder, os.W_OK))


def _worker(accepted: queue.SimpleQueue[socket.socket], slots: threading.BoundedSemaphore, links: Links) -> None:
    while True:
        conn = accepted.get()
        try:
            _serve_one(conn, slots, links)
        except Exception:  # a bug costs neither the agent a worker nor the handler its key: it does the round
            traceback.print_exc()


def serve(socket_path: Path = Path(SOCKET)) -> int:
    from . import broker, ownership  # noqa: F401  (the request path, imported before its code is checked)

    no_core_dumps()  # it holds released keys, kept tokens and their tee keys

    # The import path is checked once: what is not there now must not be planted there later.
    sys.path[:] = [entry for entry in sys.path if entry and os.path.exists(entry)]
    if os.geteuid() == 0:
        ownership.check_code()  # once: each request then checks the configuration it reads
    activated = listen_fds()
    if len(activated) > 1:
        raise ConfigError(f"socket activation passed {len(activated)} sockets; the agent takes one")
    listener = activated[0] if activated else bind(socket_path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    slots = threading.BoundedSemaphore(WORKERS)
    accepted: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
    links = Links()  # the key servers' connections, kept alive from one request to the next
    for _ in range(WORKERS):  # started once, not a thread per request
        threading.Thread(target=_worker, args=(accepted, slots, links), name="keybroker-agent", daemon=True).start()
    notify("READY=1", f"STATUS=obtaining keys for the request-key handler on {socket_path}")
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # EMFILE and the like: the handlers fall back meanwhile
                time.sleep(0.1)
                continue
            if not slots.acquire(blocking=False):
                conn.close()  # all busy: the handler does the round itself, at once
                continue
            accepted.put(conn)
    finally:
        listener.close()
        if not activated:
            socket_path.unlink(missing_ok=True)

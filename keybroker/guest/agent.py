"""``keybroker agent``: a warm, root-only helper that ends key constructions for request-key.

Each key request that the handler serves starts an interpreter and pays for its imports
before any work. The agent keeps that work warm: ``keybroker-handoff`` (what the drop-in runs)
gives it the construction's authority over ``/run/keybroker/agent.sock`` (see :mod:`.agentsocket`),
and the agent reads the request from the kernel, loads the configuration (with the same
ownership checks: its own code once when it starts, the configuration and its CA for each
request), decides access, obtains the key (under a kept token, else one attestation) exactly
as the handler's worker would, and ends the construction: the key never leaves its process.
A configuration it cannot load, or whose runtime log its view does not hold as the system does
(or cannot write, to measure a release), it leaves to the handler, whose view its unit does not
narrow (ProtectHome=, PrivateTmp=, ProtectSystem=). When no agent answers, the handler does
the round itself: the agent is an accelerator, never a dependency.

The socket is 0600 in a 0700 folder, and the agent answers only peers whose credentials
(SO_PEERCRED) say uid 0. It reaches root's user keyring, where the handoff links a request's
authorisation key, from its process keyring (as only root's processes can), and unlinks that
key when its construction ends. ``WORKERS`` threads, started once, serve one construction each at a time, each with the
authority it assumed (a thread's own credentials): when all are busy (a provider blocking a
read, a server stalling) a new request is closed at once and the handler does the round
itself. The agent has the share of the deadline the handoff gives it (at most half); past it
it leaves the construction to the handler.

systemd starts it on demand through ``keybroker-agent.socket``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from ..errors import ConfigError, KeybrokerError
from ..systemd import Journal, listen_fds, no_core_dumps, notify
from . import keyring
from .agentsocket import DONE, MARGIN, REQUEST_MAX, SOCKET, parse_request, read_line
from .client import Links
from .handler import Construction, _authorise, _from_answer, _outcome, end, load_config, log_outcome, uptime
from .unlock.keyfile import bind, peer

WORKERS = 16
REQUEST_WAIT = 10.0  # seconds for a construct line to arrive whole
DRAIN = 30.0  # seconds a stopping agent gives the constructions it holds to end


def _serve_one(conn: socket.socket, slots: threading.BoundedSemaphore, links: Links, log: Journal) -> None:
    try:
        handoff, handoff_uid = peer(conn)
        if handoff_uid != 0:
            return  # only root's handoff may ask
        serial, since, share, config = parse_request(read_line(conn, REQUEST_MAX, time.monotonic() + REQUEST_WAIT))
        start = time.monotonic()
        gives_up = start + since + share - uptime()  # when the handoff stops waiting, on our clock
        try:
            keyring.assume_authority(serial)  # found in root's user keyring, where the handoff linked it
        except KeybrokerError:
            return  # not given to us: the handler does the round
        try:
            with contextlib.suppress(KeybrokerError):  # held in this thread's credentials: out of others' reach
                keyring.unlink(keyring.serial_of(keyring.REQKEY_AUTH_KEY), keyring.USER_KEYRING)
            _construct(conn, serial, config, start, gives_up - MARGIN, handoff, links, log)
        finally:
            keyring.assume_authority(0)
    except (OSError, ValueError):
        pass  # a peer gone or a malformed request: the handoff runs the handler
    finally:
        conn.close()
        slots.release()


def _construct(conn: socket.socket, serial: int, config: str, start: float, until: float, handoff: int,
               links: Links, log: Journal) -> None:
    """End the construction of ``serial`` under the authority this thread holds, as the handler would, by
    ``until`` (and never after), tell the handoff (then log, as the handler does, once the requester has its
    answer); or leave it to the handler, saying nothing."""
    from . import broker

    try:
        key = keyring.describe(serial)
        callout = keyring.read(keyring.REQKEY_AUTH_KEY)
    except KeybrokerError:
        return  # ended meanwhile (its requester revoked it, say): the handler reports what it finds
    try:
        cfg = load_config(config, code_checked=True)
    except Exception:
        # Left to the handler, which loads it itself and rejects it if it must: the agent's view
        # may lack what the handler's has (its unit hides /root, /home and /tmp).
        return
    if not _sees_the_runtime_log(cfg.measure.log.parent, writes=cfg.measure.releases, handler=handoff):
        return  # left to the handler too: the agent would read (or extend) another log than RTMR3's
    deadline = min(until, start + cfg.deadline / 2)

    def obtain() -> broker.ReleasedKey:
        request = _authorise(cfg, key.type, key.description, callout, key.uid, key.gid)
        return broker.obtain(cfg, request, deadline=deadline, links=links)

    header, value = _outcome(obtain, key.type, key.description)
    if time.monotonic() >= deadline:
        value[:] = bytes(len(value))
        return  # past its share: the handoff is about to give up on the agent, the handler does the round
    rejection, size = end(Construction(serial), lambda: _from_answer(header, value))
    conn.settimeout(1.0)
    try:
        conn.sendall(DONE)
    finally:
        log_outcome(log, serial, key, rejection, size, "agent", start)


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


def _worker(accepted: queue.SimpleQueue[socket.socket], slots: threading.BoundedSemaphore, links: Links,
            log: Journal) -> None:
    while True:
        conn = accepted.get()
        try:
            _serve_one(conn, slots, links, log)
        except Exception:  # a bug costs neither the agent a worker nor the requester its key: the handler does it
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
    # Root's user keyring, where the handoff links authorisation keys, reached by every thread.
    keyring.link(keyring.USER_KEYRING, keyring.PROCESS_KEYRING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    slots = threading.BoundedSemaphore(WORKERS)
    accepted: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
    links = Links()  # the key servers' connections, kept alive from one request to the next
    log = Journal("keybroker-request-key", stream=False, facility=10)  # the handler's syslog lines, as it logs them
    for _ in range(WORKERS):  # started once, not a thread per request
        threading.Thread(target=_worker, args=(accepted, slots, links, log), name="keybroker-agent",
                         daemon=True).start()
    notify("READY=1", f"STATUS=ending key constructions for request-key on {socket_path}")
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
        listener.close()  # new handoffs run the handler at once
        if not activated:
            socket_path.unlink(missing_ok=True)
        _drain(slots)


def _drain(slots: threading.BoundedSemaphore) -> None:
    """Let the constructions the workers hold end (each by its share of the deadline), for ``DRAIN`` seconds
    at most: stopped meanwhile, a worker could leave a key it had made possessor-only uninstantiated."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    until = time.monotonic() + DRAIN
    for _ in range(WORKERS):
        if not slots.acquire(timeout=max(0.0, until - time.monotonic())):
            return

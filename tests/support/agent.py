"""``keybroker agent`` run for a test, and a stand-in for it that takes constructions and never ends them."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from keybroker.guest import agentsocket, keyring
from support.keyctl import serials

SOCKET = Path(agentsocket.SOCKET)


@contextlib.contextmanager
def silent_agent() -> Iterator[list[socket.socket]]:
    """Listen on the agent's socket, accept every connection and say nothing; yields the connections it
    holds. Closed, and the socket removed, after."""
    SOCKET.parent.mkdir(mode=0o700, exist_ok=True)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(SOCKET))
    silent.listen(8)
    held: list[socket.socket] = []

    def hold() -> None:
        try:
            while True:
                held.append(silent.accept()[0])
        except OSError:
            return  # closed

    threading.Thread(target=hold, daemon=True).start()
    try:
        yield held
    finally:
        silent.close()
        for conn in held:
            conn.close()
        SOCKET.unlink(missing_ok=True)


def authorities_in_user_keyring() -> set[int]:
    """The serials of the keys whose construction an authorisation key in root's user keyring is for."""
    authorities = set()
    for serial in serials(keyring.USER_KEYRING):
        try:
            key = keyring.describe(serial)
        except keyring.KeyringError:
            continue  # gone meanwhile
        if key.type == ".request_key_auth":
            authorities.add(int(key.description, 16))
    return authorities


@contextlib.contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen]:
    """``command`` (one that runs ``keybroker agent``), once its socket is there; stopped, and the socket
    removed, after."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not SOCKET.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()  # type: ignore[union-attr]
        time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        SOCKET.unlink(missing_ok=True)

"""``keybroker agent`` run for a test, and a stand-in for it that takes requests and never answers them."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from keybroker.guest import agentsocket


@contextlib.contextmanager
def silent_agent(first_frame: tuple[str, int] | None = None) -> Iterator[list[socket.socket]]:
    """Listen on the agent's socket, accept every request and say nothing (but ``first_frame``, when
    given); yields the connections it holds. Closed, and the socket removed, after."""
    path = Path(agentsocket.SOCKET)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(8)
    held: list[socket.socket] = []

    def hold() -> None:
        try:
            while True:
                held.append(silent.accept()[0])
                if first_frame is not None:
                    held[-1].sendall(agentsocket.frame(*first_frame))
        except OSError:
            return  # closed

    threading.Thread(target=hold, daemon=True).start()
    try:
        yield held
    finally:
        silent.close()
        for conn in held:
            conn.close()
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen]:
    """``command`` (one that runs ``keybroker agent``), once its socket is there; stopped, and the
    socket removed, after."""
    path = Path(agentsocket.SOCKET)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()  # type: ignore[union-attr]
        time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        path.unlink(missing_ok=True)

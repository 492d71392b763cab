"""A stand-in for ``keybroker agent`` that takes requests and never answers them."""

from __future__ import annotations

import contextlib
import socket
import threading
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

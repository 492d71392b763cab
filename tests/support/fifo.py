"""Reading a FIFO that nobody writes to: a reader that opens it plainly waits for a writer for ever."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest


def outcome_of_reading(read: Callable[[Path], object], fifo: Path) -> BaseException | None:
    """What ``read(fifo)`` raised (None: nothing), failing the test if it waited for a writer (it is
    released first, so that nothing is left behind)."""
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            read(fifo)
            result.append(None)
        except BaseException as exc:  # handed to the test's thread
            result.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"reading the FIFO {fifo} waited for a writer")
    return result[0]

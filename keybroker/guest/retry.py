"""Retry with back-off, within a deadline: the one retry loop of the guest side.

The configfs-tsm client retries a busy provider, the RCAR client a key server that is not
there yet, the disk-unlock services a key request while the network comes up. Each says
which failures are worth another try; this loop decides when to stop: after ``attempts``
tries, when the next pause would pass the ``deadline`` (a ``time.monotonic()`` value), or
when the caller's ``gone()`` says nobody waits any more. The last failure is re-raised.

:func:`lock_within` waits for a file lock the same way: never past the deadline.
"""

from __future__ import annotations

import fcntl
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

SLICE = 0.2  # seconds between two looks at ``gone`` while pausing


@dataclass(frozen=True)
class Backoff:
    first: float = 0.5
    factor: float = 2.0
    cap: float = 15.0
    jitter: float = 0.0  # a fraction: 0.1 spreads each pause by +-10 %

    def pause(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (1-based)."""
        base = min(self.cap, self.first * self.factor ** min(attempt - 1, 32))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else base


class Gone(Exception):
    """The caller's ``gone()`` said nobody waits for the result any more."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"the request went away after {attempts} attempts")
        self.attempts = attempts


def never() -> bool:
    return False


def retry(attempt: Callable[[], T], *, transient: Callable[[Exception], bool], backoff: Backoff,
          deadline: float | None = None, attempts: int | None = None,
          on_retry: Callable[[int, Exception, float], None] | None = None,
          gone: Callable[[], bool] = never) -> T:
    """``attempt()`` until it succeeds; a failure that is not ``transient``, or the last one, is raised.

    ``on_retry(number, failure, pause)`` hears of each failure that is retried; a :class:`Gone`
    is raised when ``gone()`` turns true before an attempt.
    """
    for number in itertools.count(1):
        if gone():
            raise Gone(number - 1)
        try:
            return attempt()
        except Exception as exc:
            pause = backoff.pause(number)
            if (not transient(exc) or (attempts is not None and number >= attempts)
                    or (deadline is not None and time.monotonic() + pause >= deadline)):
                raise
            if on_retry is not None:
                on_retry(number, exc, pause)
        end = time.monotonic() + pause
        while (left := end - time.monotonic()) > 0 and not gone():
            time.sleep(min(SLICE, left))
    raise AssertionError("unreachable")


LOCK_POLL = 0.005  # seconds between two tries of a lock another process holds


def lock_within(fd: int, deadline: float | None) -> bool:
    """Take an exclusive ``flock`` on ``fd``, waiting at most until ``deadline`` (None: as long as it
    takes); whether it was taken. A request must not wait on a lock whose holder is stuck."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL)

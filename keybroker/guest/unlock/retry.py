"""Retry a volume's key request with back-off until the key arrives or it is time to give up.

At boot the network or the key server may not be there yet. A transient failure (the
handler's ECONNREFUSED, ETIMEDOUT, ENETUNREACH, EHOSTUNREACH, EBUSY, EIO...) is retried
after a growing pause (1, 2, 4, 8, 15, 15... seconds with 10 % jitter) while the volume's
deadline allows; each failure is reported ("waiting for key server ..., attempt 3"). A
refusal (ENOKEY, EKEYREJECTED, EACCES...) ends the wait at once: retrying cannot help.
Giving up raises :class:`UnlockGaveUp`, and the caller steps aside so that the passphrase
prompt still works. ``gone`` lets the caller stop waiting for a requester that left.
"""

from __future__ import annotations

import errno as E
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from ...errors import KeyringError, UnlockGaveUp
from .progress import INFO, NOTICE, Reporter

T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset({E.ECONNREFUSED, E.ENETUNREACH, E.EHOSTUNREACH, E.ENETDOWN, E.ETIMEDOUT,
                              E.ECONNRESET, E.EBUSY, E.EIO, E.EINTR})
SLICE = 0.2  # seconds between two looks at ``gone`` while pausing


@dataclass(frozen=True)
class Backoff:
    first: float = 1.0
    factor: float = 2.0
    cap: float = 15.0
    jitter: float = 0.1

    def pause(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (1-based)."""
        base = min(self.cap, self.first * self.factor ** min(attempt - 1, 32))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def failure(what: str, exc: Exception) -> str:
    """What stopped the wait for a key: the retry loop's own message, or a keyring error on reading it."""
    return str(exc) if isinstance(exc, UnlockGaveUp) else f"{what}: cannot read the key: {exc}"


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Retry:
    """How to wait for one volume's key: for whom, from which server, for how long."""

    what: str
    server: str
    deadline: float
    reporter: Reporter
    gone: Callable[[], bool] = _never
    backoff: Backoff = field(default_factory=Backoff)

    def run(self, attempt: Callable[[], T]) -> T:
        start = time.monotonic()
        for number in itertools.count(1):
            if self.gone():
                raise UnlockGaveUp(f"{self.what}: the request went away after {number - 1} attempts")
            try:
                result = attempt()
            except KeyringError as exc:
                if exc.errno not in TRANSIENT_ERRNOS:
                    raise UnlockGaveUp(f"{self.what}: the key was refused ({os.strerror(exc.errno)}); "
                                       "not retrying") from None
                reason = os.strerror(exc.errno)
            else:
                if number > 1:
                    self.reporter.status(f"{self.what}: key obtained at attempt {number}, after "
                                         f"{time.monotonic() - start:.1f} s", INFO)
                return result
            pause = self.backoff.pause(number)
            elapsed = time.monotonic() - start
            if elapsed + pause > self.deadline:
                raise UnlockGaveUp(f"{self.what}: giving up after {elapsed:.0f} s and {number} attempts "
                                   f"(last: {reason})")
            self.reporter.status(f"{self.what}: waiting for key server {self.server}, attempt {number}: "
                                 f"{reason}; next attempt in {pause:.0f} s", NOTICE)
            self._pause(pause)
        raise AssertionError("unreachable")

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not self.gone():
            time.sleep(min(SLICE, left))

"""Retry a volume's key request with back-off until the key arrives or it is time to give up.

At boot the network, the key server or the guest driver may not be there yet. A transient
failure (the handler's ECONNREFUSED, ETIMEDOUT, ENETUNREACH, EHOSTUNREACH, EBUSY, EIO,
ECANCELED, and ENOENT, ENXIO, ENODEV from an evidence source not loaded yet...) is retried
after a growing pause (1, 2, 4, 8, 15, 15... seconds with 10 % jitter) while the volume's
deadline allows; each failure is reported ("waiting for key server ..., attempt 3"). A
refusal (ENOKEY, EKEYREJECTED, EACCES...) ends the wait at once: retrying cannot help.
Giving up raises :class:`UnlockGaveUp`, and the caller steps aside so that the passphrase
prompt still works. ``gone`` lets the caller stop waiting for a requester that left.
"""

from __future__ import annotations

import errno as E
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ...errors import KeyringError, UnlockGaveUp
from ..retry import Backoff, Gone, never, retry
from .progress import INFO, NOTICE, Reporter

T = TypeVar("T")

#: The network or the key server not there yet; or the evidence source: at boot the guest driver
#: (sev-guest, tdx-guest) and configfs-tsm may load after the unlock starts (ENOENT: no tsm/report
#: yet; ENXIO: no provider registered yet; ENODEV: no tsm-mr register yet); or a handler that was
#: stopped by a signal (ECANCELED). Every failure the handler itself caches as transient is here.
TRANSIENT_ERRNOS = frozenset({E.ECONNREFUSED, E.ENETUNREACH, E.EHOSTUNREACH, E.ENETDOWN, E.ETIMEDOUT,
                              E.ECONNRESET, E.EBUSY, E.EIO, E.EINTR, E.ENOENT, E.ENXIO, E.ENODEV,
                              E.ECANCELED})
#: 1, 2, 4, 8, 15, 15... seconds, each spread by 10 %.
VOLUME_BACKOFF = Backoff(first=1.0, factor=2.0, cap=15.0, jitter=0.1)


def failure(what: str, exc: Exception) -> str:
    """What stopped the wait for a key: the retry loop's own message, or a keyring error on reading it."""
    return str(exc) if isinstance(exc, UnlockGaveUp) else f"{what}: cannot read the key: {exc}"


def _transient(exc: Exception) -> bool:
    return isinstance(exc, KeyringError) and exc.errno in TRANSIENT_ERRNOS


@dataclass(frozen=True)
class Retry:
    """How to wait for one volume's key: for whom, from which server, for how long."""

    what: str
    server: str
    deadline: float
    reporter: Reporter
    gone: Callable[[], bool] = never
    backoff: Backoff = field(default_factory=lambda: VOLUME_BACKOFF)

    def run(self, attempt: Callable[[], T]) -> T:
        start = time.monotonic()
        tries = [0]

        def on_retry(number: int, exc: Exception, pause: float) -> None:
            tries[0] = number
            reason = os.strerror(exc.errno) if isinstance(exc, KeyringError) else str(exc)
            self.reporter.status(f"{self.what}: waiting for key server {self.server}, attempt {number}: "
                                 f"{reason}; next attempt in {pause:.0f} s", NOTICE)

        try:
            result = retry(attempt, transient=_transient, backoff=self.backoff, deadline=start + self.deadline,
                           on_retry=on_retry, gone=self.gone)
        except Gone as exc:
            raise UnlockGaveUp(f"{self.what}: {exc}") from None
        except KeyringError as exc:
            if not _transient(exc):
                raise UnlockGaveUp(f"{self.what}: the key was refused ({os.strerror(exc.errno)}); "
                                   "not retrying") from None
            raise UnlockGaveUp(f"{self.what}: giving up after {time.monotonic() - start:.0f} s and {tries[0] + 1} "
                               f"attempts (last: {os.strerror(exc.errno)})") from None
        if tries[0]:
            self.reporter.status(f"{self.what}: key obtained at attempt {tries[0] + 1}, after "
                                 f"{time.monotonic() - start:.1f} s", INFO)
        return result

"""How a key construction is rejected: the errno and negative-cache timeout each failure gets.

The handler and the agent reject with :func:`classify`'s verdict; the table in docs/guest.md
states it for users (a test keeps the two in step). Imported by the handler on every request
it serves: errno only.
"""

from __future__ import annotations

import errno as E

TRANSIENT = 5
DENIED = 60
FAILED = 10
UNAVAILABLE = 30
FORBIDDEN_ERRNOS = {E.EAGAIN, 512, 513, 514, 516}  # EAGAIN reads as "not found"; ERESTART* are invalid
_TRANSIENT_EVIDENCE_ERRNOS = {E.EBUSY, E.ETIMEDOUT, E.ECONNREFUSED, E.ECONNRESET, E.ENETUNREACH, E.EHOSTUNREACH}


class Rejection:
    """How a construction is rejected: the errno, the negative-cache timeout, why."""

    __slots__ = ("errno", "reason", "timeout")

    def __init__(self, errno: int, timeout: int, reason: str) -> None:
        self.errno, self.timeout, self.reason = errno, timeout, reason

    def __repr__(self) -> str:
        return f"Rejection({self.errno}, {self.timeout}, {self.reason!r})"


def classify(exc: BaseException) -> Rejection:
    """The errno and negative-cache timeout a failure deserves."""
    from .. import errors as err

    reason = str(exc) or type(exc).__name__
    if isinstance(exc, Stopped):
        return Rejection(E.ECANCELED, TRANSIENT, reason)
    if isinstance(exc, (err.DescriptionError, err.ResourceMissing)):
        return Rejection(E.ENOKEY, DENIED, reason)
    if isinstance(exc, err.AccessDenied):
        return Rejection(E.EACCES, DENIED, reason)
    if isinstance(exc, err.ConfigError):
        return Rejection(E.ENOKEY, FAILED, reason)
    if isinstance(exc, err.ServerUnreachable):
        return Rejection(exc.errno, TRANSIENT, reason)
    if isinstance(exc, err.ResourceUnfit):
        return Rejection(E.EMSGSIZE, DENIED, reason)
    if isinstance(exc, err.ReleaseRefused):
        return Rejection(E.EKEYREJECTED, DENIED, reason)
    if isinstance(exc, err.ServerError) and exc.status == 429:
        return Rejection(E.EBUSY, TRANSIENT, reason)
    if isinstance(exc, err.ServerError):
        return Rejection(E.EIO if exc.status >= 500 else E.EPROTO, TRANSIENT if exc.status >= 500 else FAILED, reason)
    if isinstance(exc, err.ProtocolError):
        return Rejection(E.EPROTO, FAILED, reason)
    if isinstance(exc, err.TsmError):
        code = exc.errno if exc.errno and exc.errno not in FORBIDDEN_ERRNOS else E.EIO
        if code == E.EINTR or (exc.transient and code not in _TRANSIENT_EVIDENCE_ERRNOS):
            code = E.EBUSY  # "provider busy": unlock.retry waits out only these (ENOMEM, EPIPE: a refusal)
        return Rejection(code, TRANSIENT if exc.transient else UNAVAILABLE, reason)
    if isinstance(exc, err.KeyringError):
        return Rejection(exc.errno if exc.errno not in FORBIDDEN_ERRNOS else E.EIO, FAILED, reason)
    return Rejection(E.EIO, FAILED, f"internal error: {type(exc).__name__}: {exc}")


class Stopped(BaseException):
    """A signal stopped the handler (SIGTERM, SIGHUP, SIGINT): the construction is rejected at once."""

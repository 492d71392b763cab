"""The one exception hierarchy of keybroker.

Every error raised on purpose derives from :class:`KeybrokerError` and carries a message
a user can act on: what failed, where, and (when known) what to do about it.
"""

from __future__ import annotations


class KeybrokerError(Exception):
    """Base class of every error keybroker raises on purpose."""


class ConfigError(KeybrokerError):
    """A configuration file or option is missing, malformed or inconsistent."""


class EnvelopeError(KeybrokerError):
    """A Linux evidence envelope is malformed, oversized or of an unknown version."""


class TsmError(KeybrokerError):
    """The configfs-tsm report interface failed.

    ``errno`` is the kernel's error number when one was reported (``None`` for protocol
    failures such as a generation mismatch). ``retryable`` says whether a fresh attempt
    with a new entry may succeed; ``transient`` whether the condition is likely to clear
    by itself later (a busy or throttled provider).
    """

    def __init__(self, message: str, *, errno: int | None = None,
                 retryable: bool = False, transient: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.retryable = retryable
        self.transient = transient or retryable

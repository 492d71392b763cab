"""The one exception hierarchy of keybroker.

Every error raised on purpose derives from :class:`KeybrokerError` and carries a message
a user can act on: what failed, where, and (when known) what to do about it.
"""

from __future__ import annotations

import os


class KeybrokerError(Exception):
    """Base class of every error keybroker raises on purpose."""


class ConfigError(KeybrokerError):
    """A configuration file or option is missing, malformed or inconsistent."""


class UntrustedFile(ConfigError):
    """A file root would run or read (handler, interpreter, code, configuration) is not root's alone."""


class DescriptionError(KeybrokerError):
    """A key description or callout string is outside keybroker's grammar."""


class KeyringError(KeybrokerError):
    """A keyutils call failed; ``errno`` says why."""

    def __init__(self, call: str, errno: int) -> None:
        super().__init__(f"{call}: {os.strerror(errno)}")
        self.errno = errno


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


class ProtocolError(KeybrokerError):
    """A message breaks the KBS RCAR protocol (malformed, missing or unexpected members)."""


class EvidenceError(KeybrokerError):
    """Attestation evidence cannot be parsed: wrong size, unknown version, malformed layout."""


class EventLogError(EvidenceError):
    """An event log (TCG crypto-agile, the ACPI CCEL table, a runtime event) is malformed or oversized."""


class ServerError(KeybrokerError):
    """The key server refused a request; ``problem`` names the RFC 7807 problem type."""

    def __init__(self, message: str, *, status: int, problem: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem


class ReleaseRefused(ServerError):
    """The key server judged the request and refused it: the evidence, its binding or the policy."""


class ResourceMissing(ServerError):
    """The key server has no resource at that path."""


class ResourceUnfit(KeybrokerError):
    """A released resource cannot be a key of the type asked for (user and logon keys hold 1 to 32767 bytes)."""


class ServerUnreachable(KeybrokerError):
    """The key server could not be reached or did not answer in time; ``errno`` says how."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class PolicyError(KeybrokerError):
    """A release policy document is malformed."""


class AccessDenied(KeybrokerError):
    """The requester of a key may not obtain that resource (client access rules)."""


class SealError(KeybrokerError):
    """A resource sealed at rest cannot be opened: no key-encryption key with its id, or tampered."""


class AdminError(KeybrokerError):
    """An administrative request is malformed (resource path, value size, lease, policy) or refused."""


class StoreError(KeybrokerError):
    """The key server's database cannot be opened or does not answer."""


class UnlockRefused(KeybrokerError):
    """A request for a volume key is refused: unknown volume, foreign peer, malformed ask file."""


class UnlockGaveUp(KeybrokerError):
    """A volume key could not be obtained: permanent refusal, deadline passed, or the request went away."""

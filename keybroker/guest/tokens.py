"""Attest once, many keys: the attestation token and the tee key it is bound to, kept in the kernel.

After an attestation the handler keeps, per key server and way of making evidence, the token
``/attest`` answered and the ephemeral EC private key whose public half the attestation
bound (the server wraps every resource to it). Further requests fetch with ``Authorization:
Bearer`` and unwrap with that key, until the token expires or the server refuses it; then
they attest again.

Where they live: one ``user`` key per server and way of making evidence (privilege level,
configfs-tsm root, SVSM service, attestation broker), ``keybroker:token:<digest>``, in
the keyring ``keybroker:tokens`` linked from root's user keyring. Only root (their owner)
may view, read or change them; a requester that is not root cannot even see them. The
kernel deletes each when its token expires (``exp``, less a margin). Only a token of a JWT's
form (three base64url parts) is kept: it goes back in a header. Nothing is written to disk.
To force a fresh attestation::

    keybroker forget-tokens        # or: keyctl unlink %keyring:keybroker:tokens @u (as root)

A server's refusal of a kept token itself (NotAttested, Trustee's TokenNotFound or
TokenVerifierError: expired, signed by a key it no longer has) drops it and the request
attests again in the same run; a refusal of a resource (missing, denied) leaves it. Release
decisions stay the server's: it applies its current policy to every request, token or not.

Concurrent requests that would keep the same token share one attestation: the round that
attests holds a lock (``flock`` on ``/run/keybroker/attest-<digest>.lock``) until /attest has
answered and the token is kept; the others, waiting on it, then find the token and fetch their
keys beside its own; or, when it failed before /attest passed, fail as it did (its failure is
written in the lock file).
"""

from __future__ import annotations

import base64
import contextlib
import errno as E
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from .. import errors
from ..errors import KeybrokerError, KeyringError, ServerUnreachable
from . import keyring
from .retry import lock_within

if TYPE_CHECKING:
    from .config import ClientConfig

KEYRING = "keybroker:tokens"
LOCK_DIR = Path("/run/keybroker")
MARGIN = 10  # seconds before a token's exp that it is no longer used
LIFETIME_MAX = 24 * 3600  # seconds a token is kept at most, whatever exp it claims
TEXT_MAX = 2000  # characters of a failure's message (and of each text attribute) recorded for waiters
RECORD_MAX = 64 * 1024  # bytes of a recorded failure: characters JSON escapes take up to 6 bytes each
_FORMAT = b"keybroker-token-1\n"
_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
#: One attestation lock per token among the threads of this process (the agent's), by digest.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
os.register_at_fork(after_in_child=_THREAD_LOCKS.clear)  # a child has none of its parent's threads
#: Root (the owner) may do everything, a possessor too; group and others nothing.
_OWNER_ONLY = 0x3F3F0000


@dataclass(frozen=True)
class Held:
    """A kept token and the private key it is bound to."""

    token: str
    key: ec.EllipticCurvePrivateKey


class TokenCache:
    """The kept token of one key server for evidence made one way; usable by root only.

    A token attests the evidence it came from: another server (``server_url``, ``server_ca``), another
    privilege level, or evidence made another way (configfs-tsm root, SVSM service, SEV attestation
    broker) needs a token of its own, so all of them name the cache.
    """

    def __init__(self, config: ClientConfig, privlevel: int | None) -> None:
        attested = (config.server_url, config.server_ca, privlevel, config.tsm_root, config.service_provider,
                    config.service_guid, config.aeb)
        self.digest = hashlib.sha256(repr(attested).encode()).hexdigest()[:32]
        self.description = f"keybroker:token:{self.digest}"

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0

    def load(self) -> Held | None:
        """The kept token, or None (none kept, expired, or unreadable)."""
        ring = _keyring(create=False)
        if ring is None:
            return None
        try:
            serial = keyring.search(ring, "user", self.description)
            payload = keyring.read_secret(serial)
        except KeyringError:
            return None
        try:
            if not payload.startswith(_FORMAT) or len(payload) < len(_FORMAT) + 33:
                return None
            token = bytes(payload[len(_FORMAT):-33]).decode("ascii")
            if _expires(token) - MARGIN <= time.time():
                return None  # its expiry, not only the key's timeout, says whether it is still of use
            scalar = int.from_bytes(payload[-32:], "big")
            return Held(token, ec.derive_private_key(scalar, ec.SECP256R1()))
        except (UnicodeDecodeError, ValueError):
            return None
        finally:
            payload[:] = bytes(len(payload))

    def store(self, token: str, key: ec.EllipticCurvePrivateKey) -> None:
        """Keep ``token`` and ``key`` until the token's exp (less MARGIN, at most LIFETIME_MAX); nothing
        if it has none."""
        lifetime = min(_expires(token) - time.time() - MARGIN, LIFETIME_MAX)
        if lifetime < 1 or not _JWS.fullmatch(token):  # sent back in a header: a JWT's characters only
            return
        payload = bytearray(_FORMAT + token.encode("ascii") + b"\n")
        payload += key.private_numbers().private_value.to_bytes(32, "big")
        serial = ring = None
        try:
            ring = _keyring(create=True)
            assert ring is not None
            serial = keyring.add_key("user", self.description, payload, ring)
            keyring.setperm(serial, _OWNER_ONLY)
            keyring.set_timeout(serial, int(lifetime))
        except KeyringError:  # a token not kept costs the next request an attestation, nothing else
            if serial is not None and ring is not None:
                with contextlib.suppress(KeyringError):
                    keyring.unlink(serial, ring)  # never kept without its expiry
        finally:
            payload[:] = bytes(len(payload))

    def drop(self) -> None:
        ring = _keyring(create=False)
        if ring is None:
            return
        with contextlib.suppress(KeyringError):
            keyring.unlink(keyring.search(ring, "user", self.description), ring)

    @property
    def lock_path(self) -> Path:
        """The file of this token's attestation lock (see :meth:`attesting`)."""
        return LOCK_DIR / f"attest-{self.digest}.lock"

    @contextlib.contextmanager
    def attesting(self, deadline: float) -> Iterator[AttestationLock]:
        """Hold this token's attestation lock (waiting for it at most until ``deadline``) until the
        block ends or :meth:`AttestationLock.release`.

        Between processes it is a file lock, which a waiter polls; the agent's threads first take
        a thread lock of the process's, which wakes a waiting thread as soon as it is released."""
        threads = _THREAD_LOCKS.setdefault(self.digest, threading.Lock())
        if not threads.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _not_in_time()
        lock = None
        try:
            LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if not lock_within(fd, deadline):
                    raise _not_in_time()
                lock = AttestationLock(fd, threads)
                yield lock
            finally:
                os.close(fd)  # releases the file lock (so does the process's death)
        finally:
            if lock is None or not lock.released:
                threads.release()


class AttestationLock:
    """The held attestation lock, whose file says how the last attestation that failed failed (and when,
    in CLOCK_MONOTONIC time): requests that waited for it fail as it did, without attesting one by one."""

    def __init__(self, fd: int, threads: threading.Lock) -> None:
        self.fd, self._threads = fd, threads
        self.released = False

    def release(self) -> None:
        """Let the requests waiting for this attestation go on (its token is kept): before the block ends."""
        if not self.released:
            self.released = True
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self._threads.release()

    def record(self, exc: KeybrokerError) -> None:
        attrs = {name: value[:TEXT_MAX] if isinstance(value, str) else value
                 for name, value in vars(exc).items() if isinstance(value, int | str | None)}
        data = json.dumps({"at": time.monotonic(), "type": type(exc).__name__, "message": str(exc)[:TEXT_MAX],
                           "attrs": attrs}).encode()
        if len(data) > RECORD_MAX:  # what failure_since would not read whole: the waiting requests attest
            return
        with contextlib.suppress(OSError):  # not recorded: the waiting requests attest themselves
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)

    def failure_since(self, since: float) -> KeybrokerError | None:
        """The failure of an attestation that ended after ``since``, as its request saw it; None if none did."""
        try:
            record = json.loads(os.pread(self.fd, RECORD_MAX, 0))
            kind = getattr(errors, record["type"])
            if record["at"] < since or not (isinstance(kind, type) and issubclass(kind, KeybrokerError)):
                return None
            exc = kind.__new__(kind)
            Exception.__init__(exc, f"the attestation this request waited for failed: {record['message']}")
            exc.__dict__.update(record["attrs"])
            return exc
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # none recorded (an empty file), or not by this code


def _not_in_time() -> ServerUnreachable:
    return ServerUnreachable("another request's attestation to this key server did not end in time", errno=E.ETIMEDOUT)


def forget_all() -> bool:
    """Drop every kept token (unlink the keyring); whether there was one."""
    try:
        ring = keyring.search(keyring.USER_KEYRING, "keyring", KEYRING)
    except KeyringError:
        return False
    keyring.unlink(ring, keyring.USER_KEYRING)
    return True


def _keyring(*, create: bool) -> int | None:
    # The handler's worker runs in the requester's session, which does not reach root's user
    # keyring: linked from the worker's process keyring, root possesses what it keeps there
    # (and may set permissions and expiry). That keyring goes with the worker. (Only for the
    # handler: a process keyring that reaches @u changes what request_key finds for it.)
    keyring.link(keyring.USER_KEYRING, keyring.PROCESS_KEYRING)
    try:
        return keyring.search(keyring.USER_KEYRING, "keyring", KEYRING)
    except KeyringError:
        if not create:
            return None
    ring = keyring.add_key("keyring", KEYRING, b"", keyring.USER_KEYRING)
    keyring.setperm(ring, _OWNER_ONLY)
    return ring


def _expires(token: str) -> float:
    """The ``exp`` of a JWT (not verified: it only says how long to keep it), 0 if it has none."""
    parts = token.split(".")
    if len(parts) != 3:
        return 0
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return 0
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return 0
    try:
        value = float(exp)
    except OverflowError:  # an integer past any float
        return 0
    return value if math.isfinite(value) else 0  # NaN and infinities are no time

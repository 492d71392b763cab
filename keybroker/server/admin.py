"""Administration: put, delete and list resources and release policies, audited.

:class:`Admin` does the work for the HTTP admin API (``/admin/v1``, authenticated by
:class:`AdminAuth`) and for the local commands (``keybroker resource … --db``): it checks
the request, seals values under the KEK, and every change lands in the audit log with who
made it. Values never leave through the admin API; only a local ``resource get`` (which
holds the database and the KEK anyway) reads them back, and that is audited too.

Admin tokens come from ``--admin-token-file`` or the systemd credential ``admin-token``:
one token per line, at least 32 characters (``openssl rand -hex 32``). Several lines let
an operator rotate tokens without a gap. Tokens are compared in constant time and known
in logs and the audit log only by their fingerprint (the first 12 hex digits of SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdminError, ConfigError, DescriptionError
from ..wire.resource import VALUE_MAX, ResourcePath
from . import secretfile
from .audit import ADMIN, ALLOW, Event, Record
from .policy import NONE, Policy
from .sealing import Sealer
from .store import PolicyInfo, PolicyVersion, ResourceInfo, Store

ADMIN_PREFIX = "/admin/v1"
LEASE_MAX = 10 * 365 * 24 * 3600
ADMIN_TOKEN_CREDENTIAL = "admin-token"
TOKEN_MIN, TOKEN_MAX = 32, 512
_TOKEN = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Admin:
    """One administrator's view: ``actor`` and ``peer`` go into each audit record."""

    store: Store
    sealer: Sealer | None  # None: this caller cannot put or read values (no KEK given)
    actor: str
    server: str
    peer: str = ""

    # -- resources -----------------------------------------------------------------------

    def put_resource(self, path: str, value: bytes, lease: int | None = None) -> Record:
        name = resource_name(path)
        if not 1 <= len(value) <= VALUE_MAX:
            raise AdminError(f"a resource is 1 to {VALUE_MAX} bytes, got {len(value)}")
        if lease is not None and not 1 <= lease <= LEASE_MAX:
            raise AdminError(f"lease must be 1 to {LEASE_MAX} seconds, got {lease}")
        sealed = self._sealer("put").seal(name, value, lease)
        reason = f"put resource ({len(value)} bytes" + (f", lease {lease} s)" if lease else ")")
        return self.store.put_resource(name, sealed, lease, self._event(reason, name))

    def delete_resource(self, path: str) -> bool:
        name = resource_name(path)
        return self.store.delete_resource(name, self._event("deleted resource", name)) is not None

    def read_resource(self, path: str) -> bytes | None:
        """The value of ``path`` (None when absent), read locally; the read is audited."""
        name = resource_name(path)
        stored = self.store.get_resource(name)
        if stored is None:
            return None
        value = self._sealer("get").open(name, stored.sealed, stored.lease)
        self.store.audit(self._event("read resource value (local)", name))
        return value

    def list_resources(self) -> list[ResourceInfo]:
        return self.store.list_resources()

    def rotate_kek(self) -> Record:
        sealer = self._sealer("rotate-kek")
        return self.store.rewrap_resources(
            sealer, lambda count: self._event(f"re-wrapped {count} resources under KEK {sealer.current.id}", ""))

    # -- policies ------------------------------------------------------------------------

    def put_policy(self, text: str | bytes) -> tuple[int, bool]:
        """Make the policy document ``text`` active: (its version, whether that is a new version)."""
        policy = Policy.loads(text)
        return self.store.put_policy(policy, self._event(f"set release policy (sha256 {policy.digest})", "policy"))

    def reset_policy(self) -> tuple[int, bool]:
        """Remove the release policy (stored as the next version, without rules): nothing is released."""
        return self.store.put_policy(NONE, self._event("removed the release policy: nothing is released",
                                                       "policy"))

    def get_policy(self, version: int | None = None) -> PolicyVersion | None:
        return self.store.active_policy() if version is None else self.store.get_policy(version)

    def list_policies(self) -> list[PolicyInfo]:
        return self.store.list_policies()

    def _sealer(self, action: str) -> Sealer:
        if self.sealer is None:
            raise AdminError(f"{action} needs the key-encryption key: give --kek-file")
        return self.sealer

    def _event(self, reason: str, resource: str) -> Event:
        return Event(ADMIN, ALLOW, reason, self.server, peer=self.peer, actor=self.actor, resource=resource)


def resource_name(path: str) -> str:
    try:
        return str(ResourcePath.parse(path))
    except DescriptionError as exc:
        raise AdminError(str(exc)) from None


TOKEN_GRAMMAR = (f"a token is {TOKEN_MIN} to {TOKEN_MAX} printable ASCII characters without spaces (make one with: "
                 "openssl rand -hex 32)")


def is_token(text: str) -> bool:
    """Whether ``text`` is an admin token (``TOKEN_GRAMMAR``): what a server accepts, and a header carries."""
    return TOKEN_MIN <= len(text) <= TOKEN_MAX and _TOKEN.fullmatch(text) is not None


@dataclass(frozen=True)
class AdminAuth:
    """The admin tokens a server accepts, kept as SHA-256 digests."""

    digests: tuple[bytes, ...]

    @classmethod
    def load(cls, path: Path | None) -> AdminAuth | None:
        """The tokens of ``--admin-token-file`` (or the ``admin-token`` credential); None: admin API off."""
        located = secretfile.locate(path, ADMIN_TOKEN_CREDENTIAL)
        if located is None:
            return None
        digests = []
        for number, line in enumerate(secretfile.read(located, "admin token file").decode(errors="replace")
                                      .splitlines(), 1):
            token = line.strip()
            if not token:
                continue
            if not is_token(token):
                raise ConfigError(f"admin token file {located}, line {number}: {TOKEN_GRAMMAR}")
            digests.append(hashlib.sha256(token.encode()).digest())
        if not digests:
            raise ConfigError(f"admin token file {located} holds no token")
        return cls(tuple(digests))

    def actor(self, token: str) -> str | None:
        """``token:<fingerprint>`` when ``token`` is one of ours, else None (constant time)."""
        presented = hashlib.sha256(token.encode(errors="replace")).digest()
        match = None
        for digest in self.digests:
            if hmac.compare_digest(presented, digest):
                match = digest
        return None if match is None else f"token:{match.hex()[:12]}"

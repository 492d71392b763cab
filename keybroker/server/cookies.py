"""RCAR session cookies that carry their own proof: /auth keeps no state.

/auth answers with a nonce and a cookie ``<id>.<tee>.<expires>.<mac>``: a random session id,
the TEE the guest named, when the session ends (Unix seconds), and an HMAC-SHA-256 (cut to
128 bits) over those and the nonce. /attest checks the MAC with the nonce the attestation
names: the cookie proves that this server issued that nonce to that session until then. It
does not prove that the nonce is unspent: the attestation's transaction does, by inserting
the session (its id is the key) only if it is not there yet.

The MAC key is derived (HKDF-SHA-256, its own label) from the KEK, which every replica has:
any replica checks the cookies of the replicas with the same KEK. Cookies are made under
the current KEK and checked under it and the previous ones: after a rotation, cookies made
before it still open; during a rolling restart, a replica not yet given the new KEK refuses
the cookies made under it (their guests call /auth again). A flood of /auth costs CPU only:
nothing is written for a session until it attests.

A session that attested is stored, and another worker or replica may read it back to
release under its cookie: its row carries a MAC too (see :class:`.sealing.RowMac`), so that
someone who can write the database but has no KEK cannot make a session attested, nor
change its claims or its key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from .sealing import Sealer

_COOKIE = re.compile(r"([0-9a-f]{32})\.([a-z]{1,16})\.(0|[1-9][0-9]{0,11})\.([A-Za-z0-9_-]{22})")  # one spelling each
_INFO = b"keybroker rcar session cookie v1"


@dataclass(frozen=True)
class Fresh:
    """A session /auth opened: its id, TEE, nonce and end (Unix seconds)."""

    id: str
    tee: str
    nonce: str
    expires: int


class SessionCookies:
    def __init__(self, sealer: Sealer) -> None:
        self._keys = sealer.derived_keys(_INFO)

    def issue(self, tee: str, nonce: str, lifetime: int) -> tuple[Fresh, str]:
        """A new session for ``tee`` and ``nonce``, and its cookie."""
        fresh = Fresh(secrets.token_hex(16), tee, nonce, int(time.time()) + lifetime)
        return fresh, f"{fresh.id}.{fresh.tee}.{fresh.expires}.{_mac(self._keys[0], fresh)}"

    def open(self, cookie: str, nonce: str) -> Fresh | None:
        """The unexpired session that ``cookie`` names, if this server issued it with ``nonce``; else None."""
        match = _COOKIE.fullmatch(cookie)
        if match is None:
            return None
        fresh = Fresh(match[1], match[2], nonce, int(match[3]))
        if fresh.expires <= time.time():
            return None
        mac = match[4].encode()
        return fresh if any(hmac.compare_digest(_mac(key, fresh).encode(), mac) for key in self._keys) else None

    @staticmethod
    def session_id(cookie: str) -> str | None:
        """The session id a well-formed cookie names (its session is looked up, not trusted)."""
        match = _COOKIE.fullmatch(cookie)
        return match[1] if match else None


def _mac(key: bytes, fresh: Fresh) -> str:
    message = "\0".join((fresh.id, fresh.tee, str(fresh.expires), fresh.nonce)).encode()
    return base64.urlsafe_b64encode(hmac.digest(key, message, hashlib.sha256)[:16]).rstrip(b"=").decode()


"""The key server's RCAR logic, independent of HTTP: auth, attest, resource release.

A key is released only after the evidence's signature and chain verified under the
trusted roots, REPORT_DATA bound the session's single-use nonce and the tee-pubkey, and
the release policy allowed the appraised claims that resource.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwcrypto import jwe, jwk

from .. import envelope
from ..description import ResourcePath
from ..errors import DescriptionError, EnvelopeError, ProtocolError
from ..policy import Policy
from ..rcar import protocol as p
from ..verifier import Context, Evidence, TrustStore, verify
from .store import Store
from .tokens import TokenSigner

log = logging.getLogger("keybroker.server")

SESSION_LIFETIME = 300  # seconds, as Trustee's default


class Problem(Exception):
    """An RFC 7807 problem to answer with."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(detail)
        self.name = name
        self.detail = detail

    @property
    def status(self) -> int:
        return p.STATUS[self.name]


@dataclass(frozen=True)
class Release:
    jwe: dict[str, str]
    lease: int | None


@dataclass
class KeyServer:
    store: Store
    trust: TrustStore
    policy: Policy
    tokens: TokenSigner
    certs: tuple[Path, ...] = ()
    kds_url: str | None = None
    cache_dir: Path | None = None
    pcs_url: str | None = None

    # -- POST /kbs/v0/auth ---------------------------------------------------------------

    def auth(self, body: Any) -> tuple[str, dict[str, Any]]:
        try:
            request = p.AuthRequest.from_json(body)
        except ProtocolError as exc:
            raise Problem(p.BAD_REQUEST, str(exc)) from None
        if request.version != p.VERSION:
            raise Problem(p.PROTOCOL_VERSION, f"KBS protocol version mismatch: expected ={p.VERSION}, "
                                              f"the request is {request.version[:32]}")
        if request.tee not in p.PROVIDER_BY_TEE:
            raise Problem(p.BAD_REQUEST, f"tee {request.tee[:32]!r} is not supported "
                                         f"(supported: {', '.join(p.PROVIDER_BY_TEE)})")
        session_id = uuid.uuid4().hex
        nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        self.store.create_session(session_id, request.tee, nonce, SESSION_LIFETIME)
        return session_id, p.Challenge(nonce).to_json()

    # -- POST /kbs/v0/attest -------------------------------------------------------------

    def attest(self, session_id: str | None, body: Any) -> dict[str, str]:
        try:
            attestation = p.Attestation.from_json(body)
        except ProtocolError as exc:
            raise Problem(p.BAD_REQUEST, str(exc)) from None
        session = self.store.consume_nonce(session_id, attestation.nonce) if session_id else None
        if session is None:
            raise Problem(p.UNKNOWN_SESSION, "no session with this cookie and nonce: it expired, its nonce "
                                             "was already used, or /auth was not called")
        try:
            claims = self._appraise(session.tee, attestation)
        except Problem:
            self.store.finish_attestation(session.id, claims=None, tee_pubkey=None)
            raise
        self.store.finish_attestation(session.id, claims=claims, tee_pubkey=attestation.tee_pubkey)
        log.info("attest session=%s tee=%s result=verified measurement=%s", session.id, session.tee,
                 claims.get("measurement", "?"))
        return {"token": self.tokens.issue(session.tee, attestation.tee_pubkey, claims)}

    def _appraise(self, tee: str, attestation: p.Attestation) -> dict[str, Any]:
        try:
            report = envelope.from_json(attestation.primary_evidence)
        except EnvelopeError as exc:
            raise Problem(p.BAD_REQUEST, f"primary evidence: {exc}") from None
        if report.provider != p.PROVIDER_BY_TEE[tee]:
            raise Problem(p.BAD_REQUEST, f"evidence from provider {report.provider} does not match tee {tee}")
        expected = p.report_data(attestation.nonce, attestation.tee_pubkey)
        if report.inblob != expected:
            raise Problem(p.ATTESTATION_DENIED, "binding: the evidence's inblob is not SHA-384 of this "
                                                "session's nonce and tee-pubkey")
        try:
            jwk.JWK(**attestation.tee_pubkey)
        except (ValueError, TypeError, jwk.InvalidJWKValue) as exc:
            raise Problem(p.BAD_REQUEST, f"tee-pubkey is not a valid key: {exc}") from None
        context = Context(self.trust, at=dt.datetime.now(dt.timezone.utc), nonce=expected, certs=self.certs,
                          kds_url=self.kds_url, cache_dir=self.cache_dir, pcs_url=self.pcs_url)
        verdict = verify(Evidence.from_report(report), context)
        if not verdict.ok:
            raise Problem(p.ATTESTATION_DENIED, f"evidence did not verify: {verdict.reason()}")
        return verdict.claims

    # -- GET /kbs/v0/resource/<repo>/<type>/<tag> ----------------------------------------

    def authenticate(self, session_id: str | None, bearer: str | None) -> tuple[dict[str, str], dict[str, Any]]:
        """The (tee-pubkey, claims) of an attested session cookie or attestation token."""
        if bearer is not None:
            token = self.tokens.verify(bearer)
            if token is None:
                raise Problem(p.NOT_ATTESTED, "the Bearer token is invalid or expired: attest again")
            return token["tee-pubkey"], token["claims"]
        session = self.store.get_session(session_id) if session_id else None
        if session is None or session.state != "attested" or session.expires < time.time():
            raise Problem(p.NOT_ATTESTED, "this session is not attested (or expired): call /auth and /attest")
        assert session.tee_pubkey is not None and session.claims is not None
        return session.tee_pubkey, session.claims

    def resource(self, path: str, tee_pubkey: dict[str, str], claims: dict[str, Any]) -> Release:
        try:
            name = str(ResourcePath.parse(path))
        except DescriptionError as exc:
            raise Problem(p.BAD_REQUEST, str(exc)) from None
        stored = self.store.get_resource(name)
        if stored is None:
            raise Problem(p.RESOURCE_NOT_FOUND, f"resource {name} does not exist")
        decision = self.policy.decide(name, claims)
        if not decision.allowed:
            raise Problem(p.POLICY_DENIED, f"release of {name} denied by policy: {decision.reason}")
        return Release(wrap(stored.value, tee_pubkey), stored.lease)


def wrap(plaintext: bytes, tee_pubkey: dict[str, str]) -> dict[str, str]:
    """A flattened JWE (ECDH-ES+A256KW, A256GCM) with the ephemeral key in the protected header."""
    token = jwe.JWE(plaintext, protected=json.dumps({"alg": p.KEY_ALGORITHM, "enc": p.CONTENT_ENCRYPTION}))
    token.add_recipient(jwk.JWK(**tee_pubkey))
    # The compact form moves epk into the protected header (as Trustee's clients expect it);
    # its five parts are exactly the flattened JSON serialization's members.
    protected, encrypted_key, iv, ciphertext, tag = token.serialize(compact=True).split(".")
    return {"protected": protected, "encrypted_key": encrypted_key, "iv": iv, "ciphertext": ciphertext,
            "tag": tag}

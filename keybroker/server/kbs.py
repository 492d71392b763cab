"""The key server's RCAR logic, independent of HTTP: auth, attest, resource release.

A key is released only after the evidence's signature and chain verified under the
trusted roots, REPORT_DATA bound the session's single-use nonce and the tee-pubkey, and
the active release policy allowed the appraised claims that resource.

Every attestation but those whose evidence proved nothing (see ``Verdict.proven``), every
release and every refusal (but a session's refusals past ``REFUSALS_MAX``) is appended to the
audit log before the answer is returned: when a guest holds a key, the log already says so.

The steps are coroutines for the HTTP workers' event loops: they await their writes and their
short reads (made in place with SQLite, on the store's threads with PostgreSQL: see store).
Evidence is verified in place, with collateral from the
evidence, the operator's folders or the cache; a large attestation (event logs, long
certificate chains: more than ``INLINE_MAX`` bytes), and evidence whose collateral must
first be fetched (a VCEK from AMD's KDS, TDX collateral from Intel's PCS), is verified on a
thread instead, so that the loop waits neither on the network nor on a long replay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from ..errors import DescriptionError, EnvelopeError, EvidenceError, ProtocolError, SealError
from ..verifier import Context, Evidence, Fetcher, TrustStore, verify
from ..verifier.devices import appraise as appraise_devices
from ..verifier.fetch import WouldFetch
from ..wire import envelope, initdata, jwe, trustee
from ..wire import rcar as p
from ..wire.resource import ResourcePath
from .audit import ALLOW, ATTEST, DENY, RELEASE, Event
from .cookies import SessionCookies
from .metrics import Metrics
from .sealing import Sealer
from .sessions import Session
from .store import PolicyVersion, Store, StoredResource
from .tokens import TokenSigner

log = logging.getLogger("keybroker.server")

SESSION_LIFETIME = 300  # seconds, as Trustee's default
INLINE_MAX = 32 * 1024  # bytes of an attestation verified on the event loop; larger ones on a thread
#: Refusals of one attested session (its cookie or its token) a worker audits; beyond, they
#: are answered as before and counted, not recorded: a guest that asks again and again for
#: what it may not have costs the audit log at most this many records per attestation, worker
#: and replica. A server fault (a resource that does not unseal) is always recorded.
REFUSALS_MAX = 64
#: Sessions whose refusals a worker counts, each for SESSION_LIFETIME from its first refusal
#: (it has ended by then). When as many live sessions were refused, the refusals of others are
#: not recorded: filling the table takes that many genuine attestations, each one recorded.
REFUSALS_TRACKED = 65536
#: Times a release is decided again when the policy or the resource changed before its record
#: was committed (each change committed meanwhile makes one more try).
RELEASE_TRIES = 3
#: Resources whose last release a worker remembers the read of (the sealed value it was decided on,
#: under the newest policy version it released under), to decide the next one on without reading.
RELEASES_REMEMBERED = 256


DETAIL_MAX = 1024  # characters of a problem's detail: what an answer or a log line says at most


class Problem(Exception):
    """An RFC 7807 problem to answer with; ``cause`` is its short name for metrics. ``proven``: the
    refusal of an attestation whose evidence came from a trusted TEE for its session (see
    ``Verdict.proven``), which is recorded; any other refused attestation proves nothing."""

    def __init__(self, name: str, detail: str, cause: str | None = None, *, proven: bool = False) -> None:
        detail = detail if len(detail) <= DETAIL_MAX else detail[:DETAIL_MAX] + "..."
        super().__init__(detail)
        self.name = name
        self.detail = detail
        self.cause = cause or "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
        self.proven = proven

    @property
    def status(self) -> int:
        return p.STATUS[self.name]


@dataclass(frozen=True)
class ResourceAnswer:
    jwe: dict[str, str]
    lease: int | None
    audit: str  # the hash of the release's audit record


def _unknown_session() -> Problem:
    return Problem(p.UNKNOWN_SESSION, "no session with this cookie and nonce: it expired, its nonce was already "
                                      "used, or /auth was not called")


def evidence_form(primary: Any) -> str:
    """``envelope`` for keybroker's envelope (it has a ``provider``), else ``trustee`` (Trustee's per-TEE form)."""
    return "envelope" if isinstance(primary, dict) and "provider" in primary else "trustee"


def _evidence(tee: str, primary: Any) -> Evidence:
    """The primary evidence, read in its form."""
    if evidence_form(primary) == "envelope":
        report = envelope.from_json(primary)
        if report.provider != p.PROVIDER_BY_TEE[tee]:
            raise EvidenceError(f"the envelope is from provider {report.provider}, not {p.PROVIDER_BY_TEE[tee]} "
                                f"(tee {tee})")
        evidence = Evidence.from_report(report)
    else:
        blobs = trustee.from_json(tee, primary)
        evidence = Evidence(blobs.provider, blobs.outblob, blobs.auxblob, event_log=blobs.event_log)
    if evidence.event_log and evidence.provider != "tdx_guest":
        # Only a TD's registers replay an event log: elsewhere it would be claims nothing checked.
        raise EvidenceError(f"an event log came with {evidence.provider} evidence; only TDX evidence carries one")
    return evidence


def session_ref(session_id: str | None) -> str:
    """How the audit log names a session: a digest of its id, never the id (it authenticates) itself."""
    return hashlib.sha256(session_id.encode(errors="replace")).hexdigest()[:16] if session_id else ""


@dataclass
class KeyServer:
    store: Store
    sealer: Sealer
    trust: TrustStore
    tokens: TokenSigner
    metrics: Metrics
    name: str  # this replica, in the audit log
    certs: tuple[Path, ...] = ()
    kds_url: str | None = None
    fetcher: Fetcher = field(default_factory=Fetcher)
    pcs_url: str | None = None
    collateral: Path | None = None
    cookies: SessionCookies = field(init=False)
    _refusals: dict[str, tuple[float, int]] = field(init=False, default_factory=dict)  # (forget at, count)
    _released: dict[str, StoredResource] = field(init=False, default_factory=dict)  # released under:
    _released_under: PolicyVersion | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.cookies = SessionCookies(self.sealer)

    # -- POST /kbs/v0/auth ---------------------------------------------------------------

    async def auth(self, body: Any) -> tuple[str, dict[str, Any]]:
        """The session cookie and the challenge; nothing is stored (see cookies)."""
        try:
            request = p.AuthRequest.from_json(body)
        except ProtocolError as exc:
            raise Problem(p.BAD_REQUEST, str(exc)) from None
        if not p.version_accepted(request.version):
            raise Problem(p.PROTOCOL_VERSION, f"KBS protocol version mismatch: expected ={p.VERSION}, "
                                              f"the request is {request.version[:32]!r}")
        if request.tee not in p.PROVIDER_BY_TEE:
            raise Problem(p.BAD_REQUEST, f"tee {request.tee[:32]!r} is not supported "
                                         f"(supported: {', '.join(p.PROVIDER_BY_TEE)})")
        nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        _, cookie = self.cookies.issue(request.tee, nonce, SESSION_LIFETIME)
        return cookie, p.Challenge(nonce, envelope=request.envelope).to_json()

    # -- POST /kbs/v0/attest -------------------------------------------------------------

    async def attest(self, cookie: str | None, body: Any, peer: str, *, size: int) -> dict[str, str]:
        """The attestation token for ``body`` (``size`` bytes as sent) under the session of ``cookie``."""
        # Until a session's nonce is spent the caller has proven nothing: refusals are counted,
        # not audited (the audit log is for what sessions did, not for what anybody sent).
        try:
            attestation = p.Attestation.from_json(body)
        except ProtocolError as exc:
            raise self._count(Problem(p.BAD_REQUEST, str(exc))) from None
        fresh = self.cookies.open(cookie, attestation.nonce) if cookie else None
        if fresh is None or self.store.stored_here(fresh.id):
            raise self._count(_unknown_session())
        failed = Session(fresh.id, fresh.tee, fresh.nonce, "failed", fresh.expires, None, None)
        event = Event(ATTEST, DENY, "", self.name, peer=peer, session=session_ref(fresh.id), provider=fresh.tee)
        try:
            claims = await self._appraised(fresh.tee, attestation, size)
        except Problem as problem:
            # A genuine TEE refused (its TCB, its devices) is on the record, and its nonce spent.
            # Evidence that proved nothing costs no write: the audit log is not a stranger's to
            # grow, and the nonce stays unspent for as long as its cookie lasts.
            if problem.proven:
                recorded = await self.store.end_attestation(failed, replace(event, reason=problem.detail))
                if recorded is None:
                    raise self._count(_unknown_session()) from None
            self.metrics.attestation(fresh.tee, False)
            raise self._count(problem) from None
        except BaseException:
            # Never left open to another try; the first error is the one. Shielded: this task
            # may be being cancelled, the nonce is spent all the same.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.end_attestation(failed, replace(event, reason="internal error")))
            raise
        allowed = replace(event, decision=ALLOW, reason="evidence verified and bound to the session",
                          measurement=str(claims.get("measurement", "")))
        attested = replace(failed, state="attested", claims=claims, tee_pubkey=attestation.tee_pubkey)
        if await self.store.end_attestation(attested, allowed) is None:
            raise self._count(_unknown_session())  # spent already, or meanwhile by a concurrent /attest
        self.metrics.attestation(fresh.tee, True)
        log.info("attest peer=%s session=%s tee=%s form=%s result=verified measurement=%s", peer, event.session,
                 fresh.tee, evidence_form(attestation.primary_evidence), claims.get("measurement", "?"))
        return {"token": self.tokens.issue(fresh.tee, fresh.id, fresh.expires)}

    async def _appraised(self, tee: str, attestation: p.Attestation, size: int) -> dict[str, Any]:
        if size <= INLINE_MAX:
            try:
                return self._appraise(tee, attestation, self.fetcher.offline())
            except WouldFetch:
                pass
        return await asyncio.to_thread(self._appraise, tee, attestation, self.fetcher)

    def _appraise(self, tee: str, attestation: p.Attestation, fetcher: Fetcher) -> dict[str, Any]:
        """Verify the evidence and its binding to the session; its claims, with init-data's and devices'."""
        try:
            evidence = _evidence(tee, attestation.primary_evidence)
            devices = trustee.device_evidence(attestation.additional_evidence)
            init_data = initdata.from_json(attestation.init_data) if attestation.init_data is not None else None
        except (EnvelopeError, EvidenceError) as exc:
            raise Problem(p.ATTESTATION_DENIED, f"evidence: {exc}", "evidence_format") from None
        expected = p.report_data(attestation.nonce, attestation.tee_pubkey, attestation.additional_evidence)
        if evidence.inblob is not None and evidence.inblob != expected:
            raise Problem(p.ATTESTATION_DENIED, "binding: the evidence's inblob is not SHA-384 of this "
                                                "session's nonce, tee-pubkey and device evidence", "binding")
        context = Context(self.trust, at=dt.datetime.now(dt.UTC), nonce=expected,
                          init_data=init_data.digest if init_data else None, certs=self.certs,
                          kds_url=self.kds_url, fetcher=fetcher, pcs_url=self.pcs_url,
                          collateral=self.collateral)
        verdict = verify(evidence, context)
        if not verdict.ok:
            failed = verdict.failures[0].name if verdict.failures else "no_check"
            raise Problem(p.ATTESTATION_DENIED, f"evidence did not verify: {verdict.reason()}", f"evidence_{failed}",
                          proven=verdict.proven)
        try:
            device_claims = appraise_devices(devices, attestation.nonce, attestation.tee_pubkey)
        except EvidenceError as exc:
            raise Problem(p.ATTESTATION_DENIED, f"device evidence: {exc}", "device_evidence", proven=True) from None
        return verdict.claims | device_claims | (init_data.claims() if init_data else {})

    # -- GET /kbs/v0/resource/<repo>/<type>/<tag> ----------------------------------------

    async def release(self, path: str, cookie: str | None, bearer: str | None, peer: str) -> ResourceAnswer:
        """Release ``path`` to an attested session (cookie) or attestation token (Bearer)."""
        try:
            name = str(ResourcePath.parse(path))
        except DescriptionError as exc:
            raise self._count(Problem(p.BAD_REQUEST, str(exc))) from None
        tee_pubkey, claims, session = await self._authenticate(cookie, bearer)
        stored = self._released.get(name)
        remembered = (self._released_under, stored) if self._released_under and stored else None
        for attempt in range(RELEASE_TRIES + (remembered is not None)):  # a remembered read is no try
            answer = await self._release(name, tee_pubkey, claims, session, peer, remembered if attempt == 0 else None)
            if answer is not None:
                return answer
        raise self._count(Problem(p.UNAVAILABLE, f"the release policy or resource {name} changed while it was "
                                                 f"being released, {RELEASE_TRIES} times; try again"))

    async def _release(self, name: str, tee_pubkey: dict[str, str], claims: dict[str, Any], session: str,
                       peer: str, remembered: tuple[PolicyVersion, StoredResource] | None) -> ResourceAnswer | None:
        """Release ``name`` under the active policy; None when that policy or the resource changed
        before the release was recorded (what a newer version or a deletion refuses is never sent).
        Decided on what the last release of ``name`` was, if ``remembered``: a release is recorded
        only if that is still the newest (Store.released), a refusal is decided again (None)."""
        event = Event(RELEASE, DENY, "", self.name, peer=peer, resource=name)
        active, stored = remembered or await self.store.for_release(name)
        event = replace(event, session=session, provider=str(claims.get("tee", "")),
                        measurement=str(claims.get("measurement", "")), policy_version=active.version)
        decision = active.policy.decide(name, claims)
        if not decision.allowed and remembered:
            return None
        if not decision.allowed:
            await self._refuse(Problem(p.POLICY_DENIED, f"release of {name} denied by policy version "
                                                        f"{active.version}: {decision.reason}",
                                       f"policy_{decision.cause}"), event)
        if stored is None:
            await self._refuse(Problem(p.RESOURCE_NOT_FOUND, f"resource {name} does not exist"), event)
        try:
            value = self.sealer.open(name, stored.sealed, stored.lease)
        except SealError as exc:
            log.error("resource %s: %s", name, exc)
            await self._refuse(Problem(p.INTERNAL, f"resource {name} cannot be unsealed on this server; see its "
                                                   "log", "unseal"), event)
        wrapped = jwe.wrap(value, tee_pubkey)
        record = await self.store.released(active, stored, replace(event, decision=ALLOW, reason=decision.reason))
        self._released.pop(name, None)
        if record is None:
            return None
        self._remember(name, active, stored)
        self.metrics.release(event.provider)
        log.info("resource peer=%s session=%s path=%s result=released audit=%d", peer, session, name, record.seq)
        return ResourceAnswer(wrapped, stored.lease, record.hash)

    def _remember(self, name: str, active: PolicyVersion, stored: StoredResource) -> None:
        """Remember what the release of ``name`` just recorded was decided on: under one policy
        version, the newest here (a release is recorded only under the active one)."""
        under = self._released_under
        if under is None or (under.version, under.digest) != (active.version, active.digest):
            self._released.clear()
            self._released_under = active
        if len(self._released) >= RELEASES_REMEMBERED:
            del self._released[next(iter(self._released))]  # the one released longest ago
        self._released[name] = stored

    async def _authenticate(self, cookie: str | None,
                            bearer: str | None) -> tuple[dict[str, str], dict[str, Any], str]:
        """The (tee-pubkey, claims, session reference) of an attestation token or attested session."""
        if bearer is not None:
            token = self.tokens.verify(bearer)
            session_id = token.get("sid") if token is not None else None
            session = await self.store.get_session(session_id) if isinstance(session_id, str) else None
            if session is None or session.state != "attested":
                raise self._count(Problem(p.NOT_ATTESTED, "the Bearer token is invalid or expired: attest again"))
        else:
            session_id = self.cookies.session_id(cookie) if cookie else None
            session = await self.store.get_session(session_id) if session_id else None
            if session is None or session.state != "attested" or self.cookies.open(cookie or "", session.nonce) is None:
                raise self._count(Problem(p.NOT_ATTESTED, "this session is not attested (or expired): call /auth "
                                                          "and /attest"))
        assert session.tee_pubkey is not None and session.claims is not None
        return session.tee_pubkey, session.claims, session_ref(session.id)

    async def _refuse(self, problem: Problem, event: Event) -> NoReturn:
        """Record the refusal of an authenticated session (durably; past the session's
        REFUSALS_MAX it is counted only), count it, and answer with ``problem``."""
        if problem.name == p.INTERNAL or self._refusal_recorded(event.session):
            await self.store.record(replace(event, decision=DENY, reason=problem.detail))
        else:
            self.metrics.denial("refusal_unrecorded")
        raise self._count(problem)

    def _refusal_recorded(self, session: str) -> bool:
        """Count a refusal of ``session``: whether it is one of its first REFUSALS_MAX."""
        now = time.monotonic()
        refusals = self._refusals  # in the order of first refusals: the first to forget come first
        for ended in [key for key in itertools.islice(refusals, 16) if refusals[key][0] <= now]:
            del refusals[ended]  # a few at a time (each call adds at most one)
        forget_at, count = refusals.get(session, (now + SESSION_LIFETIME, 0))
        if count == 0 and len(refusals) >= REFUSALS_TRACKED:
            return False
        refusals[session] = (forget_at, count + 1)  # an existing key keeps its place
        return count < REFUSALS_MAX

    def _count(self, problem: Problem) -> Problem:
        self.metrics.denial(problem.cause)
        return problem

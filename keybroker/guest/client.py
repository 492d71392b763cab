"""KBS RCAR 0.4.0 client: auth -> attest -> resource, over requests.

One round: get a challenge, make an ephemeral EC P-256 key, let the caller produce
evidence whose inblob binds the nonce and that key, attest, fetch the resource, and
decrypt the JWE with the ephemeral key. The evidence goes as keybroker's envelope to a
server whose challenge says it reads it, and in Trustee's per-TEE form to any other (a
Trustee KBS): no configuration tells the two apart. Every HTTP call has an explicit timeout bounded
by the caller's deadline; unreachable servers and 5xx answers are retried a bounded
number of times while the deadline allows.
"""

from __future__ import annotations

import errno as E
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import EvidenceError, ProtocolError, ReleaseRefused, ResourceMissing, ServerError, ServerUnreachable
from ..wire import envelope, jwe, parse_json, trustee
from ..wire import rcar as p
from ..wire.envelope import TsmReport
from .retry import Backoff, retry

REQUEST_TIMEOUT = 10.0  # seconds per HTTP request, at most
RESPONSE_MAX = 1024 * 1024

#: Produces evidence for a 64-byte inblob (the binding of nonce and tee-pubkey).
EvidenceSource = Callable[[bytes], TsmReport]


@dataclass(frozen=True)
class ReleasedKey:
    """A released resource: the bytes (wipe them after use) and the lease the server gave."""

    value: bytearray
    lease: int | None


class RcarClient:
    def __init__(self, url: str, *, ca: Path | None = None, deadline: float | None = None,
                 attempts: int = 3, backoff: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self.verify: bool | str = str(ca) if ca else True
        self.deadline = deadline
        self.attempts = attempts
        self.backoff = backoff

    def fetch(self, resource: str, tee: str, evidence: EvidenceSource) -> ReleasedKey:
        """Run one attestation round, again after a failure that may clear (unreachable, HTTP 5xx)."""
        return retry(lambda: self._round(resource, tee, evidence), transient=_transient,
                     backoff=Backoff(first=self.backoff), deadline=self.deadline, attempts=self.attempts)

    def _round(self, resource: str, tee: str, evidence: EvidenceSource) -> ReleasedKey:
        with requests.Session() as http:
            http.verify = self.verify
            http.trust_env = False  # no proxies or CA bundles from an environment we do not control
            challenge = p.Challenge.from_json(self._call(http, "POST", "/auth", p.AuthRequest(tee).to_json()))

            key = ec.generate_private_key(ec.SECP256R1())  # ephemeral: lives for this round only
            tee_pubkey = {"alg": p.KEY_ALGORITHM, **jwe.public_jwk(key.public_key())}
            report = evidence(p.report_data(challenge.nonce, tee_pubkey))
            attestation = p.Attestation(challenge.nonce, tee_pubkey, _primary_evidence(report, challenge))
            self._call(http, "POST", "/attest", attestation.to_json())

            response = self._call(http, "GET", f"/resource/{resource}", None, raw=True)
            lease = response.headers.get(p.LEASE_HEADER, "")
            value = _decrypt(response, key)
            return ReleasedKey(value, int(lease) if re.fullmatch(r"[0-9]{1,10}", lease) else None)

    def _call(self, http: requests.Session, method: str, path: str, body: Any, *, raw: bool = False) -> Any:
        url = f"{self.url}{p.PREFIX}{path}"
        timeout = REQUEST_TIMEOUT
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise ServerUnreachable(f"no time left to reach the key server at {self.url}", errno=E.ETIMEDOUT)
        try:
            response = http.request(method, url, json=body, timeout=timeout, allow_redirects=False)
        except requests.Timeout:
            raise ServerUnreachable(f"key server {self.url} did not answer within {timeout:.1f} s",
                                    errno=E.ETIMEDOUT) from None
        except requests.exceptions.SSLError as exc:
            raise ServerError(f"TLS with {self.url} failed: {exc}", status=0, problem=None) from None
        except requests.ConnectionError as exc:
            code = _errno_of(exc)
            raise ServerUnreachable(f"cannot reach the key server {self.url}: {E.errorcode.get(code, code)}",
                                    errno=code) from None
        if len(response.content) > RESPONSE_MAX:
            raise ProtocolError(f"{method} {path}: response larger than {RESPONSE_MAX} bytes")
        if response.status_code != 200:
            try:
                problem = parse_json(response.content)
            except ValueError:
                problem = None
            name = p.problem_name(problem)
            detail = problem.get("detail") if isinstance(problem, dict) else None
            kind = _REFUSALS.get(name or "", ServerError)
            raise kind(f"{method} {path}: HTTP {response.status_code} {(name or '')[:200]}: "
                       f"{str(detail or response.reason)[:500]}", status=response.status_code, problem=name)
        if raw:
            return response
        try:
            return parse_json(response.content)
        except ValueError:
            raise ProtocolError(f"{method} {path}: response is not JSON") from None


def _primary_evidence(report: TsmReport, challenge: p.Challenge) -> Any:
    """The envelope for a server that said it reads it (keybroker's); Trustee's form for any other."""
    if challenge.envelope:
        return envelope.to_json(report)
    if report.manifestblob:
        raise ProtocolError("the key server reads Trustee's evidence forms, which cannot carry the SVSM "
                            "manifest this guest is configured to attest (tsm.service_provider)")
    try:
        return trustee.to_json(report.provider, report.outblob, report.auxblob)
    except EvidenceError as exc:
        raise ProtocolError(f"the evidence cannot be sent in Trustee's form: {exc}") from None


#: The problems that are the key server's judgement, not a failure.
_REFUSALS = {p.RESOURCE_NOT_FOUND: ResourceMissing, p.ATTESTATION_DENIED: ReleaseRefused,
             p.POLICY_DENIED: ReleaseRefused}


def _transient(exc: Exception) -> bool:
    busy = isinstance(exc, ServerError) and (exc.status >= 500 or exc.status == 429)
    return busy or isinstance(exc, ServerUnreachable)


def _decrypt(response: requests.Response, key: ec.EllipticCurvePrivateKey) -> bytearray:
    """The released key, decrypted straight into a buffer the caller wipes."""
    try:
        body = parse_json(response.content)
    except ValueError:
        raise ProtocolError("resource response is not JSON") from None
    try:
        return jwe.unwrap(body, key)
    except ProtocolError as exc:
        raise ProtocolError(f"resource: {exc}") from None


def _errno_of(exc: BaseException) -> int:
    """The socket errno behind a requests/urllib3 connection error (ECONNREFUSED if unknown)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen or not isinstance(item, BaseException):
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in (E.ECONNREFUSED, E.ENETUNREACH, E.EHOSTUNREACH,
                                                        E.ETIMEDOUT, E.ECONNRESET):
            return item.errno
        stack.extend([item.__cause__, item.__context__, *item.args, getattr(item, "reason", None)])
    return E.ECONNREFUSED

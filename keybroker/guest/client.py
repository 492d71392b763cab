"""KBS RCAR 0.4.0 client: auth -> attest -> resource, over the standard library's http.client
(it runs once per key request: ``requests`` alone would cost more to import than the round).

One round: get a challenge, make an ephemeral EC P-256 key, let the caller produce
evidence whose inblob binds the nonce and that key, attest, fetch the resource, and
decrypt the JWE with the ephemeral key. The round hands the attestation token and that key
to the caller as soon as /attest gives them; further resources are fetched with them
(``Authorization: Bearer``) without attesting again, until the server says the token is no
longer good (NotAttested). The evidence goes as keybroker's envelope to a
server whose challenge says it reads it, and in Trustee's per-TEE form to any other (a
Trustee KBS): no configuration tells the two apart. Every HTTP call has an explicit timeout
bounded by the caller's deadline, for the whole exchange (a server that trickles its answer a
byte at a time is cut off when it passes, not only one that goes silent; resolving its name and
connecting are bounded by the resolver's and the socket's timeouts, and an exchange whose time
passed meanwhile ends there); unreachable servers
and 5xx answers are retried a bounded number of times while the deadline allows. TLS verifies
the server against ``ca`` (or the system's roots); no proxy, no redirect, no environment
variable is followed.
"""

from __future__ import annotations

import errno as E
import http.client
import json
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import (
    ConfigError,
    EvidenceError,
    ProtocolError,
    ReleaseRefused,
    ResourceMissing,
    ServerError,
    ServerUnreachable,
)
from ..wire import envelope, jwe, parse_json, shown, trustee
from ..wire import rcar as p
from ..wire.envelope import TsmReport
from .retry import Backoff, retry

REQUEST_TIMEOUT = 10.0  # seconds per HTTP request, at most
RESPONSE_MAX = 1024 * 1024

T = TypeVar("T")

#: Produces evidence for a 64-byte inblob (the binding of nonce and tee-pubkey).
EvidenceSource = Callable[[bytes], TsmReport]


@dataclass(frozen=True)
class ReleasedKey:
    """A released resource: the bytes (wipe them after use) and the lease the server gave."""

    value: bytearray
    lease: int | None


class TokenRefused(Exception):
    """The server does not take the attestation token (expired, or not one it can check): attest again."""


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    content: bytes
    resent: bool = False  # sent once more on a new connection: the first sending may have been read


class _StrictResponse(http.client.HTTPResponse):
    """http.client's response, whose chunk sizes are never negative: it reads them with int(line, 16),
    which takes "-1", and a negative size reads the connection to its end, into memory."""

    def _read_next_chunk_size(self) -> int:
        size: int = super()._read_next_chunk_size()  # type: ignore[misc]
        if size < 0:
            raise ValueError("negative chunk size")  # as any bad size: the body is cut short (IncompleteRead)
        return size


class _Http:
    """One keep-alive connection to the key server, and the RCAR session cookie it was given."""

    def __init__(self, url: str, ca: Path | None) -> None:
        parts = urlsplit(url)
        self.prefix = parts.path.rstrip("/")
        host, port = parts.hostname or "", parts.port
        if parts.scheme == "https":
            try:
                context = ssl.create_default_context(cafile=str(ca) if ca else None)
            except OSError as exc:  # no such file, a folder, no certificate in it (ssl.SSLError)
                raise ConfigError(f"the CA bundle {ca} (server.ca) cannot be loaded: {exc}") from None
            self.conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, context=context)
        else:
            self.conn = http.client.HTTPConnection(host, port)
        self.conn.response_class = _StrictResponse
        self.cookie: str | None = None
        self._cut_off = False
        self._cut_lock = threading.Lock()
        self._under_way: object | None = None  # the exchange under way, whose watchdog may cut it

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
                timeout: float) -> _Response:
        headers = {"Accept": "application/json", **headers}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.cookie:
            headers["Cookie"] = f"{p.SESSION_COOKIE}={self.cookie}"
        self.conn.timeout = timeout
        if self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        # The socket's timeout bounds each read; the watchdog, the whole exchange.
        self._under_way = exchange = object()
        watchdog = threading.Timer(timeout, self._cut, args=(exchange,))
        watchdog.daemon = True
        self._cut_off = False
        watchdog.start()
        kept = self.conn.sock is not None
        resent = False
        try:
            try:
                response, content = self._exchange(method, path, body, headers)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
                    ssl.SSLZeroReturnError):
                if not kept or self._cut_off:
                    raise
                # The server closed the kept-alive connection while it was idle (keybroker's and
                # Trustee's both do after 5 s; making evidence may take longer; over TLS that may read
                # as an EOF the protocol did not expect): it never read this request. Once more, on a
                # new connection (a resent /attest that finds its nonce spent was read the first time:
                # the round is made again, see _call).
                self.conn.close()
                resent = True
                response, content = self._exchange(method, path, body, headers)
        except (OSError, http.client.HTTPException):
            if self._cut_off:
                raise TimeoutError from None
            raise
        finally:
            watchdog.cancel()  # too late if it is running already: then _cut finds its exchange over
            with self._cut_lock:
                self._under_way = None
        if self._cut_off:  # what a cut connection left may look whole (an answer read to its end)
            raise TimeoutError
        for value in response.headers.get_all("Set-Cookie") or ():
            name, _, rest = value.partition("=")
            if name.strip() == p.SESSION_COOKIE:
                self.cookie = rest.split(";", 1)[0].strip()
        return _Response(response.status, response.reason, response.headers, content, resent)

    def _exchange(self, method: str, path: str, body: bytes | None,
                  headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
        if self.conn.sock is None:
            # Resolving and connecting (TLS handshake included) happen before there is a socket
            # the watchdog can shut: when it fired meanwhile, the exchange ends here, or the
            # reads after it would be bounded one by one only.
            self.conn.connect()
        if self._cut_off:
            raise TimeoutError
        self.conn.request(method, self.prefix + path, body=body, headers=headers)
        response = self.conn.getresponse()
        content = response.read(RESPONSE_MAX + 1)
        if len(content) <= RESPONSE_MAX and response.will_close is False:
            response.read()  # nothing left: the connection stays usable
        return response, content

    @property
    def reusable(self) -> bool:
        """Whether the connection is up and its last exchange was not cut off: it may serve another."""
        return self.conn.sock is not None and not self._cut_off

    def _cut(self, exchange: object) -> None:
        """The time of ``exchange`` is up: shut its socket down, which ends any read blocked on it. Not once
        it has ended: the connection may be kept by then, serving another exchange."""
        with self._cut_lock:
            if self._under_way is not exchange:
                return
            self._cut_off = True
            sock = self.conn.sock
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Links:
    """Kept-alive connections to key servers, for a process that makes round after round (the agent):
    a key under a kept token then costs no TCP connection (nor TLS handshake) of its own.

    A connection is kept only after an exchange that ended whole, without the round's session
    cookie, and for at most ``IDLE`` seconds (keybroker's and Trustee's servers close one idle
    for 5 s; one closed meanwhile is sent to once more on a new connection, see _Http.request).
    It serves the same server URL and CA setting only, one exchange at a time."""

    IDLE = 4.0
    KEPT_MAX = 16  # per server: the agent's workers

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, Path | None], list[tuple[float, _Http]]] = {}

    def take(self, url: str, ca: Path | None) -> _Http | None:
        """The most recently kept connection to ``url`` (with ``ca``) not idle too long, if any."""
        stale = []
        try:
            while True:
                with self._lock:
                    idle = self._idle.get((url, ca), [])
                    if not idle:
                        return None
                    since, link = idle.pop()
                if time.monotonic() - since < self.IDLE and not _dropped(link):
                    return link
                stale.append(link)
        finally:
            for link in stale:
                link.conn.close()

    def keep(self, url: str, ca: Path | None, link: _Http) -> None:
        """Keep ``link`` for another exchange (closed if ``KEPT_MAX`` are kept already), and close those
        kept too long meanwhile, whatever their server (one the configuration no longer names, say)."""
        link.cookie = None  # the round's session ends with it
        now, stale = time.monotonic(), []
        with self._lock:
            for key, idle in list(self._idle.items()):
                stale += [old for since, old in idle if now - since >= self.IDLE]
                idle[:] = [(since, old) for since, old in idle if now - since < self.IDLE]
                if not idle:
                    del self._idle[key]
            idle = self._idle.setdefault((url, ca), [])
            if len(idle) < self.KEPT_MAX:
                idle.append((now, link))
            else:
                stale.append(link)
        for old in stale:
            old.conn.close()


def _dropped(link: _Http) -> bool:
    """Whether an idle connection has something to read: the server's close (or bytes it had no
    reason to send). Either way it is not one to send a request on."""
    sock = link.conn.sock
    if sock is None:
        return True
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


class RcarClient:
    def __init__(self, url: str, *, ca: Path | None = None, deadline: float | None = None,
                 attempts: int = 3, backoff: float = 0.5, links: Links | None = None) -> None:
        self.url = url.rstrip("/")
        self.ca = ca
        self.deadline = deadline
        self.attempts = attempts
        self.backoff = backoff
        self.links = links  # kept-alive connections to take and give back (None: one per round)

    def fetch(self, resource: str, tee: str, evidence: EvidenceSource,
              keep: Callable[[str, ec.EllipticCurvePrivateKey], None] | None = None) -> ReleasedKey:
        """Run one attestation round, again after a failure that may clear (unreachable, HTTP 5xx).

        ``keep`` gets the token ('' if none) and its tee key as soon as /attest passes: they serve further
        resources even when this one is refused."""
        return self._retried(lambda: self._round(resource, tee, evidence, keep))

    def fetch_with_token(self, resource: str, token: str, key: ec.EllipticCurvePrivateKey) -> ReleasedKey:
        """Fetch ``resource`` under an attestation token (Bearer), unwrapping it with the key the token is
        bound to. TokenRefused when the server does not take the token; its other refusals as in a round."""
        def once() -> ReleasedKey:
            with self._connection() as link:
                try:
                    response = self._call(link, "GET", f"/resource/{resource}", None, raw=True,
                                          headers={"Authorization": f"Bearer {token}"})
                except ServerError as exc:
                    # Only a refusal of the token itself: a resource missing or denied leaves it good.
                    if exc.problem == p.NOT_ATTESTED:
                        raise TokenRefused(str(exc)) from None
                    raise
                return _released(response, key)
        return self._retried(once)

    def _retried(self, work: Callable[[], T]) -> T:
        """``work``, again after a failure that may clear (unreachable, HTTP 5xx or 429), while the deadline allows."""
        return retry(work, transient=_transient, backoff=Backoff(first=self.backoff), deadline=self.deadline,
                     attempts=self.attempts)

    def _round(self, resource: str, tee: str, evidence: EvidenceSource,
               keep: Callable[[str, ec.EllipticCurvePrivateKey], None] | None) -> ReleasedKey:
        with self._connection() as link:
            challenge = p.Challenge.from_json(self._call(link, "POST", "/auth", p.AuthRequest(tee).to_json()))

            key = ec.generate_private_key(ec.SECP256R1())  # ephemeral: this round's, and its token's
            tee_pubkey = {"alg": p.KEY_ALGORITHM, **jwe.public_jwk(key.public_key())}
            report = evidence(p.report_data(challenge.nonce, tee_pubkey, hash_algorithm=challenge.hash_algorithm))
            attestation = p.Attestation(challenge.nonce, tee_pubkey, _primary_evidence(report, challenge))
            answer = self._call(link, "POST", "/attest", attestation.to_json())
            token = answer.get("token") if isinstance(answer, dict) else None
            if keep is not None:  # '' when /attest gave none (nothing is kept): the attestation passed
                keep(token if isinstance(token, str) else "", key)

            response = self._call(link, "GET", f"/resource/{resource}", None, raw=True)
            return _released(response, key)

    @contextmanager
    def _connection(self) -> Iterator[_Http]:
        link = (self.links.take(self.url, self.ca) if self.links else None) or _Http(self.url, self.ca)
        whole = False
        try:
            yield link
            whole = link.reusable
        finally:
            if whole and self.links is not None:
                self.links.keep(self.url, self.ca, link)
            else:
                link.conn.close()

    def _call(self, link: _Http, method: str, path: str, body: Any, *, raw: bool = False,
              headers: dict[str, str] | None = None) -> Any:
        timeout = REQUEST_TIMEOUT
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise ServerUnreachable(f"no time left to reach the key server at {self.url}", errno=E.ETIMEDOUT)
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            response = link.request(method, f"{p.PREFIX}{path}", data, headers or {}, timeout)
        except TimeoutError:
            link.conn.close()
            raise ServerUnreachable(f"key server {self.url} did not answer within {timeout:.1f} s",
                                    errno=E.ETIMEDOUT) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):  # it hung up: restarting, or its handshake deadline
            link.conn.close()
            raise ServerUnreachable(f"cannot reach the key server {self.url}: ECONNRESET (it closed the connection "
                                    "during the TLS handshake)", errno=E.ECONNRESET) from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            link.conn.close()
            raise ServerError(f"TLS with {self.url} failed: {exc}", status=0, problem=None) from None
        except (OSError, http.client.HTTPException) as exc:
            link.conn.close()
            if _not_http(exc):
                raise ProtocolError(f"{method} {path}: the key server's answer is not HTTP/1.x: "
                                    f"{type(exc).__name__} {shown(str(exc))}") from None
            code = exc.errno if isinstance(exc, OSError) and exc.errno in _UNREACHABLE else \
                E.ECONNRESET if isinstance(exc, http.client.HTTPException | ConnectionError) else E.ECONNREFUSED
            raise ServerUnreachable(f"cannot reach the key server {self.url}: {E.errorcode.get(code, code)}",
                                    errno=code) from None
        if len(response.content) > RESPONSE_MAX:
            raise ProtocolError(f"{method} {path}: response larger than {RESPONSE_MAX} bytes")
        if response.status > 599:  # http.client reads any three digits: 600-999 is no HTTP status, nor a 5xx
            raise ProtocolError(f"{method} {path}: HTTP status {response.status} is not one HTTP defines (100-599)")
        if response.status != 200:
            try:
                problem = parse_json(response.content)
            except ValueError:
                problem = None
            name = p.problem_name(problem)
            if response.resent and name == p.UNKNOWN_SESSION:
                # The connection was reset after the server read the first sending (a worker that
                # died, a proxy that cut it), which spent the session's nonce: a new round, as before.
                raise ServerUnreachable(f"cannot reach the key server {self.url}: ECONNRESET", errno=E.ECONNRESET)
            detail = problem.get("detail") if isinstance(problem, dict) else None
            kind = _REFUSALS.get(name or "", ServerError)
            raise kind(f"{method} {path}: HTTP {response.status} {(name or '')[:200]}: "
                       f"{str(detail or response.reason)[:500]}", status=response.status, problem=name)
        if raw:
            return response
        try:
            return parse_json(response.content)
        except ValueError:
            raise ProtocolError(f"{method} {path}: response is not JSON") from None


#: The longest lease the keyring can set (KEYCTL_SET_TIMEOUT takes an unsigned int).
KEY_TIMEOUT_MAX = 2**32 - 1

_UNREACHABLE = (E.ECONNREFUSED, E.ENETUNREACH, E.EHOSTUNREACH, E.ETIMEDOUT, E.ECONNRESET)


def _released(response: _Response, key: ec.EllipticCurvePrivateKey) -> ReleasedKey:
    lease = response.headers.get(p.LEASE_HEADER)
    seconds = None
    if lease is not None:  # the key's expiry in the keyring: an unsigned 32-bit count of seconds
        seconds = int(lease) if re.fullmatch(r"[0-9]{1,10}", lease) else 0
        if not 1 <= seconds <= KEY_TIMEOUT_MAX:
            raise ProtocolError(f"the server's {p.LEASE_HEADER} header {lease[:40]!r} is not 1 to {KEY_TIMEOUT_MAX} "
                                "seconds")
    return ReleasedKey(_decrypt(response, key), seconds)


def _primary_evidence(report: TsmReport, challenge: p.Challenge) -> Any:
    """The envelope for a server that said it reads it (keybroker's); Trustee's form for any other."""
    if challenge.envelope:
        return envelope.to_json(report)
    if report.manifestblob:
        raise ProtocolError("the key server reads Trustee's evidence forms, which cannot carry the SVSM "
                            "manifest this guest is configured to attest (tsm.service_provider)")
    try:
        return trustee.to_json(report.provider, report.outblob, report.auxblob, report.event_log)
    except EvidenceError as exc:
        raise ProtocolError(f"the evidence cannot be sent in Trustee's form: {exc}") from None


#: The problems that are the key server's judgement, not a failure.
_REFUSALS = {p.RESOURCE_NOT_FOUND: ResourceMissing, p.ATTESTATION_DENIED: ReleaseRefused,
             p.POLICY_DENIED: ReleaseRefused}


def _not_http(exc: Exception) -> bool:
    """Whether http.client failed on an answer that arrived whole and is not HTTP/1.x (another protocol,
    HTTP/2, a line over 64 KiB, more than 100 headers), not on a connection that ended before its answer did
    (RemoteDisconnected, a status line cut short, a body cut short: IncompleteRead)."""
    if isinstance(exc, ConnectionError) or not isinstance(exc, http.client.HTTPException):
        return False
    if isinstance(exc, http.client.BadStatusLine):
        return str(exc.args[0] if exc.args else "").endswith("\n")  # a whole line that is no status line
    return isinstance(exc, http.client.LineTooLong | http.client.UnknownProtocol) \
        or type(exc) is http.client.HTTPException  # "got more than 100 headers"


def _transient(exc: Exception) -> bool:
    busy = isinstance(exc, ServerError) and (exc.status >= 500 or exc.status == 429)
    return busy or isinstance(exc, ServerUnreachable)


def _decrypt(response: _Response, key: ec.EllipticCurvePrivateKey) -> bytearray:
    """The released key, decrypted straight into a buffer the caller wipes."""
    try:
        body = parse_json(response.content)
    except ValueError:
        raise ProtocolError("resource response is not JSON") from None
    try:
        return jwe.unwrap(body, key)
    except ProtocolError as exc:
        raise ProtocolError(f"resource: {exc}") from None

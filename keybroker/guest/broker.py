"""One key request: under the token kept from an earlier attestation, else one attestation round
(evidence -> RCAR -> released bytes), whose token is kept for the next requests.

No kernel and no argv here: the handler (and ``--debug``) call :func:`obtain`. Tokens are
kept for root only (see :mod:`.tokens`); other users' ``--debug`` runs always attest.

A TD's evidence carries its event log (:func:`.measure.evidence_log`). With ``[measure] releases``
each released key is measured (a runtime event naming the resource and the server) before it
is returned: a key whose measurement fails is wiped and the request fails, so that no key is
instantiated that the next attestation would not show.
"""

from __future__ import annotations

import dataclasses
import errno as E
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import KeybrokerError, TsmError
from ..wire import rcar as p
from ..wire.envelope import TsmReport
from .client import Links, RcarClient, ReleasedKey, TokenRefused
from .config import ClientConfig
from .request import KeyRequest
from .tokens import AttestationLock, TokenCache
from .tsm import ReportRequest, TsmClient

__all__ = ["Links", "ReleasedKey", "obtain"]


def obtain(config: ClientConfig, request: KeyRequest, *, deadline: float, links: Links | None = None) -> ReleasedKey:
    released = _obtain(config, request, deadline=deadline, links=links)
    if config.measure.releases:
        from . import measure

        try:
            measure.measure(config.measure, measure.release_event(str(request.resource), config.server_url),
                            once=True, deadline=deadline)
        except BaseException as exc:
            released.value[:] = bytes(len(released.value))
            raise TsmError(f"the key for {request.resource} was released but not measured, so it is not "
                           f"instantiated ([measure] releases): {exc}", errno=getattr(exc, "errno", None),
                           transient=getattr(exc, "transient", False)) from None
    return released


def _obtain(config: ClientConfig, request: KeyRequest, *, deadline: float, links: Links | None) -> ReleasedKey:
    client = RcarClient(config.server_url, ca=config.server_ca, deadline=deadline, links=links)
    resource = str(request.resource)
    if not TokenCache.available():
        return _attest(config, request, client, None, deadline)
    cache = TokenCache(config, request.privlevel)
    # The kept token; else one attestation, shared: concurrent requests wait on the lock and use
    # what the one that attested kept, outside the lock, so that they fetch their keys side by
    # side. Twice: the token kept meanwhile may be refused too (expired, its signing key gone).
    # An attestation that failed while a request waited for it fails that request too (as it failed):
    # the same evidence to the same server, again and again, one at a time, cost each waiting
    # request a report, and the last ones their deadline (ETIMEDOUT for a refusal).
    for _ in range(2):
        released = _with_kept_token(client, cache, resource, deadline)
        if released is not None:
            return released
        arrived = time.monotonic()
        with cache.attesting(deadline) as lock:
            if cache.load() is None:  # none kept meanwhile by another request: this one attests
                failure = lock.failure_since(arrived)
                if failure is not None:
                    raise failure
                return _attest(config, request, client, cache, deadline, lock)
    with cache.attesting(deadline) as lock:
        return _attest(config, request, client, cache, deadline, lock)


def _with_kept_token(client: RcarClient, cache: TokenCache, resource: str, deadline: float) -> ReleasedKey | None:
    held = cache.load()
    if held is None:
        return None
    try:
        return client.fetch_with_token(resource, held.token, held.key)
    except TokenRefused:
        # Dropped only if it is still the one refused: meanwhile another request, refused too,
        # may have attested and kept a fresh token (under the lock), which serves this one.
        with cache.attesting(deadline):
            kept = cache.load()
            if kept is not None and kept.token == held.token:
                cache.drop()
        return None


def _attest(config: ClientConfig, request: KeyRequest, client: RcarClient, cache: TokenCache | None,
            deadline: float, lock: AttestationLock | None = None) -> ReleasedKey:
    attested = False

    def keep(token: str, key: ec.EllipticCurvePrivateKey) -> None:
        nonlocal attested
        attested = True
        if cache is not None:
            cache.store(token, key)
        if lock is not None:
            lock.release()  # the requests waiting for this attestation fetch under its token meanwhile

    try:
        provider, evidence = _evidence_source(config, request, deadline)
        tee = p.TEE_BY_PROVIDER.get(provider)
        if tee is None:
            raise TsmError(f"provider {provider!r} has no KBS tee type (known: {', '.join(p.TEE_BY_PROVIDER)})",
                           errno=E.ENODEV)
        return client.fetch(str(request.resource), tee, evidence, keep=keep)
    except KeybrokerError as exc:
        # Shared only if the attestation failed (not this resource once it passed), and not for want of
        # this request's own time: a request with time left may still succeed.
        if lock is not None and not attested and time.monotonic() < deadline:
            lock.record(exc)
        raise


def _evidence_source(config: ClientConfig, request: KeyRequest,
                     deadline: float) -> tuple[str, Callable[[bytes], TsmReport]]:
    """The provider, and how to get its evidence for an inblob: the configured broker, else configfs-tsm."""
    broker = config.aeb
    if broker is not None:
        from .aeb import PROVIDER

        return PROVIDER, lambda inblob: broker.get_report(inblob, deadline=deadline)
    tsm = TsmClient(config.tsm_root)
    provider = tsm.provider()

    def evidence(inblob: bytes) -> TsmReport:
        report_request = ReportRequest(inblob, privlevel=request.privlevel, service_provider=config.service_provider,
                                       service_guid=config.service_guid)
        if provider != "tdx_guest":
            return tsm.get_report(report_request, deadline=deadline)
        from .measure import evidence_log

        with evidence_log(config.measure, deadline) as read_log:  # no extend between the log and the quote
            report = tsm.get_report(report_request, deadline=deadline)
            return dataclasses.replace(report, event_log=read_log())

    return provider, evidence

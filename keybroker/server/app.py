"""The key server's HTTP front (Starlette; served by uvicorn workers, see serve).

Routes: KBS RCAR 0.4.0 (``/kbs/v0/auth``, ``/attest``, ``/resource/…``), the admin API
(``/admin/v1/…``, Bearer admin token), and operations (``/metrics``, ``/healthz``,
``/readyz``). Bodies are bounded before they are parsed; every error is an RFC 7807
problem whose ``type`` names it and whose ``detail`` says why (a denial names the failed
check or policy condition). Admin calls without a valid token are refused, counted and logged (not
audited: a stranger cannot grow the log).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import AdminError, PolicyError, StoreError
from ..files import check_held, read_bounded, root_or_self
from ..wire import decimal, parse_json
from ..wire import rcar as p
from ..wire.resource import VALUE_MAX
from .admin import ADMIN_PREFIX, Admin, AdminAuth
from .config import ServerConfig
from .kbs import SESSION_LIFETIME, KeyServer, Problem
from .metrics import CONTENT_TYPE, Metrics
from .policy import POLICY_MAX
from .ratelimit import RateLimiter
from .schema import sqlite_file, store_error
from .sealing import load_sealer
from .store import PolicyInfo, PolicyVersion, Store
from .tokens import TokenSigner

log = logging.getLogger("keybroker.server")

Handler = Callable[[Request], Awaitable[Response]]


#: Seconds a client is asked to wait before it tries again, when the database does not answer.
UNAVAILABLE_RETRY = 5


def problem_response(problem: Problem) -> JSONResponse:
    headers = ({"WWW-Authenticate": 'Bearer realm="keybroker-admin"'} if problem.name == p.UNAUTHORIZED else
               {"Retry-After": str(UNAVAILABLE_RETRY)} if problem.name == p.UNAVAILABLE else None)
    return JSONResponse(p.problem(problem.name, problem.detail), status_code=problem.status,
                        media_type="application/problem+json", headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and ((size := decimal(declared)) is None or size > limit):
        raise Problem(p.PAYLOAD_TOO_LARGE, f"request body larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Problem(p.PAYLOAD_TOO_LARGE, f"request body larger than {limit} bytes")
    except ClientDisconnect:  # also how uvicorn reports broken framing (it has answered 400 itself)
        raise Problem(p.BAD_REQUEST, "the request body did not arrive whole (the client hung up, or its "
                                     "chunked framing is broken)") from None
    return bytes(body)


def json_of(body: bytes) -> Any:
    try:
        return parse_json(body)
    except ValueError as exc:  # UnicodeDecodeError too; the messages name positions, never the content
        raise Problem(p.BAD_REQUEST, f"request body is not JSON: {str(exc)[:200]}") from None


def _peer(request: Request) -> str:
    return request.client.host if request.client else "?"


def _policy_json(info: PolicyInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"version": info.version, "digest": info.digest, "created": info.created,
                           "actor": info.actor}
    if isinstance(info, PolicyVersion):
        out["policy"] = info.policy.document
    return out


#: The routes where a credential (session cookie, Bearer token) is charged only once it proves nothing.
CREDENTIALED = frozenset({"attest", "resource", "admin"})
#: The routes whose use is limited per peer (see ratelimit): all but /healthz. /metrics and /readyz prove
#: nothing and cost more than a request that finds no route (the workers' metrics summed, a database ping).
LIMITED = CREDENTIALED | {"auth", "metrics", "readyz"}


def session_cookie(request: Request) -> str | None:
    """The session cookie's value from the Cookie header, read as Starlette's ``request.cookies`` reads it
    (the first header; the last cookie of the name; one pair of quotes taken off) but without its
    unquoting (http.cookies._unquote), which is quadratic in a value's backslashes before Python
    3.11.10: a 16 KiB cookie held the worker's event loop for half a second. A session cookie holds
    no backslash (see cookies)."""
    found = None
    for chunk in request.headers.get("cookie", "").split(";"):
        name, equals, value = chunk.partition("=")
        if equals and name.strip() == p.SESSION_COOKIE:
            found = value.strip()
    if found is not None and len(found) >= 2 and found[0] == found[-1] == '"':
        found = found[1:-1]
    return found


def _has_credential(request: Request) -> bool:
    return session_cookie(request) is not None or "authorization" in request.headers


def create_app(kbs: KeyServer, admin_auth: AdminAuth | None, limiter: RateLimiter, *,
               secure_cookies: bool) -> Starlette:
    def throttled(route: str, request: Request) -> Response | None:
        """429 for a peer out of tokens; a token taken for work that proves nothing (see ratelimit)."""
        if route not in LIMITED:
            return None
        # A credential is paid for only if it proves nothing (after the answer); until then its
        # bearer is refused only when its address has nothing left.
        credential = route in CREDENTIALED and _has_credential(request)
        wait = limiter.wait(_peer(request)) if credential else limiter.take(_peer(request))
        if wait is None:
            return None
        if limiter.newly_limited(_peer(request)):
            log.warning("%s peer=%s: rate limited (more than %g unauthenticated requests per second)", route,
                        _peer(request), limiter.rate)
        kbs.metrics.denial("rate_limited")
        response = problem_response(Problem(p.TOO_MANY_REQUESTS, "too many unauthenticated requests from this "
                                                                  "address; slow down"))
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response

    def guarded(route: str) -> Callable[[Handler], Handler]:
        def wrap(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                start = time.perf_counter()
                refused = throttled(route, request)
                if refused is not None:
                    kbs.metrics.request(route, refused.status_code, time.perf_counter() - start)
                    return refused
                refused_as = None
                try:
                    response = await handler(request)
                except Problem as problem:
                    log.warning("%s peer=%s status=%d problem=%s detail=%s", route, _peer(request), problem.status,
                                problem.name, problem.detail)
                    response, refused_as = problem_response(problem), problem.name
                except (AdminError, PolicyError) as exc:
                    response = problem_response(Problem(p.BAD_REQUEST, str(exc)))
                except (StoreError, SQLAlchemyError) as exc:  # the driver's errors too: a database refusing
                    if isinstance(exc, SQLAlchemyError):  # one line, without statement, values or password
                        exc = store_error(kbs.store.engine.url, exc)
                    log.error("%s peer=%s: %s", route, _peer(request), exc)
                    response = problem_response(Problem(p.UNAVAILABLE, "the key server's database does not "
                                                                       "answer; try again later"))
                except Exception:
                    log.exception("%s peer=%s: internal error", route, _peer(request))
                    response = problem_response(Problem(p.INTERNAL, "internal error; see the server log"))
                # A credential that proved nothing (a refusal: bad request, too large, not attested)
                # costs a token too; a resource missing or denied by policy follows a proven
                # attestation (else every guest behind an address would pay for one that asks a lot).
                if route in CREDENTIALED and 400 <= response.status_code < 500 \
                        and refused_as not in (p.RESOURCE_NOT_FOUND, p.POLICY_DENIED) and _has_credential(request):
                    limiter.charge(_peer(request))
                kbs.metrics.request(route, response.status_code, time.perf_counter() - start)
                return response
            return endpoint
        return wrap

    # -- KBS RCAR 0.4.0 ------------------------------------------------------------------

    @guarded("auth")
    async def auth(request: Request) -> Response:
        cookie, challenge = await kbs.auth(json_of(await read_body(request, p.BODY_MAX)))
        response = JSONResponse(challenge)
        # No Path, as Trustee's has none: a guest's cookie store scopes it to where it called /auth,
        # which is <its URL's path>/kbs/v0 also when a reverse proxy serves this server under a prefix.
        response.set_cookie(p.SESSION_COOKIE, cookie, max_age=SESSION_LIFETIME, path=None, httponly=True,
                            secure=secure_cookies, samesite="strict")
        return response

    @guarded("attest")
    async def attest(request: Request) -> Response:
        body = await read_body(request, p.BODY_MAX)
        token = await kbs.attest(session_cookie(request), json_of(body), _peer(request),
                                 size=len(body))
        return JSONResponse(token)

    @guarded("resource")
    async def resource(request: Request) -> Response:
        authorization = request.headers.get("authorization", "")
        bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        released = await kbs.release(request.path_params["path"], session_cookie(request), bearer,
                                     _peer(request))
        headers = {"Cache-Control": "no-store", p.AUDIT_HEADER: released.audit}
        if released.lease is not None:
            headers[p.LEASE_HEADER] = str(released.lease)
        return JSONResponse(released.jwe, headers=headers)

    # -- the admin API -------------------------------------------------------------------

    async def administrator(request: Request) -> Admin:
        """The caller as an :class:`Admin`, or a refusal (counted and logged; the audit log records changes)."""
        authorization = request.headers.get("authorization", "")
        if admin_auth is None:
            reason = "the admin API is disabled on this server (start it with --admin-token-file)"
        elif not authorization.lower().startswith("bearer "):
            reason = "no Bearer admin token"
        else:
            actor = admin_auth.actor(authorization[7:].strip())
            if actor is not None:
                return Admin(kbs.store, kbs.sealer, actor, kbs.name, _peer(request))
            reason = "the Bearer token is not an admin token"
        kbs.metrics.denial("admin_unauthorized")
        raise Problem(p.UNAUTHORIZED, reason, "admin_unauthorized")

    @guarded("admin")
    async def list_resources(request: Request) -> Response:
        admin = await administrator(request)
        listing = await kbs.store.admin(admin.list_resources)
        return JSONResponse({"resources": [{"path": r.path, "size": r.size, "lease": r.lease, "kek": r.kek_id,
                                            "updated": r.updated, "altered": r.altered} for r in listing]})

    @guarded("admin")
    async def put_resource(request: Request) -> Response:
        admin = await administrator(request)
        lease = request.query_params.get("lease")
        seconds = None if lease is None else decimal(lease, 10)
        if lease is not None and seconds is None:
            raise Problem(p.BAD_REQUEST, "lease must be a number of seconds")
        value = await read_body(request, VALUE_MAX)
        record = await kbs.store.admin(partial(admin.put_resource, request.path_params["path"], value, seconds))
        return JSONResponse({"path": record.event.resource, "size": len(value), "audit": record.hash})

    @guarded("admin")
    async def delete_resource(request: Request) -> Response:
        admin = await administrator(request)
        path = request.path_params["path"]
        if not await kbs.store.admin(partial(admin.delete_resource, path)):
            raise Problem(p.RESOURCE_NOT_FOUND, f"resource {path[:200]} does not exist")
        return JSONResponse({"deleted": path})

    @guarded("admin")
    async def get_policy(request: Request) -> Response:
        admin = await administrator(request)
        wanted = request.query_params.get("version")
        number = None if wanted is None else decimal(wanted, 9)
        if wanted is not None and number is None:
            raise Problem(p.BAD_REQUEST, "version must be a number")
        version = await kbs.store.admin(partial(admin.get_policy, number))
        if version is None:
            raise Problem(p.RESOURCE_NOT_FOUND, f"there is no policy version {wanted}")
        return JSONResponse(_policy_json(version))

    @guarded("admin")
    async def list_policies(request: Request) -> Response:
        admin = await administrator(request)
        versions = await kbs.store.admin(admin.list_policies)
        return JSONResponse({"policies": [_policy_json(v) for v in versions]})

    @guarded("admin")
    async def put_policy(request: Request) -> Response:
        admin = await administrator(request)
        body = await read_body(request, p.BODY_MAX)
        version, changed = await kbs.store.admin(partial(admin.put_policy, body))
        return JSONResponse({"version": version, "changed": changed})

    @guarded("admin")
    async def reset_policy(request: Request) -> Response:
        admin = await administrator(request)
        version, changed = await kbs.store.admin(admin.reset_policy)
        return JSONResponse({"version": version, "changed": changed})

    # -- operations ----------------------------------------------------------------------

    @guarded("metrics")
    async def metrics(request: Request) -> Response:
        return Response(kbs.metrics.render(), media_type=CONTENT_TYPE)

    @guarded("healthz")
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @guarded("readyz")
    async def readyz(request: Request) -> Response:
        try:
            await kbs.store.ping()
        except Exception as exc:  # any database failure means: do not send traffic here
            log.warning("readyz: the database does not answer: %s", exc)
            return JSONResponse({"status": "unavailable", "detail": "the database does not answer"},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    async def no_route(request: Request, exc: Exception) -> Response:
        """What routing refuses (no such endpoint, another method) is a problem document too."""
        assert isinstance(exc, HTTPException)  # the one exception this handles
        name = {404: p.NOT_FOUND, 405: p.METHOD_NOT_ALLOWED}.get(exc.status_code, p.BAD_REQUEST)
        response = problem_response(Problem(name, f"no {request.method[:16]} {request.url.path[:64]} here"))
        if exc.headers and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    resource_path = "/resources/{path:path}"
    release = Route(f"{p.PREFIX}/resource/{{path:path}}", resource, methods=["GET"])
    release.methods = {"GET"}  # not the HEAD Starlette adds: it would release (and record) a key it never sends
    return Starlette(exception_handlers={HTTPException: no_route}, routes=[
        Route(f"{p.PREFIX}/auth", auth, methods=["POST"]),
        Route(f"{p.PREFIX}/attest", attest, methods=["POST"]),
        release,
        Route(f"{ADMIN_PREFIX}/resources", list_resources, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}{resource_path}", put_resource, methods=["PUT"]),
        Route(f"{ADMIN_PREFIX}{resource_path}", delete_resource, methods=["DELETE"]),
        Route(f"{ADMIN_PREFIX}/policy", get_policy, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/policy", put_policy, methods=["PUT"]),
        Route(f"{ADMIN_PREFIX}/policy", reset_policy, methods=["DELETE"]),
        Route(f"{ADMIN_PREFIX}/policies", list_policies, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ])


def _check_held_inputs(config: ServerConfig) -> None:
    """Refuse a SQLite database, a policy, --certs or --collateral folder (or a file in one), or a --cache-dir,
    that others than root and this server may change: the database and the policy decide releases, and an
    older CRL or collateral put there would weaken the checks. (--trust-roots: TrustStore.with_dirs; the
    configuration file: config.load.)"""
    database = sqlite_file(config.db)
    if database is not None:  # the policy, the sealed resources, the audit log: a copy of an older one rolls them back
        _check_held_place(database, "database")
    if config.cache_dir:  # what KDS and PCS served, used again while current: an older CRL there hides a revocation
        _check_held_place(config.cache_dir, "cache folder")
    if config.policy:
        check_held(config.policy, "policy", root_or_self())
    for folder in (*config.certs, *([config.collateral] if config.collateral else [])):
        # None yet refuses every attestation that needs one, until someone makes it: who may, is held too.
        _check_held_place(folder, "certificate or collateral folder")
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                check_held(path, "certificate or collateral file", root_or_self())


def _check_held_place(path: Path, what: str) -> None:
    """``check_held`` for ``path`` or, while there is none, for the folder above it that is: whoever may
    write there could make it, and fill it, before this server does."""
    place = path
    while not os.path.lexists(place) and place.parent != place:
        place = place.parent
    check_held(place, what if place == path else f"{what} {path} (yet to be made in)", root_or_self())


def key_server(config: ServerConfig) -> tuple[KeyServer, AdminAuth | None, RateLimiter]:
    """Load the secrets, open the database (installing ``--policy``), and say what is being served."""
    from ..verifier import Fetcher, TrustStore

    sealer = load_sealer(config.kek_file, config.old_kek_file)
    admin_auth = AdminAuth.load(config.admin_token_file)
    tokens = TokenSigner.load(config.token_key_file)
    name = config.name or f"{socket.gethostname()}:{config.listen[1]}"
    _check_held_inputs(config)
    store = Store(config.db, sealer)
    if config.policy:
        policy_text = read_bounded(config.policy, POLICY_MAX, "policy", PolicyError)
        Admin(store, sealer, f"config:{config.policy}", name).put_policy(policy_text)
    active = store.active_policy()
    log.info("replica %s: release policy version %d (sha256 %s); KEK %s; admin API %s; token key %s", name,
             active.version, active.digest[:16], sealer.current.id, "on" if admin_auth else "off",
             "shared" if tokens.shared else "ephemeral")
    if not tokens.shared:
        log.warning("no --token-key-file: the tokens issued here are valid on this replica only")
    if not active.policy.document["rules"]:
        log.warning("no release policy is set: nothing will be released (keybroker policy put, or --policy)")
    for warning in active.policy.unpinned():
        log.warning("release policy version %d: %s", active.version, warning)
    kbs = KeyServer(store=store, sealer=sealer, trust=TrustStore.default().with_dirs(config.trust_roots),
                    tokens=tokens, metrics=Metrics(), name=name, certs=config.certs,
                    kds_url=config.kds_url or None, fetcher=Fetcher(config.cache_dir), pcs_url=config.pcs_url or None,
                    collateral=config.collateral)
    return kbs, admin_auth, RateLimiter(config.rate_limit, config.rate_burst)

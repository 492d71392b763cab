"""The key server's HTTP front (Starlette, served by uvicorn): KBS RCAR 0.4.0 routes.

Bodies are bounded before they are parsed; every error is an RFC 7807 problem whose
``type`` names it (unknown resource, attestation denied and why, bad request...).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..rcar import protocol as p
from .kbs import SESSION_LIFETIME, KeyServer, Problem

log = logging.getLogger("keybroker.server")

Handler = Callable[[Request], Awaitable[Response]]


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(p.problem(problem.name, problem.detail), status_code=problem.status,
                        media_type="application/problem+json")


async def read_json(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > p.BODY_MAX):
        raise Problem(p.PAYLOAD_TOO_LARGE, f"request body larger than {p.BODY_MAX} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > p.BODY_MAX:
            raise Problem(p.PAYLOAD_TOO_LARGE, f"request body larger than {p.BODY_MAX} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Problem(p.BAD_REQUEST, "request body is not JSON") from None


def create_app(kbs: KeyServer, *, secure_cookies: bool) -> Starlette:
    def guarded(route: str) -> Callable[[Handler], Handler]:
        def wrap(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                peer = request.client.host if request.client else "?"
                try:
                    return await handler(request)
                except Problem as problem:
                    log.warning("%s peer=%s status=%d problem=%s detail=%s", route, peer, problem.status,
                                problem.name, problem.detail)
                    return problem_response(problem)
                except Exception:
                    log.exception("%s peer=%s: internal error", route, peer)
                    return problem_response(Problem(p.INTERNAL, "internal error; see the server log"))
            return endpoint
        return wrap

    @guarded("auth")
    async def auth(request: Request) -> Response:
        body = await read_json(request)
        session_id, challenge = await run_in_threadpool(kbs.auth, body)
        response = JSONResponse(challenge)
        response.set_cookie(p.SESSION_COOKIE, session_id, max_age=SESSION_LIFETIME, path=p.PREFIX, httponly=True,
                            secure=secure_cookies, samesite="strict")
        return response

    @guarded("attest")
    async def attest(request: Request) -> Response:
        body = await read_json(request)
        token = await run_in_threadpool(kbs.attest, request.cookies.get(p.SESSION_COOKIE), body)
        return JSONResponse(token)

    @guarded("resource")
    async def resource(request: Request) -> Response:
        path = request.path_params["path"]
        authorization = request.headers.get("authorization", "")
        bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None

        def release() -> Any:
            tee_pubkey, claims = kbs.authenticate(request.cookies.get(p.SESSION_COOKIE), bearer)
            return kbs.resource(path, tee_pubkey, claims)

        released = await run_in_threadpool(release)
        peer = request.client.host if request.client else "?"
        log.info("resource peer=%s path=%s result=released", peer, path)
        headers = {"Cache-Control": "no-store"}
        if released.lease is not None:
            headers["Keybroker-Lease"] = str(released.lease)
        return JSONResponse(released.jwe, headers=headers)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route(f"{p.PREFIX}/auth", auth, methods=["POST"]),
        Route(f"{p.PREFIX}/attest", attest, methods=["POST"]),
        Route(f"{p.PREFIX}/resource/{{path:path}}", resource, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


def serve(kbs: KeyServer, host: str, port: int, *, tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Plain HTTP is refused on anything but loopback."""
    import uvicorn

    from ..config import is_loopback
    from ..errors import ConfigError

    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not tls_cert and not is_loopback(host):
        raise ConfigError(f"refusing plain HTTP on {host}: give --tls-cert and --tls-key, or listen on loopback")
    app = create_app(kbs, secure_cookies=bool(tls_cert))
    config = uvicorn.Config(app, host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                            log_level="info", access_log=False, server_header=False, date_header=False)
    uvicorn.Server(config).run()

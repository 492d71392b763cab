"""The admin API spoken to remotely: what ``keybroker resource|policy … --server URL`` uses.

It offers the same operations as :class:`keybroker.server.admin.Admin` and returns the
same records, so that the commands print the same whether they reach the database
directly or a server. The admin token is read from a file (never from argv or the
environment) and sent only over HTTPS, or plain HTTP to loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from ..errors import ConfigError, PolicyError, ServerError
from ..wire import rcar as p
from ..wire.transport import server_url_problem
from . import secretfile
from .admin import ADMIN_PREFIX, TOKEN_GRAMMAR, is_token, resource_name
from .policy import Policy
from .store import PolicyInfo, PolicyVersion, ResourceInfo

TIMEOUT = 30.0


class AdminClient:
    def __init__(self, url: str, token_file: Path, *, ca: Path | None = None) -> None:
        problem = server_url_problem(url)
        if problem:
            raise ConfigError(f"--server {problem} (the admin token goes only over https, or http to loopback)")
        lines = secretfile.read(token_file, "admin token file").decode(errors="replace").splitlines()
        number, token = next(((n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()), (0, ""))
        if not token:
            raise ConfigError(f"admin token file {token_file} holds no token")
        if not is_token(token):  # not one a server takes, nor one a header can carry
            raise ConfigError(f"admin token file {token_file}, line {number}: {TOKEN_GRAMMAR}")
        self.url = url.rstrip("/") + ADMIN_PREFIX
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.verify = str(ca) if ca else True
        self.http.headers["Authorization"] = f"Bearer {token}"

    # A resource's name is checked here, as the database's commands check it: its segments need no
    # quoting then, and none is '..' (which the URL's normalisation would resolve: x/../../policy
    # would reach /policy).
    def put_resource(self, path: str, value: bytes, lease: int | None = None) -> None:
        self._call("PUT", f"/resources/{resource_name(path)}", data=value,
                   params={"lease": lease} if lease is not None else None)

    def delete_resource(self, path: str) -> bool:
        response = self._call("DELETE", f"/resources/{resource_name(path)}", missing_ok=True)
        return response is not None

    def list_resources(self) -> list[ResourceInfo]:
        return self._call("GET", "/resources", read=lambda body: [
            ResourceInfo(_of(r, "path", str), _of(r, "size", int, None), _of(r, "lease", int, None),
                         _of(r, "kek", str, None), _of(r, "updated", int, float, None), _of(r, "altered", bool))
            for r in _of(body, "resources", list)])

    def put_policy(self, text: str | bytes) -> tuple[int, bool]:
        return self._call("PUT", "/policy", data=text.encode() if isinstance(text, str) else text, read=_version)

    def reset_policy(self) -> tuple[int, bool]:
        return self._call("DELETE", "/policy", read=_version)

    def get_policy(self, version: int | None = None) -> PolicyVersion | None:
        return self._call("GET", "/policy", params={"version": version} if version is not None else None,
                          missing_ok=True, read=lambda body: PolicyVersion(*_policy_info(body), Policy(body["policy"])))

    def list_policies(self) -> list[PolicyInfo]:
        return self._call("GET", "/policies", read=lambda body: [
            PolicyInfo(*_policy_info(v)) for v in _of(body, "policies", list)])

    def _call(self, method: str, path: str, *, data: bytes | None = None, params: dict[str, Any] | None = None,
              missing_ok: bool = False, read: Callable[[Any], Any] | None = None) -> Any:
        """``read`` of the JSON answer; None for a thing the server says it does not have, when ``missing_ok``."""
        try:
            response = self.http.request(method, self.url + path, data=data, params=params, timeout=TIMEOUT,
                                         allow_redirects=False)
        except requests.RequestException as exc:
            raise ServerError(f"cannot reach the key server: {exc}", status=0, problem=None) from None
        try:
            body = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested past the parser (as parse_json says)
            body = None
        name = p.problem_name(body) if response.status_code != 200 else None
        if response.status_code == 404 and missing_ok and name == p.RESOURCE_NOT_FOUND:
            return None
        if response.status_code != 200:
            detail = body.get("detail") if isinstance(body, dict) else response.reason
            raise ServerError(f"{method} {path}: HTTP {response.status_code} {name or ''}: {str(detail)[:500]}",
                              status=response.status_code, problem=name)
        try:
            return (read or _object)(body)
        except (KeyError, IndexError, TypeError, ValueError, PolicyError):  # ``body`` None (not JSON) too
            raise ServerError(f"{method} {path}: HTTP 200, but the answer is not the admin API's: is {self.url[:200]} "
                              "a keybroker key server?", status=200, problem=None) from None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):  # None too: not JSON
        raise TypeError("not a JSON object")
    return body


def _of(body: Any, name: str, *kinds: type | None) -> Any:
    """Member ``name`` of the JSON object ``body``, of one of ``kinds`` exactly (None: null; a bool is no int)."""
    value = _object(body)[name]
    if any(value is None if kind is None else type(value) is kind for kind in kinds):
        return value
    raise TypeError(f"{name} is a {type(value).__name__}")


def _version(body: Any) -> tuple[int, bool]:
    return _of(body, "version", int), _of(body, "changed", bool)


def _policy_info(body: Any) -> tuple[int, str, float, str]:
    created = _of(body, "created", int, float)
    if not 0 <= created < 2**37:  # a time the commands can print
        raise ValueError(f"created {created} is no time")
    return _of(body, "version", int), _of(body, "digest", str), created, _of(body, "actor", str)

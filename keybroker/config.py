"""The client configuration (TOML): key server, configfs-tsm root, handler deadline, access rules.

::

    [server]
    url = "https://kbs.example:8080"      # required
    ca = "/etc/keybroker/ca.pem"           # optional CA bundle for TLS
    [tsm]
    root = "/sys/kernel/config/tsm/report"
    [handler]
    deadline = 30                          # seconds, hard limit for one construction
    [[access]]                             # who may obtain which resources
    resource = "default/*"
    uids = [0]
    gids = []

Access: root (uid 0) may obtain every resource; any other requester only what an
``[[access]]`` rule whose ``resource`` pattern (``*`` matches anything, ``/`` included)
matches grants to its uid or one of its gids. Unknown keys and bad values are errors that
name the key and the file.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_PATH = Path("/etc/keybroker/client.toml")
DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_DEADLINE = 30.0


@dataclass(frozen=True)
class AccessRule:
    resource: str
    uids: frozenset[int]
    gids: frozenset[int]


@dataclass(frozen=True)
class ClientConfig:
    path: Path
    server_url: str
    server_ca: Path | None = None
    tsm_root: Path = DEFAULT_TSM_ROOT
    deadline: float = DEFAULT_DEADLINE
    access: tuple[AccessRule, ...] = ()

    def may_obtain(self, uid: int, gids: set[int] | frozenset[int], resource: str) -> bool:
        if uid == 0:
            return True
        return any(fnmatchcase(resource, rule.resource) and (uid in rule.uids or rule.gids & gids)
                   for rule in self.access)


class _Table:
    """Typed access to one TOML table that reports every problem with the key and the file."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        self.path, self.name = path, name
        if not isinstance(data, dict):
            raise self.error(f"[{name}] must be a table")
        self.data = data

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {message}")

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def only(self, *allowed: str) -> None:
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise self.error(f"unknown key {self.key(unknown[0])!r} (known: {', '.join(allowed)})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise self.error(f"missing required key {self.key(key)!r}")
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(f"{self.key(key)!r} must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise self.error(f"{self.key(key)!r} must be {_kind_name(kind)}, not {type(value).__name__}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load(path: Path | str = DEFAULT_PATH) -> ClientConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(path, data)


def parse(path: Path, data: dict[str, Any]) -> ClientConfig:
    top = _Table(path, "", data)
    top.only("server", "tsm", "handler", "access")

    server = _Table(path, "server", top.get("server", dict, required=True))
    server.only("url", "ca")
    url = _server_url(server, server.get("url", str, required=True))
    ca = server.get("ca", str)

    tsm = _Table(path, "tsm", top.get("tsm", dict, {}))
    tsm.only("root")
    root = tsm.get("root", str, str(DEFAULT_TSM_ROOT))

    handler = _Table(path, "handler", top.get("handler", dict, {}))
    handler.only("deadline")
    deadline = float(handler.get("deadline", (int, float), DEFAULT_DEADLINE))
    if not 1 <= deadline <= 600:
        raise handler.error("'handler.deadline' must be between 1 and 600 seconds")

    rules = []
    for i, raw in enumerate(top.get("access", list, [])):
        rule = _Table(path, f"access[{i}]", raw)
        rule.only("resource", "uids", "gids")
        pattern = rule.get("resource", str, required=True)
        ids = {}
        for key in ("uids", "gids"):
            values = rule.get(key, list, [])
            if not all(type(v) is int and 0 <= v < 2**32 for v in values):
                raise rule.error(f"{rule.key(key)!r} must be a list of numeric ids")
            ids[key] = frozenset(values)
        rules.append(AccessRule(pattern, ids["uids"], ids["gids"]))

    return ClientConfig(path=path, server_url=url, server_ca=Path(ca) if ca else None,
                        tsm_root=Path(root), deadline=deadline, access=tuple(rules))


def _server_url(table: _Table, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise table.error(f"'server.url' must be an https:// URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise table.error("'server.url' may use plain http only for a loopback address; use https")
    if parts.query or parts.fragment:
        raise table.error("'server.url' must not carry a query or fragment")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

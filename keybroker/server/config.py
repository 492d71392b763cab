"""The key server's configuration: a TOML file equivalent to ``keybroker serve``'s flags.

Each key is a long flag without its dashes; a flag given on the command line wins over
the file. Relative paths in the file are relative to the file's folder::

    # /etc/keybroker/server.toml
    listen = "0.0.0.0:8443"
    db = "sqlite:////var/lib/keybroker/kbs.db"   # or postgresql://keybroker@db/keybroker
    name = "kbs-1"                               # this replica, in the audit log
    trust-roots = []
    certs = []
    kds-url = "https://kdsintf.amd.com"          # "" never fetches
    cache-dir = "/var/cache/keybroker"
    pcs-url = "https://api.trustedservices.intel.com"   # TDX TCB status; default: not evaluated
    collateral = "/etc/keybroker/tdx-collateral"  # offline TDX collateral, preferred to pcs-url
    policy = "/etc/keybroker/policy.json"        # installed at start when it differs
    tls-cert = "/etc/keybroker/tls/cert.pem"
    tls-key = "/etc/keybroker/tls/key.pem"
    kek-file = "/etc/keybroker/kek"              # default: the systemd credential "kek"
    old-kek-file = []                            # KEKs still readable during a rotation
    admin-token-file = "/etc/keybroker/admin-token"   # default: credential "admin-token"
    token-key-file = "/etc/keybroker/token-key.pem"   # default: credential "token-key"
    workers = 2                                  # worker processes; default (0): one per CPU

Unknown keys and values of the wrong type are errors that name the key and the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import check_held, read_bounded, root_or_self
from ..verifier.snp.kds import AMD_KDS
from ..wire import decimal, parse_toml, shown
from .ratelimit import DEFAULT_BURST, DEFAULT_RATE

CONFIG_MAX = 1024 * 1024  # bytes of a configuration file

DEFAULT_DB = "sqlite:////var/lib/keybroker/kbs.db"
DEFAULT_KDS = AMD_KDS
DEFAULT_CACHE = Path("/var/cache/keybroker")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    number = decimal(port, 5)
    if not sep or number is None or not 0 < number < 65536:
        raise ConfigError(f"listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", number


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    db: str = DEFAULT_DB
    name: str | None = None
    trust_roots: tuple[Path, ...] = ()
    certs: tuple[Path, ...] = ()
    kds_url: str = DEFAULT_KDS
    cache_dir: Path = DEFAULT_CACHE
    pcs_url: str | None = None
    collateral: Path | None = None
    policy: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    kek_file: Path | None = None
    old_kek_file: tuple[Path, ...] = ()
    admin_token_file: Path | None = None
    token_key_file: Path | None = None
    rate_limit: float = DEFAULT_RATE
    rate_burst: int = DEFAULT_BURST
    workers: int = 0  # 0: one per CPU


_LISTS = {"trust_roots", "certs", "old_kek_file"}
#: Numbers and their bounds (a burst past a float's range made the limiter fail every request).
_NUMBERS: dict[str, tuple[type, float, float]] = {"rate_limit": (float, 0, 1e6), "rate_burst": (int, 1, 10**6),
                                                 "workers": (int, 0, 1024)}
_PATHS = {"cache_dir", "collateral", "policy", "tls_cert", "tls_key", "kek_file", "admin_token_file", "token_key_file"}


def load(path: Path | None, flags: dict[str, Any]) -> ServerConfig:
    """The configuration of file ``path`` (if any) with ``flags`` (field name -> value, None: not given) over it."""
    values: dict[str, Any] = _read(path) if path else {}
    for name, value in flags.items():
        if value is not None:  # a number given as a flag is held to the bounds of the file's key
            values[name] = _number(name, value, _error_for_flag(name)) if name in _NUMBERS else value
    return ServerConfig(**values)


def _read(path: Path) -> dict[str, Any]:
    check_held(path, "server configuration", root_or_self())  # it names the KEK, the roots, the policy
    raw = read_bounded(path, CONFIG_MAX, "server configuration", ConfigError)
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"server configuration {path} is not valid TOML: {exc}") from None
    document = parse_toml(text, f"server configuration {path}", ConfigError)
    known = {f.name.replace("_", "-"): f.name for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        name = known[key]
        values[name] = _convert(name, value, path.parent, _error_for(path, key))
    return values


def _error_for(path: Path, key: str) -> Callable[[str], ConfigError]:
    return lambda why: ConfigError(f"{path}: {key} {why}")


def _error_for_flag(name: str) -> Callable[[str], ConfigError]:
    return lambda why: ConfigError(f"--{name.replace('_', '-')} {why}")


def _number(name: str, value: Any, error: Callable[[str], ConfigError]) -> int | float:
    """A number within its bounds, and finite: nan (which TOML and float() read) is no rate, and no
    bound either (every comparison with it is false: a rate limit of nan turned the limiter off)."""
    kind, least, most = _NUMBERS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or (isinstance(value, float) and not math.isfinite(value)) or not least <= value <= most:
        what = "a number" if kind is float else "an integer"
        raise error(f"must be {what} from {least:.0f} to {most:.0f}, not {shown(value)}")
    return kind(value)


def _convert(name: str, value: Any, base: Path, error: Callable[[str], ConfigError]) -> Any:
    if name in _NUMBERS:
        return _number(name, value, error)
    if any(isinstance(item, str) and "\0" in item for item in (value if isinstance(value, list) else [value])):
        raise error("must not hold a NUL character (TOML's \\u0000): no path, URL or name does")
    if name in _LISTS:
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise error("must be a list of paths")
        return tuple(base / item for item in value)
    if not isinstance(value, str):
        raise error("must be a string")
    if name == "listen":
        try:
            return parse_listen(value)
        except ConfigError as exc:
            raise error(str(exc)) from None
    if name in _PATHS:
        if not value:
            raise error("must be a path")
        return base / value
    return value

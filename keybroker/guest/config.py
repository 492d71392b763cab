"""The client configuration (TOML): key server, configfs-tsm root, handler deadline, access rules.

::

    [server]
    url = "https://kbs.example:8080"      # required
    ca = "/etc/keybroker/ca.pem"           # optional CA bundle for TLS
    [tsm]
    root = "/sys/kernel/config/tsm/report"
    service_provider = "svsm"              # optional: SVSM service attestation (SEV-SNP guests
                                           # under an SVSM; the report comes from VMPL0)
    service_guid = "c476f1eb-..."          # optional: attest this one service (default: all)
    [aeb]                                  # SEV/SEV-ES guests instead of [tsm]: the host's
    address = "vsock:2:5577"               # Attestation Evidence Broker (default address)
    guest_handle = 1                       # required: this guest's firmware handle
    [handler]
    deadline = 30                          # seconds, hard limit for one construction
    [measure]                              # runtime measurement (TDX, Linux 6.16+ tsm-mr)
    log = "/run/keybroker/runtime-eventlog"  # the runtime event log (guest-components' format)
    root = "/sys/class/misc/tdx_guest/measurements"  # the tsm-mr registers
    ccel = "/sys/firmware/acpi/tables/data/CCEL"     # the firmware's event log, sent with evidence
    ccel_table = "/sys/firmware/acpi/tables/CCEL"
    releases = false                       # measure each released key before instantiating it
    [[access]]                             # who may obtain which resources
    resource = "default/*"
    uids = [1000]
    gids = []
    key_types = ["logon"]                  # optional: as which key types (default: user and logon)
    [volumes.data]                         # disk unlock: crypttab volume name -> resource
    resource = "default/luks/data"         # required
    device = "/dev/disk/by-uuid/..."       # the source device systemd-cryptsetup asks about
    key_type = "logon"                     # what `keybroker place-key` puts in root's keyring
    deadline = 120                         # seconds of retrying before the passphrase prompt takes over

Access: root (uid 0) may obtain every resource; any other requester only what an
``[[access]]`` rule whose ``resource`` pattern (``*`` matches anything, ``/`` included;
the only wildcard) matches grants to its uid or one of its groups (the key's gid and the user's supplementary
groups in the group database), as one of the rule's ``key_types``: ``logon`` alone keeps
a secret out of user space. Unknown keys and bad values are errors that name the key and
the file.

``[measure]`` says where runtime events go (:mod:`keybroker.guest.measure`); with ``releases``
the handler measures every key it obtains (the resource and the server, never the key) and
refuses to instantiate a key whose measurement failed.

Volumes map the names of /etc/crypttab volumes to resources for keybroker's disk-unlock
services (:mod:`keybroker.guest.unlock`). A volume name is 1-64 characters of [A-Za-z0-9_.-],
not starting with '.' or '-'; ``device`` is an absolute path; ``key_type`` is ``logon``
(dm-crypt keyring keys, never readable from user space) or ``user`` (LUKS2 keyring
tokens, which read the key); ``deadline`` is 1 to 3600 seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DescriptionError
from ..files import read_bounded
from ..wire import parse_toml
from ..wire.resource import ResourcePath, check_pattern, pattern_matches, pattern_parts
from ..wire.transport import server_url_problem
from .request import DESCRIPTION_PREFIX, KEY_TYPES

if TYPE_CHECKING:
    from .aeb import Broker

DEFAULT_PATH = Path("/etc/keybroker/client.toml")
DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_DEADLINE = 30.0
DEFAULT_UNLOCK_DEADLINE = 120.0
DEVICE_MAX = 4096
CONFIG_MAX = 1024 * 1024  # bytes of a client configuration
DEFAULT_MR_ROOT = Path("/sys/class/misc/tdx_guest/measurements")
DEFAULT_RUNTIME_LOG = Path("/run/keybroker/runtime-eventlog")
DEFAULT_CCEL = Path("/sys/firmware/acpi/tables/data/CCEL")
DEFAULT_CCEL_TABLE = Path("/sys/firmware/acpi/tables/CCEL")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class AccessRule:
    resource: str
    uids: frozenset[int]
    gids: frozenset[int]
    key_types: frozenset[str] = frozenset(KEY_TYPES)


@dataclass(frozen=True)
class Volume:
    """One crypttab volume keybroker unlocks: its key is the resource ``keybroker:<resource>``."""

    name: str
    resource: ResourcePath
    device: str | None = None
    key_type: str = "logon"
    deadline: float = DEFAULT_UNLOCK_DEADLINE

    @property
    def description(self) -> str:
        return f"{DESCRIPTION_PREFIX}{self.resource}"


@dataclass(frozen=True)
class MeasureConfig:
    """Runtime measurement: which RTMR, the runtime log, the tsm-mr registers, the CCEL; measured release."""

    root: Path = DEFAULT_MR_ROOT
    log: Path = DEFAULT_RUNTIME_LOG
    ccel: Path = DEFAULT_CCEL
    ccel_table: Path = DEFAULT_CCEL_TABLE
    releases: bool = False


@dataclass(frozen=True)
class ClientConfig:
    path: Path
    server_url: str
    server_ca: Path | None = None
    tsm_root: Path = DEFAULT_TSM_ROOT
    service_provider: str | None = None
    service_guid: str | None = None
    deadline: float = DEFAULT_DEADLINE
    aeb: Broker | None = None
    access: tuple[AccessRule, ...] = ()
    volumes: tuple[Volume, ...] = ()
    measure: MeasureConfig = MeasureConfig()

    def volume(self, name: str) -> Volume | None:
        return next((volume for volume in self.volumes if volume.name == name), None)

    def may_obtain(self, uid: int, gids: set[int] | frozenset[int], resource: str, key_type: str) -> bool:
        if uid == 0:
            return True
        return any(pattern_matches(resource, pattern_parts(rule.resource)) and key_type in rule.key_types
                   and (uid in rule.uids or rule.gids & gids) for rule in self.access)


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
    raw = read_bounded(path, CONFIG_MAX, "client configuration", ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(path, parse_toml(text, f"the client configuration {path}", ConfigError))


def parse(path: Path, data: dict[str, Any]) -> ClientConfig:
    top = _Table(path, "", data)
    top.only("server", "tsm", "aeb", "handler", "access", "volumes", "measure")

    server = _Table(path, "server", top.get("server", dict, required=True))
    server.only("url", "ca")
    url = _server_url(server, server.get("url", str, required=True))
    ca = server.get("ca", str)
    if ca is not None:
        _absolute(server, "ca", ca)  # the handler runs from /, an operator's command from anywhere

    tsm = _Table(path, "tsm", top.get("tsm", dict, {}))
    tsm.only("root", "service_provider", "service_guid")
    root = _absolute(tsm, "root", tsm.get("root", str, str(DEFAULT_TSM_ROOT)))
    service_provider = tsm.get("service_provider", str)
    if service_provider not in (None, "svsm"):
        raise tsm.error("'tsm.service_provider' must be \"svsm\" (the only service provider Linux knows)")
    service_guid = tsm.get("service_guid", str)
    if service_guid is not None:
        from ..wire.envelope import GUID  # only then: the handler loads this file on every key request
    if service_guid is not None and (service_provider is None or not GUID.fullmatch(service_guid)):
        raise tsm.error("'tsm.service_guid' must be a lower-case GUID and needs 'tsm.service_provider'")

    broker = _broker(path, top) if "aeb" in data else None

    handler = _Table(path, "handler", top.get("handler", dict, {}))
    handler.only("deadline")
    deadline = handler.get("deadline", (int, float), DEFAULT_DEADLINE)
    if not 2 <= deadline <= 600:  # compared before float(): an integer of 300 hex digits overflows a float
        raise handler.error("'handler.deadline' must be between 2 and 600 seconds")
    deadline = float(deadline)

    rules = []
    for i, raw in enumerate(top.get("access", list, [])):
        rule = _Table(path, f"access[{i}]", raw)
        rule.only("resource", "uids", "gids", "key_types")
        pattern = rule.get("resource", str, required=True)
        try:
            check_pattern(pattern)
        except DescriptionError as exc:
            raise rule.error(f"{rule.key('resource')!r}: {exc}") from None
        ids = {}
        for key in ("uids", "gids"):
            values = rule.get(key, list, [])
            if not all(type(v) is int and 0 <= v < 2**32 for v in values):
                raise rule.error(f"{rule.key(key)!r} must be a list of numeric ids")
            ids[key] = frozenset(values)
        key_types = rule.get("key_types", list, list(KEY_TYPES))
        if not key_types or not all(type(kind) is str and kind in KEY_TYPES for kind in key_types):
            raise rule.error(f"{rule.key('key_types')!r} must list one or both of {', '.join(KEY_TYPES)}")
        rules.append(AccessRule(pattern, ids["uids"], ids["gids"], frozenset(key_types)))

    return ClientConfig(path=path, server_url=url, server_ca=Path(ca) if ca else None,
                        tsm_root=Path(root), service_provider=service_provider, service_guid=service_guid,
                        deadline=deadline, aeb=broker, access=tuple(rules),
                        volumes=_volumes(path, top.get("volumes", dict, {})),
                        measure=_measure(path, top.get("measure", dict, {})))


def _measure(path: Path, raw: dict[str, Any]) -> MeasureConfig:
    table = _Table(path, "measure", raw)
    table.only("root", "log", "ccel", "ccel_table", "releases")
    paths = {}
    for key, default in (("root", DEFAULT_MR_ROOT), ("log", DEFAULT_RUNTIME_LOG), ("ccel", DEFAULT_CCEL),
                         ("ccel_table", DEFAULT_CCEL_TABLE)):
        paths[key] = Path(_absolute(table, key, table.get(key, str, str(default))))
    return MeasureConfig(releases=table.get("releases", bool, False), **paths)


def _absolute(table: _Table, key: str, value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise table.error(f"{table.key(key)!r} must be an absolute path")
    return value


def _broker(path: Path, top: _Table) -> Broker:
    """The ``[aeb]`` table: the evidence broker a SEV/SEV-ES guest asks instead of configfs-tsm."""
    from .aeb import DEFAULT_ADDRESS, Broker

    table = _Table(path, "aeb", top.get("aeb", dict))
    if "tsm" in top.data:
        raise table.error("[aeb] and [tsm] are two evidence sources: a guest has one (SEV/SEV-ES guests "
                          "[aeb], SEV-SNP, TDX and CCA guests [tsm])")
    table.only("address", "guest_handle")
    handle = table.get("guest_handle", int, required=True)
    try:
        return Broker(table.get("address", str, DEFAULT_ADDRESS), handle)
    except ConfigError as exc:
        raise table.error(f"[aeb]: {exc}") from None


def _volumes(path: Path, tables: dict[str, Any]) -> tuple[Volume, ...]:
    volumes = []
    for name, raw in tables.items():
        table = _Table(path, f"volumes.{name}", raw)
        if not _VOLUME_NAME.fullmatch(name):
            raise table.error(f"volume name {name[:80]!r} must be 1-64 characters of [A-Za-z0-9_.-], "
                              "not starting with '.' or '-'")
        table.only("resource", "device", "key_type", "deadline")
        try:
            resource = ResourcePath.parse(table.get("resource", str, required=True))
        except DescriptionError as exc:
            raise table.error(f"{table.key('resource')!r}: {exc}") from None
        device = table.get("device", str)
        if device is not None and (not device.startswith("/") or len(device) > DEVICE_MAX or "\0" in device):
            raise table.error(f"{table.key('device')!r} must be an absolute path of at most {DEVICE_MAX} characters")
        key_type = table.get("key_type", str, "logon")
        if key_type not in KEY_TYPES:
            raise table.error(f"{table.key('key_type')!r} must be one of {', '.join(KEY_TYPES)}")
        deadline = table.get("deadline", (int, float), DEFAULT_UNLOCK_DEADLINE)
        if not 1 <= deadline <= 3600:
            raise table.error(f"{table.key('deadline')!r} must be between 1 and 3600 seconds")
        volumes.append(Volume(name, resource, device, key_type, float(deadline)))
    devices = [volume.device for volume in volumes if volume.device]
    for device in devices:
        if devices.count(device) > 1:
            raise ConfigError(f"{path}: device {device!r} is mapped by more than one volume")
    return tuple(volumes)


def _server_url(table: _Table, url: str) -> str:
    problem = server_url_problem(url)
    if problem:
        raise table.error(f"'server.url' {problem}")
    return url.rstrip("/")

"""configfs-tsm report client: one fresh entry per request, the kernel's generation protocol.

The kernel ABI (Documentation/ABI/testing/configfs-tsm-report): mkdir an entry under
``/sys/kernel/config/tsm/report``, write ``inblob`` (and options), read ``outblob``,
``auxblob`` and ``manifestblob``, and check ``generation``: it counts the writes to the
entry from 0 at mkdir, so a count other than ours means another writer interfered (or one of
our inblob commits, whose errors the kernel swallows at close, was lost). The entry is removed on
every path the process lives through. One killed while it holds an entry (the request-key handler
SIGKILLs its worker at the deadline, and the host decides how long a report takes) cannot: each
report request, before it makes its entry, removes the ``keybroker-<pid>-*`` entries whose
process is gone, also when no provider is registered: since Linux 6.15 a guest driver cannot
register while any entry is left.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import TsmError
from ..wire.envelope import BLOB_MAX, INBLOB_MAX, PROVIDER, TsmReport, attribute_problem
from .retry import Backoff, retry

DEFAULT_ROOT = Path("/sys/kernel/config/tsm/report")
CONFIGFS = Path("/sys/kernel/config")

#: inblob sizes the providers accept when the report is generated (the kernel itself only
#: enforces the 64-byte maximum at write time).
INBLOB_SIZES = {"sev_guest": (64, 64), "tdx_guest": (64, 64), "arm_cca_guest": (32, 64)}

#: Providers whose driver registers no visibility callbacks: every attribute shows, but it reads
#: only inblob (privlevel and the service_* options are sev_guest's).
OPTIONS_IGNORED = frozenset({"arm_cca_guest"})

_TEXT_MAX = 4096
#: The name ``_make_entry`` gives an entry (pid_max is at most 2**22: seven digits).
_OUR_ENTRY = re.compile(r"keybroker-([1-9][0-9]{0,6})-[0-9a-f]{12}")


@dataclass(frozen=True)
class ReportRequest:
    """What to ask the provider for. Options left ``None`` are not written."""

    inblob: bytes
    privlevel: int | None = None
    service_provider: str | None = None
    service_guid: str | None = None
    service_manifest_version: int | None = None

    def __post_init__(self) -> None:
        for name in ("inblob", "privlevel", "service_provider", "service_guid", "service_manifest_version"):
            value = getattr(self, name)
            problem = None if value is None else attribute_problem(name, value)
            if problem:
                too_long = name == "inblob" and len(self.inblob) > INBLOB_MAX
                raise TsmError(f"{name} {problem}", errno=E.EFBIG if too_long else E.EINVAL)


class TsmClient:
    """Gets reports from the configfs-tsm report interface below ``root``.

    ``attempts`` bounds the tries on a generation mismatch (another writer), EBUSY (a
    quote still in flight) or EINTR; ``backoff`` is the first pause between tries, doubled
    each time. A ``deadline`` (``time.monotonic()`` value) given to :meth:`get_report`
    stops retrying when the next pause would pass it.
    """

    def __init__(self, root: Path | str = DEFAULT_ROOT, *, attempts: int = 3, backoff: float = 0.5) -> None:
        self.root = Path(root)
        self.attempts = attempts
        self.backoff = backoff
        self._prepared = False

    def get_report(self, request: ReportRequest, *, deadline: float | None = None) -> TsmReport:
        self._prepare()
        return retry(lambda: self._attempt(request), transient=lambda exc: isinstance(exc, TsmError) and exc.retryable,
                     backoff=Backoff(first=self.backoff), deadline=deadline, attempts=self.attempts)

    def provider(self) -> str:
        """The registered provider's name, read from a short-lived probe entry."""
        self._prepare()
        entry = self._make_entry()
        try:
            return _parse_provider(_Session(entry)._read_text("provider"))
        finally:
            try:
                os.rmdir(entry)
            except FileNotFoundError:
                pass

    # -- one attempt on one fresh entry --------------------------------------------------

    def _attempt(self, request: ReportRequest) -> TsmReport:
        entry = self._make_entry()
        try:
            return _Session(entry).run(request)
        finally:
            try:
                os.rmdir(entry)
            except FileNotFoundError:
                pass  # removed by someone else; the report was checked against generation
            except OSError as exc:
                raise _error(exc, f"remove report entry {entry}") from None

    def _prepare(self) -> None:
        """Once per client (a request probes the provider, then asks for its report): configfs is
        there, and the entries of keybroker processes that are gone are removed, also when no
        provider is registered (its driver cannot register until they are gone)."""
        if not self._prepared:
            self._ensure_configfs()
            self._remove_abandoned()
            self._prepared = True

    def _remove_abandoned(self) -> None:
        """Remove the entries keybroker processes that no longer exist left behind.

        Each entry holds kernel memory until it is removed, and a killed process removes
        nothing. Its pid is in the entry's name: listed first, then found gone (a pid is not
        reused before its process is reaped), the entry is nobody's. Best effort: an entry
        another client removes first, or one that cannot be removed, is left alone.
        """
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            match = _OUR_ENTRY.fullmatch(name)
            if match is None or _alive(int(match[1])):
                continue
            try:
                os.rmdir(self.root / name)
            except OSError:
                pass

    def _make_entry(self) -> Path:
        for _ in range(8):
            entry = self.root / f"keybroker-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                os.mkdir(entry, 0o700)
                return entry
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno == E.ENOENT:
                    raise TsmError(f"no configfs-tsm report interface at {self.root}: configfs is not "
                                   "mounted or the kernel lacks CONFIG_TSM_REPORTS", errno=E.ENOENT) from None
                if exc.errno == E.ENXIO:
                    raise TsmError("no TSM provider is registered: load the guest driver for this "
                                   "platform (sev-guest, tdx-guest or arm-cca-guest); it cannot register "
                                   f"while entries are left in {self.root}", errno=E.ENXIO) from None
                raise _error(exc, f"create a report entry in {self.root}") from None
        raise TsmError(f"could not create a uniquely named entry in {self.root}", errno=E.EEXIST)

    def _ensure_configfs(self) -> None:
        """Mount configfs when the default root lives on it and it is not mounted yet."""
        if self.root.exists() or CONFIGFS not in self.root.parents or os.path.ismount(CONFIGFS):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"configfs", bytes(CONFIGFS), b"configfs", 0, None) != 0:
            err = ctypes.get_errno()
            raise TsmError(f"cannot mount configfs on {CONFIGFS}: {os.strerror(err)}"
                           + (" (the kernel has no configfs)" if err == E.ENODEV else ""), errno=err)


class _Session:
    """The write/read sequence on one entry, counting writes against ``generation``."""

    def __init__(self, entry: Path) -> None:
        self.entry = entry
        self.provider = "?"
        self.writes = 0

    def run(self, request: ReportRequest) -> TsmReport:
        self.provider = _parse_provider(self._read_text("provider"))
        fresh = self._generation()
        if fresh != 0:  # this entry is this request's own, made a moment ago: nobody else writes it
            raise TsmError(f"another writer wrote to {self.entry} before this request did (generation "
                           f"{fresh}, 0 on a fresh entry)", retryable=True)

        lo, hi = INBLOB_SIZES.get(self.provider, (1, INBLOB_MAX))
        if not lo <= len(request.inblob) <= hi:
            size = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
            raise TsmError(f"{self.provider} needs an inblob of {size} bytes, got {len(request.inblob)}",
                           errno=E.EINVAL)
        self._write_inblob(request.inblob)
        if self._generation() != self.writes:
            raise TsmError(f"inblob write to {self.entry} was not committed or another writer "
                           "interfered (generation mismatch)", retryable=True)

        privlevel = floor = None
        if self._has("privlevel") and self.provider not in OPTIONS_IGNORED:
            floor = _parse_uint(self._read_text("privlevel_floor"), "privlevel_floor") \
                if self._has("privlevel_floor") else 0
            privlevel = request.privlevel if request.privlevel is not None else (floor or None)
            if privlevel is not None:
                if privlevel < floor:
                    raise TsmError(f"privlevel {privlevel} is below this guest's privlevel_floor {floor}: "
                                   f"ask for a level between {floor} and 3", errno=E.EINVAL)
                self._write_text("privlevel", str(privlevel))
        # tdx_guest has no privilege levels: the attribute is absent and the option ignored (as on CCA).

        for name in ("service_provider", "service_guid", "service_manifest_version"):
            value = getattr(request, name)
            if value is None:
                continue
            if not self._has(name) or self.provider in OPTIONS_IGNORED:
                raise TsmError(f"{name} is not available: provider {self.provider} offers no service "
                               "attestation here (SEV-SNP under an SVSM, Linux 6.11 or later)", errno=E.ENOENT)
            self._write_text(name, str(value))

        outblob = self._read_blob("outblob")
        auxblob = self._read_blob("auxblob") if self._has("auxblob") else b""
        manifestblob = self._read_blob("manifestblob") if self._has("manifestblob") else b""
        generation = self._generation()
        if generation != self.writes:
            raise TsmError(f"another writer changed {self.entry} while the report was generated "
                           f"(generation {generation}, expected {self.writes})", retryable=True)
        if not outblob:
            raise TsmError(f"{self.provider} returned an empty outblob: the report or quote was not "
                           "generated (older TDX kernels report a failed GetQuote this way)",
                           errno=E.EIO, transient=True)
        return TsmReport(provider=self.provider, generation=generation, inblob=request.inblob,
                         outblob=outblob, auxblob=auxblob, manifestblob=manifestblob,
                         privlevel=privlevel, privlevel_floor=floor,
                         service_provider=request.service_provider, service_guid=request.service_guid,
                         service_manifest_version=request.service_manifest_version)

    # -- attribute I/O -------------------------------------------------------------------

    def _has(self, name: str) -> bool:
        return (self.entry / name).exists()

    def _generation(self) -> int:
        return _parse_uint(self._read_text("generation"), "generation")

    def _read_text(self, name: str) -> str:
        try:
            fd = os.open(self.entry / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, _TEXT_MAX)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(exc, "read", name) from None
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            raise TsmError(f"{self.entry / name} holds non-ASCII text") from None

    def _write_text(self, name: str, value: str) -> None:
        self._write(name, value.encode("ascii"), value)

    def _write_inblob(self, blob: bytes) -> None:
        # configfs accumulates binary writes and commits them at close: one write, one close.
        self._write("inblob", blob, f"{len(blob)} bytes")

    def _write(self, name: str, data: bytes, shown: str) -> None:
        """One open, one write(2), one close: a text attribute stores each write at once."""
        try:
            fd = os.open(self.entry / name, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if os.write(fd, data) != len(data):
                    raise TsmError(f"short write to {self.entry / name}")
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(exc, "write", name, shown) from None
        self.writes += 1

    def _read_blob(self, name: str) -> bytes:
        # One fd read to EOF: configfs serves every read on an fd from one snapshot.
        chunks: list[bytes] = []
        size = 0
        try:
            fd = os.open(self.entry / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while chunk := os.read(fd, 1 << 16):
                    size += len(chunk)
                    if size > BLOB_MAX:
                        raise TsmError(f"{name} is larger than {BLOB_MAX} bytes", errno=E.EFBIG)
                    chunks.append(chunk)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(exc, "read", name) from None
        return b"".join(chunks)

    def _error(self, exc: OSError, action: str, name: str, value: str | None = None) -> TsmError:
        """Turn an errno from the report interface into an error a user can act on."""
        code, p = exc.errno, self.provider
        what = f"{action} {name}" + (f" ({value})" if value is not None and name != "inblob" else "")
        if code == E.ENOENT:
            if not self.entry.exists():
                return TsmError(f"report entry {self.entry} was removed by someone else during {what}",
                                errno=code, retryable=True)
            return TsmError(f"attribute {name} is not provided by {p} on this kernel", errno=code)
        if code == E.EINVAL and action == "read":
            return TsmError(f"{p} rejected the report request (EINVAL): wrong inblob size, a privilege "
                            "level below what the guest runs at, or a service the SVSM does not offer",
                            errno=code)
        if code == E.EINVAL and name == "privlevel":
            return TsmError(f"{p} refused privlevel {value}: it must be between privlevel_floor and 3",
                            errno=code)
        if code == E.EFBIG and name == "inblob":
            return TsmError(f"inblob too long: the kernel accepts at most {INBLOB_MAX} bytes", errno=code)
        messages = {
            E.ENXIO: f"{p} could not produce a report (ENXIO): the provider was unregistered or the "
                     "platform firmware refused the request",
            E.EBUSY: f"{p} is busy (EBUSY): a previous quote request is still in flight",
            E.EINTR: f"interrupted while waiting for {p} (EINTR)",
            E.ETIMEDOUT: f"{p} timed out (ETIMEDOUT): the host throttled the request or its quote "
                         "service did not answer",
            E.EIO: f"{p} failed with an I/O error (EIO): the host rejected the request (TDX: GetQuote "
                   "failed; SEV-SNP: certificate buffer too small)",
            E.ENOTTY: f"{p} is disabled (ENOTTY): after a failed exchange the SEV guest driver wipes its "
                      "VMPCK, so no report can be had until the guest reboots; on Linux 6.7 to 6.14 it also "
                      "means that no guest driver is loaded now (load it)",
            E.EFBIG: f"{name} is larger than the kernel's limit (EFBIG)",
            E.EACCES: f"permission denied to {action} {self.entry / name}: configfs-tsm needs root",
            E.EPERM: f"operation not permitted: {action} {self.entry / name}",
            E.ENOMEM: "the kernel ran out of memory generating the report (ENOMEM)",
        }
        message = messages.get(code or 0, f"{what} in {self.entry}: {os.strerror(code or 0)}")
        return TsmError(message, errno=code, retryable=code in (E.EBUSY, E.EINTR),
                        transient=code in (E.ETIMEDOUT, E.ENOMEM))


def _error(exc: OSError, what: str) -> TsmError:
    return TsmError(f"cannot {what}: {os.strerror(exc.errno or 0)}", errno=exc.errno)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still use its entries: it exists and is not a zombie.

    A zombie runs no more; its pid is not reused before it is reaped, which a parent that gave
    up on it (or an init that reaps nothing) may never do. Unsure (no /proc): alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # EPERM: it exists, someone else's
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2][:2] != b" Z"
    except OSError:
        return True


def _parse_provider(text: str) -> str:
    name = text[:-1] if text.endswith("\n") else text
    if not PROVIDER.fullmatch(name):
        raise TsmError(f"unexpected provider name {text!r} in configfs-tsm")
    return name


def _parse_uint(text: str, name: str) -> int:
    if not re.fullmatch(r"[0-9]{1,20}\n?", text):
        raise TsmError(f"unexpected value {text!r} in configfs-tsm attribute {name}")
    return int(text)

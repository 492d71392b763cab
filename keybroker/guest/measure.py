"""Runtime measurement through the kernel's tsm-mr registers, and the TD's event log for evidence.

:func:`measure` records one guest-components runtime event (``DOMAIN OPERATION CONTENT``, an
EV_EVENT_TAG tagged "AAEL", :mod:`keybroker.wire.eventlog`) in two steps, under an exclusive
``flock`` of the runtime log:

1. append the event's record to the runtime log and ``fsync`` it;
2. extend the RTMR with the record's SHA-384 digest: write the 48 bytes to
   ``ROOT/rtmrN:sha384`` (Linux 6.16+; the kernel extends RTMR = SHA-384(RTMR || digest)).

Log first, then the register: a crash between the two leaves a log one record ahead of the
register, which the next run detects and repairs (the replay with that record differs from the
register, the replay without it equals it: the record is cut off, as is a record torn by a
crash in the middle of the append). The other order would leave an extend that no log shows,
which nothing can repair until the next boot: every attestation with the log would fail to
replay. A failed extend repairs at once, the same way.

:func:`evidence_log` holds the same lock while the caller takes a quote, so that no extend
falls between reading the log and quoting, and reads the TD's event log as guest-components
sends it: the CCEL log (``/sys/firmware/acpi/tables/data/CCEL``, checked against the ACPI table
when it is there) cut at its end, then the runtime log. No CCEL, no log (not an error).
"""

from __future__ import annotations

import errno as E
import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EventLogError, TsmError, UntrustedFile
from ..wire import eventlog as wire
from . import ownership
from .config import MeasureConfig
from .retry import lock_within

SIZE = 48
#: The RTMR runtime events extend: verifiers take them from RTMR3 only (0-2 are the firmware's and the
#: boot loader's), as guest-components extends it.
RTMR = 3
RELEASE_DOMAIN, RELEASE_OPERATION = "keybroker", "release"


def register_path(cfg: MeasureConfig) -> Path:
    return cfg.root / f"rtmr{RTMR}:sha384"


def measure(cfg: MeasureConfig, event: wire.RuntimeEvent, *, once: bool = False,
            deadline: float | None = None) -> bytes:
    """Append ``event`` to the runtime log, then extend the RTMR with its digest; the RTMR's new value.

    ``once``: not when the log already holds the same event (since boot): a measured release of
    a key already measured adds nothing a verifier does not know, and the log stays bounded by
    the number of distinct releases, not by how often a user asks for a key. ``deadline``: how
    long to wait for the log's lock (a quote in progress holds it).
    """
    record = event.encode(RTMR + 1)
    fd = _open_log(cfg.log)
    try:
        _lock(fd, cfg, deadline)
        _repair(fd, cfg)
        raw = _read_fd(fd)
        if once and any(digest == event.digest() for _, mr_index, digest in _records(raw)[0]
                        if mr_index == RTMR + 1):
            return _read_register(cfg)
        _check_room(cfg, raw, record)
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, record)
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size)
            raise TsmError(f"cannot append to the runtime log {cfg.log}: {exc.strerror}", errno=exc.errno) from None
        try:
            _extend(cfg, event.digest())
        except TsmError:
            _repair(fd, cfg)  # the record the register did not take goes (unless it took it after all)
            raise
        return _read_register(cfg)
    finally:
        os.close(fd)  # and with it the lock


def release_event(resource: str, server_url: str) -> wire.RuntimeEvent:
    """The event a measured release records: the resource and the server, never the key."""
    return wire.RuntimeEvent(RELEASE_DOMAIN, RELEASE_OPERATION, f"{resource} {server_url}")


@contextmanager
def evidence_log(cfg: MeasureConfig, deadline: float | None = None) -> Iterator[Callable[[], bytes]]:
    """Keep the runtime log and the register still while the caller quotes; the function given reads
    the TD's event log (the CCEL log joined with the runtime log; b"" without a CCEL). ``deadline``:
    how long to wait for the log's lock."""
    if not cfg.ccel.exists():
        yield lambda: b""  # no firmware log, no event log sent: the runtime log is not even opened
        return
    try:
        fd: int | None = _open_log(cfg.log)
    except TsmError:
        if os.path.lexists(cfg.log):
            raise  # it may hold events: a log sent without them would not replay RTMR3
        fd = None  # no place for a log: then no runtime event was measured by keybroker
    try:
        if fd is not None:
            _lock(fd, cfg, deadline)
            _repair(fd, cfg)
        yield lambda: _joined(cfg, fd)
    finally:
        if fd is not None:
            os.close(fd)


def _lock(fd: int, cfg: MeasureConfig, deadline: float | None) -> None:
    if not lock_within(fd, deadline):
        raise TsmError(f"the runtime log {cfg.log} stayed locked past the deadline (another measurement or "
                       "quote did not end)", errno=E.ETIMEDOUT, transient=True)


def _joined(cfg: MeasureConfig, fd: int | None) -> bytes:
    area = _read_file(cfg.ccel)
    if area is None:
        return b""
    try:
        table = _read_file(cfg.ccel_table)
        if table is not None:
            wire.parse_ccel_table(table).check_area(area)
        runtime = _read_fd(fd) if fd is not None else b""
        return wire.join_logs(area, runtime)
    except EventLogError as exc:
        raise TsmError(f"the TD's event log ({cfg.ccel}, {cfg.log}) cannot be sent: {exc}", errno=E.EIO) from None


def _check_room(cfg: MeasureConfig, raw: bytes, record: bytes) -> None:
    """TsmError (EFBIG) unless the log evidence carries (the CCEL log, then the runtime log ``raw``) stays
    within the event log's limits of size and events with ``record`` appended: extended past them, RTMR3
    would hold an event that no log can be sent with, and every attestation would fail until the next boot."""
    area = _read_file(cfg.ccel)
    if area is None:
        return  # no CCEL, no log sent
    try:
        wire.join_logs(area, raw + record)
    except EventLogError as exc:
        try:
            wire.join_logs(area, raw)
        except EventLogError:
            return  # not sendable as it is: the evidence names why, this event changes nothing
        raise TsmError(f"the runtime log {cfg.log} cannot take this event: with it the TD's event log could not be "
                       f"sent ({exc}); the event is neither logged nor extended", errno=E.EFBIG) from None


# -- the register ------------------------------------------------------------------------------

def _extend(cfg: MeasureConfig, digest: bytes) -> None:
    path = register_path(cfg)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _register_error(exc, path, "open") from None
    try:
        written = os.write(fd, digest)
    except OSError as exc:
        raise _register_error(exc, path, "extend") from None
    finally:
        os.close(fd)
    if written != SIZE:
        raise TsmError(f"extending {path} took {written} of {SIZE} bytes", errno=E.EIO)


def _read_register(cfg: MeasureConfig) -> bytes:
    path = register_path(cfg)
    try:
        with open(path, "rb", buffering=0) as file:
            value = file.read(SIZE + 1)
    except OSError as exc:
        raise _register_error(exc, path, "read") from None
    if len(value) != SIZE:
        raise TsmError(f"{path} gave {len(value)} bytes, not the {SIZE} of a SHA-384 RTMR", errno=E.EIO)
    return value


def _register_error(exc: OSError, path: Path, action: str) -> TsmError:
    if exc.errno == E.ENOENT:
        return TsmError(f"no tsm-mr register {path}: runtime measurement needs a TDX guest on Linux 6.16 or "
                        "later (the tdx_guest driver's measurements), or [measure] root set to where they are",
                        errno=E.ENODEV)
    return TsmError(f"cannot {action} {path}: {exc.strerror}", errno=exc.errno)


# -- the runtime log ---------------------------------------------------------------------------

def _open_log(path: Path) -> int:
    """The runtime log, root's alone: created (and its folder, 0700) when missing; refused when it or a
    folder above is someone else's or writable by others (they could redirect or rewrite root's log)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        ownership.check(path.parent, "runtime log folder")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except UntrustedFile as exc:
        raise TsmError(str(exc), errno=E.EPERM) from None
    except OSError as exc:
        raise TsmError(f"cannot open the runtime log {path}: {exc.strerror}", errno=exc.errno) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise TsmError(f"refusing the runtime log {path}: not a regular file of this user's that only it may "
                       f"write (mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid})", errno=E.EPERM)
    if st.st_size == 0:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the new name survives a crash with the records
        finally:
            os.close(dir_fd)
    return fd


def _records(raw: bytes) -> tuple[list[tuple[int, int, bytes | None]], int, bool]:
    """(offset, MR index, SHA-384 digest) of each complete record; where they end; whether what
    follows is a record cut short (torn by a crash) rather than something unreadable."""
    out: list[tuple[int, int, bytes | None]] = []
    pos = 0
    while pos < len(raw) and raw[pos:pos + 8] not in wire.END_MARKERS:
        if pos + 12 > len(raw):
            return out, pos, True
        mr_index, _, count = struct.unpack_from("<III", raw, pos)
        at, digest = pos + 12, None
        if count > wire.DIGESTS_MAX:
            return out, pos, False
        for _ in range(count):
            if at + 2 > len(raw):
                return out, pos, True
            alg = struct.unpack_from("<H", raw, at)[0]
            if alg not in wire.ALGORITHMS:
                return out, pos, False
            size = wire.ALGORITHMS[alg][1]
            if alg == wire.ALG_SHA384:
                digest = raw[at + 2:at + 2 + size]
            at += 2 + size
        if at + 4 > len(raw):
            return out, pos, True
        end = at + 4 + struct.unpack_from("<I", raw, at)[0]
        if end > len(raw):
            return out, pos, True
        out.append((pos, mr_index, digest))
        pos = end
    return out, pos, False


def _repair(fd: int, cfg: MeasureConfig) -> None:
    """Cut off what a crash (or a failed extend) left: a torn last record, or a last record the
    register never took. Anything else the log and the register disagree on is left for the
    verifier to refuse: it is not what a crash of :func:`measure` leaves."""
    raw = _read_fd(fd)
    records, end, torn = _records(raw)
    if torn:
        os.ftruncate(fd, end)
        os.fsync(fd)
    mine = [(offset, digest) for offset, mr_index, digest in records if mr_index == RTMR + 1]
    if not mine or mine[-1][0] != records[-1][0] or any(digest is None for _, digest in mine):
        return
    try:
        current = _read_register(cfg)
    except TsmError:
        return  # no registers to compare with: nothing can be extended either
    value = _boot_value(cfg)
    if value is None:
        return
    for _, digest in mine[:-1]:
        value = hashlib.sha384(value + digest).digest()  # type: ignore[operator]
    last_offset, last_digest = mine[-1]
    if value != current or hashlib.sha384(value + last_digest).digest() == current:  # type: ignore[operator]
        return
    os.ftruncate(fd, last_offset)
    os.fsync(fd)


def _boot_value(cfg: MeasureConfig) -> bytes | None:
    """RTMR3 as the firmware's log left it (zero: the firmware does not extend it; a CCEL that does is
    taken at its word); None when the CCEL is there but unreadable as a log."""
    area = _read_file(cfg.ccel)
    if area is None:
        return bytes(SIZE)
    try:
        log = wire.parse_event_log(area)
    except EventLogError:
        return None
    value = bytes(SIZE)
    for event in log.events:
        if event.mr_index == RTMR + 1 and event.event_type != wire.EV_NO_ACTION:
            digest = event.digests.get(wire.ALG_SHA384)
            if digest is None:
                return None
            value = hashlib.sha384(value + digest).digest()
    return value


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > wire.LOG_MAX:
        raise TsmError(f"the runtime log is {size} bytes, more than the {wire.LOG_MAX} an event log may be",
                       errno=E.EFBIG)
    return os.pread(fd, size, 0)


def _read_file(path: Path) -> bytes | None:
    """A sysfs or regular file, up to the event log limit; None when it is not there (or not ours to read)."""
    try:
        with open(path, "rb", buffering=0) as file:
            chunks, total = [], 0
            while chunk := file.read(65536):
                chunks.append(chunk)
                total += len(chunk)
                if total > wire.LOG_MAX:
                    raise TsmError(f"{path} is larger than {wire.LOG_MAX} bytes: not an event log", errno=E.EFBIG)
            return b"".join(chunks)
    except (FileNotFoundError, PermissionError):
        return None
    except OSError as exc:
        raise TsmError(f"cannot read {path}: {exc.strerror}", errno=exc.errno) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

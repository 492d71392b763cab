"""A FUSE filesystem that behaves like the kernel's configfs-tsm report ABI.

The tree appears at ``MOUNTPOINT/tsm/report`` as below ``/sys/kernel/config``. What it
reproduces (configfs-tsm.md §7), in the kernel's terms:

* mkdir creates an entry whose attribute set is fixed by the provider's visibility rules;
  rmdir removes it even while fds are open (which then see ENOENT on unfilled reads and on
  text writes, while pending inblob writes are dropped). mkdir inside an entry, rmdir of
  ``report``, unlink of an attribute: EPERM; a new file: EACCES.
* Modes 0444/0200; opening in the wrong direction is EACCES, for root too.
* Text attributes: a read fills one page per fd; each write() is one store, immediately.
* Binary attributes: writes accumulate per fd (EFBIG past 64 inblob bytes) and commit at
  close, also after an EFBIG (configfs marks the write in progress first); the first read
  of an fd takes a snapshot that serves every later read.
* The generation counter with its wrap guard; one provider call fills every blob and is
  cached until the next write; EINVAL for a blob read before any inblob.
* One lock across all entries: report generation holds it exclusively, everything else
  shares it, so a slow provider stalls every entry as the kernel's tsm_rwsem does.
* The guest driver unloaded (SIGUSR1) and loaded again (SIGUSR2), as since Linux 6.15: entries
  stay; mkdir, ``provider``, ``privlevel_floor``, ``privlevel`` and a report not cached give
  ENXIO; the driver cannot register again while any entry is left.
"""

from __future__ import annotations

import errno as E
import itertools
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mfusepy

from ..wire.envelope import BLOB_MAX as OUTBLOB_MAX
from ..wire.envelope import INBLOB_MAX
from .providers import Blobs, Provider, Request

TEXT_PAGE = 4096                # configfs text attributes: SIMPLE_ATTR_SIZE
PRIVLEVEL_MAX = 3
U64 = 2**64

# name -> (binary, writable); the mode follows: 0200 for writable, 0444 for readable.
ATTRIBUTES = {
    "inblob": (True, True), "outblob": (True, False), "auxblob": (True, False),
    "manifestblob": (True, False), "provider": (False, False), "generation": (False, False),
    "privlevel": (False, True), "privlevel_floor": (False, False),
    "service_provider": (False, True), "service_guid": (False, True),
    "service_manifest_version": (False, True),
}


class _RWLock:
    """A writer-preferring reader/writer lock, standing in for the kernel's tsm_rwsem."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Entry:
    """One report entry (struct tsm_report_state)."""

    name: str
    attributes: frozenset[str]
    created: float = field(default_factory=time.time)
    dead: bool = False
    write_gen: int = 0
    read_gen: int = 0
    inblob: bytes = b""
    privlevel: int = 0
    service_provider: str | None = None
    service_guid: str | None = None
    service_manifest_version: int = 0
    blobs: Blobs | None = None


@dataclass
class OpenFile:
    entry: Entry
    name: str
    binary: bool
    writable: bool
    data: bytes | None = None      # read snapshot (binary) or page (text)
    buffer: bytearray | None = None  # pending binary write
    committed: bool = False


def _err(code: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(code)


class ReportFs(mfusepy.Operations):
    """The mfusepy operations of the emulated ``tsm/report`` tree."""

    use_ns = True

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.entries: dict[str, Entry] = {}
        self.files: dict[int, OpenFile] = {}
        self.fh = itertools.count(1)
        self.tsm_rwsem = _RWLock()  # not "lock": that name is a FUSE operation
        self.mutex = threading.Lock()  # protects the dicts above
        self.mounted = time.time()
        self.registered = True  # the provider's driver is loaded (tsm_report_register)

    def unregister(self) -> None:
        """tsm_report_unregister(): always succeeds; the entries stay."""
        with self.tsm_rwsem.write():
            self.registered = False

    def register(self) -> bool:
        """tsm_report_register(): refused (EBUSY, "configfs/tsm/report not empty") while entries remain."""
        with self.tsm_rwsem.write(), self.mutex:
            self.registered = self.registered or not self.entries
            return self.registered

    def _need_provider(self) -> None:
        if not self.registered:
            raise _err(E.ENXIO)

    # -- FUSE plumbing -------------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        if config is not None:
            # No caching of names or attributes: mkdir, rmdir and visibility act at once.
            config.entry_timeout = 0
            config.negative_timeout = 0
            config.attr_timeout = 0
            config.hard_remove = 1
            config.direct_io = 1

    def _resolve(self, path: str) -> tuple[str, Entry | None, str | None]:
        """Classify ``path``: ("root"|"tsm"|"report"|"entry"|"attr", entry, attribute)."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return "root", None, None
        if parts[0] != "tsm":
            raise _err(E.ENOENT)
        if len(parts) == 1:
            return "tsm", None, None
        if parts[1] != "report":
            raise _err(E.ENOENT)
        if len(parts) == 2:
            return "report", None, None
        with self.mutex:
            entry = self.entries.get(parts[2])
        if entry is None:
            raise _err(E.ENOENT)
        if len(parts) == 3:
            return "entry", entry, None
        if len(parts) == 4 and parts[3] in entry.attributes:
            return "attr", entry, parts[3]
        raise _err(E.ENOENT)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        kind, entry, attr = self._resolve(path)
        when = int((entry.created if entry else self.mounted) * 1e9)
        st = {"st_uid": 0, "st_gid": 0, "st_atime": when, "st_mtime": when, "st_ctime": when}
        if kind != "attr":
            return st | {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0}
        binary, writable = ATTRIBUTES[attr]  # type: ignore[index]
        return st | {"st_mode": stat.S_IFREG | (0o200 if writable else 0o444), "st_nlink": 1,
                     "st_size": 0 if binary else TEXT_PAGE}

    def readdir(self, path: str, fh: Any) -> list[str]:
        kind, entry, _ = self._resolve(path)
        names = {"root": ["tsm"], "tsm": ["report"]}.get(kind)
        if names is None and kind == "report":
            with self.mutex:
                names = sorted(self.entries)
        elif names is None and kind == "entry":
            names = sorted(entry.attributes)  # type: ignore[union-attr]
        elif names is None:
            raise _err(E.ENOTDIR)
        return [".", "..", *names]

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    # -- directory operations ------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        parent, _, name = path.rstrip("/").rpartition("/")
        kind, _, _ = self._resolve(parent)
        if kind != "report":
            raise _err(E.EPERM)  # only the report group makes items
        with self.tsm_rwsem.read(), self.mutex:
            self._need_provider()
            if name in self.entries:
                raise _err(E.EEXIST)
            self.entries[name] = Entry(name, self.provider.visible)
        return 0

    def rmdir(self, path: str) -> int:
        kind, entry, _ = self._resolve(path)
        if kind != "entry":
            raise _err(E.EPERM)  # default groups cannot be removed
        with self.mutex:
            entry.dead = True  # type: ignore[union-attr]
            del self.entries[entry.name]  # type: ignore[union-attr]
        return 0

    def unlink(self, path: str) -> int:
        self._resolve(path)
        raise _err(E.EPERM)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise _err(E.EACCES)  # configfs has no create

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        # O_TRUNC on open ("echo > attr") reaches us as a truncate: a no-op, as on configfs.
        kind, _, attr = self._resolve(path)
        if kind != "attr" or not ATTRIBUTES[attr][1]:  # type: ignore[index]
            raise _err(E.EACCES)
        return 0

    # -- files ---------------------------------------------------------------------------

    def open(self, path: str, fi: Any) -> int:
        kind, entry, attr = self._resolve(path)
        if kind != "attr":
            raise _err(E.EISDIR)
        binary, writable = ATTRIBUTES[attr]  # type: ignore[index]
        access = fi.flags & os.O_ACCMODE
        # configfs refuses an open in the direction the attribute lacks, for root too.
        if access == os.O_RDWR or (access == os.O_WRONLY) != writable:
            raise _err(E.EACCES)
        handle = next(self.fh)
        with self.mutex:
            self.files[handle] = OpenFile(entry, attr, binary, writable)  # type: ignore[arg-type]
        fi.fh = handle
        fi.direct_io = 1     # every read and write reaches us; st_size does not bound reads
        fi.keep_cache = 0
        fi.nonseekable = 1 if binary else 0
        return 0

    def _file(self, fh: Any) -> OpenFile:
        with self.mutex:
            of = self.files.get(fh.fh)
        if of is None:
            raise _err(E.EBADF)
        return of

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        of = self._file(fh)
        if of.data is None:
            of.data = self._fill(of)
        return of.data[offset:offset + size]

    def _fill(self, of: OpenFile) -> bytes:
        if not of.binary:
            with self.tsm_rwsem.read():
                if of.entry.dead:
                    raise _err(E.ENOENT)
                return self._show(of.entry, of.name).encode()
        blob = self._blob(of.entry, of.name)
        if len(blob) > OUTBLOB_MAX:
            raise _err(E.EFBIG)
        return blob

    def _show(self, entry: Entry, name: str) -> str:
        if name == "generation":
            return f"{entry.write_gen}\n"
        self._need_provider()
        if name == "provider":
            return f"{self.provider.name}\n"
        if name == "privlevel_floor":
            return f"{self.provider.privlevel_floor}\n"
        raise _err(E.EACCES)

    def _blob(self, entry: Entry, name: str) -> bytes:
        """tsm_report_read(): serve the cached report or generate a new one for every blob.

        The fast path shares the lock; the slow path takes it exclusively and looks again,
        since another reader may have generated the report in between.
        """
        with self.tsm_rwsem.read():
            cached = self._cached(entry, name)
        if cached is not None:
            return cached
        with self.tsm_rwsem.write():
            self._need_provider()
            cached = self._cached(entry, name)
            if cached is not None:
                return cached
            entry.blobs = None  # the previous report is gone, also if this generation fails
            request = Request(entry.inblob, entry.privlevel, entry.service_provider,
                              entry.service_guid, entry.service_manifest_version)
            try:
                entry.blobs = self.provider.report(request)
            except OSError as exc:
                raise _err(exc.errno or E.EIO) from None
            entry.read_gen = entry.write_gen
            return getattr(entry.blobs, name)

    @staticmethod
    def _cached(entry: Entry, name: str) -> bytes | None:
        """The cached blob when the report is current; None when it must be generated."""
        if entry.dead:
            raise _err(E.ENOENT)
        if not entry.inblob:
            raise _err(E.EINVAL)  # reading a blob before any inblob
        if entry.blobs is not None and entry.read_gen == entry.write_gen:
            return getattr(entry.blobs, name)
        return None

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        of = self._file(fh)
        if not of.binary:
            return self._store(of.entry, of.name, data[:TEXT_PAGE - 1])
        if of.buffer is None:
            of.buffer = bytearray()  # a write was tried: close commits, even what EFBIG left empty
        if offset + len(data) > INBLOB_MAX:
            raise _err(E.EFBIG)
        if len(of.buffer) < offset:
            of.buffer.extend(bytes(offset - len(of.buffer)))
        of.buffer[offset:offset + len(data)] = data
        return len(data)

    def flush(self, path: str, fh: Any) -> int:
        # close(2) sends FLUSH synchronously (RELEASE comes later, asynchronously): commit
        # here so the commit is visible when close() returns, once per open file.
        self._commit(self._file(fh))
        return 0

    def release(self, path: str, fh: Any) -> int:
        with self.mutex:
            of = self.files.pop(fh.fh, None)
        if of is not None:
            self._commit(of)
        return 0

    def _commit(self, of: OpenFile) -> None:
        if of.buffer is None or of.committed:
            return
        of.committed = True
        with self.tsm_rwsem.write():
            if of.entry.dead:
                return  # a pending write to a removed entry is dropped
            if not self._advance(of.entry):
                return  # the kernel ignores errors at commit
            of.entry.inblob = bytes(of.buffer)

    # -- text stores (report.c *_store) --------------------------------------------------

    def _store(self, entry: Entry, name: str, data: bytes) -> int:
        text = data.split(b"\0", 1)[0].decode("latin-1")
        if name in ("privlevel", "service_manifest_version"):
            value = _kstrtouint(text)
        with self.tsm_rwsem.write():
            if entry.dead:
                raise _err(E.ENOENT)
            if name == "privlevel":
                self._need_provider()
                if value < self.provider.privlevel_floor or value > PRIVLEVEL_MAX:
                    raise _err(E.EINVAL)
                self._advance_or_busy(entry)
                entry.privlevel = value
            elif name == "service_manifest_version":
                self._advance_or_busy(entry)
                entry.service_manifest_version = value
            elif name == "service_provider":
                self._advance_or_busy(entry)  # bumped before the value is stored
                entry.service_provider = text[:-1] if text.endswith("\n") else text
            elif name == "service_guid":
                self._advance_or_busy(entry)  # bumped, and the GUID reset, even if parsing fails
                entry.service_guid = None
                guid = _parse_guid(text)
                entry.service_guid = None if guid == "00000000-0000-0000-0000-000000000000" else guid
            else:
                raise _err(E.EACCES)
        return len(data)

    @staticmethod
    def _advance(entry: Entry) -> bool:
        """try_advance_write_generation(): refuse to wrap onto the last read generation."""
        if entry.write_gen == (entry.read_gen - 1) % U64:
            return False
        entry.write_gen = (entry.write_gen + 1) % U64
        return True

    def _advance_or_busy(self, entry: Entry) -> None:
        if not self._advance(entry):
            raise _err(E.EBUSY)


def _kstrtouint(text: str) -> int:
    """kstrtouint(buf, 0): base from the prefix, optional '+', one trailing newline."""
    if text.endswith("\n"):
        text = text[:-1]
    if text.startswith("+"):
        text = text[1:]
    base = 10
    if text[:2].lower() == "0x" and len(text) > 2:
        base, text = 16, text[2:]
    elif text.startswith("0") and len(text) > 1:
        base, text = 8, text[1:]
    digits = "0123456789abcdef"[:base]
    if not text or any(c not in digits for c in text.lower()):
        raise _err(E.EINVAL)
    value = int(text, base)
    if value >= 2**32:
        raise _err(E.ERANGE)
    return value


def _parse_guid(text: str) -> str:
    """guid_parse(): exactly the first 36 characters, 8-4-4-4-12 hex digits."""
    guid = text[:36]
    ok = len(guid) == 36 and all(
        (c == "-") if i in (8, 13, 18, 23) else c in "0123456789abcdefABCDEF" for i, c in enumerate(guid))
    if not ok:
        raise _err(E.EINVAL)
    return guid.lower()


def serve(mountpoint: str, provider: Provider, operations: mfusepy.Operations | None = None) -> None:
    """Mount the emulator and serve in the foreground until unmounted or sent SIGTERM/SIGINT/SIGHUP.

    The stop signals are taken by a thread of ours (libfuse leaves signals alone that are
    not at their default): it interrupts a slow provider and detaches the mount, so the
    emulator stops at once even while a report is being generated. SIGUSR1 unloads the guest
    driver, SIGUSR2 loads it again. ``operations`` is the whole mount (``sysfs.operations``:
    configfs-tsm and, for a TD, its measurement registers); by default configfs-tsm alone.
    """
    import ctypes
    import signal
    import sys

    os.makedirs(mountpoint, exist_ok=True)
    mount: mfusepy.Operations = operations or ReportFs(provider)
    report: ReportFs = getattr(mount, "report", mount)  # sysfs.Mount serves configfs-tsm by a ReportFs
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    driver_signals = {signal.SIGUSR1, signal.SIGUSR2}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals | driver_signals)  # inherited by libfuse's threads

    def on_stop() -> None:
        while (received := signal.sigwait(stop_signals | driver_signals)) in driver_signals:
            if received == signal.SIGUSR1:
                report.unregister()
            elif not report.register():
                print("keybroker tsm-sim: the provider cannot register while entries remain in tsm/report "
                      "(EBUSY)", file=sys.stderr, flush=True)
        provider.interrupt()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(mountpoint.encode(), 2)  # MNT_DETACH: the FUSE loop then ends

    threading.Thread(target=on_stop, name="stop", daemon=True).start()
    try:
        mfusepy.FUSE(mount, mountpoint, raw_fi=True, foreground=True,
                     allow_other=True, default_permissions=True, fsname="configfs-tsm-sim",
                     subtype="keybroker")
    except RuntimeError as exc:
        # libfuse 3 reports a loop ended by unmounting or a signal as status 8: the normal
        # way to stop the emulator. Other statuses are real failures.
        if exc.args != (8,):
            raise RuntimeError(f"FUSE failed at {mountpoint} (libfuse status {exc.args[0]})") from None

"""The emulated TD's sysfs: the tsm-mr measurement registers and the ACPI CCEL, next to configfs-tsm.

For ``tdx_guest`` the emulator's mount holds, besides ``tsm/report``::

    MOUNTPOINT/sys/class/misc/tdx_guest/measurements/   as /sys/class/misc/tdx_guest/measurements
        rtmr0:sha384 ... rtmr3:sha384   0644  live RTMRs; writing 48 bytes extends
        mrtd:sha384 mrconfigid mrowner mrownerconfig  0444
    MOUNTPOINT/sys/firmware/acpi/tables/CCEL            0400  the ACPI CCEL table
    MOUNTPOINT/sys/firmware/acpi/tables/data/CCEL       0400  the firmware's event log area

with the kernel's semantics (drivers/virt/coco/tsm-mr.c over sysfs binary attributes, Linux 6.16):
a read gives the register's 48 raw bytes (binary, not hex; st_size 48, EOF after them); a write
to an RTMR at offset 0 of exactly 48 bytes extends it (SHA-384(RTMR || data)); sysfs first cuts a
longer write to the attribute's size (so 49 bytes extend with the first 48 and the write returns
48), a shorter one or one at another offset is EINVAL, at or past offset 48 EFBIG. Opening a
read-only register (or a CCEL file) for writing is EACCES, for root too, as sysfs checks the mode
on open. The values are those of :class:`~keybroker.sim.ccel.Registers`, which the quotes report.
"""

from __future__ import annotations

import errno as E
import os
import stat
import time
from typing import Any

import mfusepy

from .ccel import REGISTERS, SIZE, BootLog, Registers
from .fs import ReportFs
from .providers import Provider

MEASUREMENTS = "/sys/class/misc/tdx_guest/measurements"
TABLES = "/sys/firmware/acpi/tables"


def _err(code: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(code)


class MeasurementFs:
    """The ``/sys`` subtree: directories, the register files, the CCEL table and log."""

    def __init__(self, registers: Registers, boot: BootLog) -> None:
        self.registers = registers
        self.files: dict[str, tuple[int, str | bytes]] = {}  # path -> (mode, register name or content)
        for name, file, writable in REGISTERS:
            self.files[f"{MEASUREMENTS}/{file}"] = (0o644 if writable else 0o444, name)  # tsm-mr: 0444 | 0200
        self.files[f"{TABLES}/CCEL"] = (0o400, boot.table)
        self.files[f"{TABLES}/data/CCEL"] = (0o400, boot.area)
        self.dirs: dict[str, set[str]] = {}
        for path in self.files:
            parts = path.strip("/").split("/")
            for depth in range(len(parts)):
                self.dirs.setdefault("/" + "/".join(parts[:depth]), set()).add(parts[depth])
        self.mounted = time.time()

    def _size(self, content: str | bytes) -> int:
        return SIZE if isinstance(content, str) else len(content)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        when = int(self.mounted * 1e9)
        st = {"st_uid": 0, "st_gid": 0, "st_atime": when, "st_mtime": when, "st_ctime": when}
        if path in self.dirs:
            return st | {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0}
        if path in self.files:
            mode, content = self.files[path]
            return st | {"st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": self._size(content)}
        raise _err(E.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path in self.dirs:
            return [".", "..", *sorted(self.dirs[path])]
        raise _err(E.ENOTDIR if path in self.files else E.ENOENT)

    def open(self, path: str, fi: Any) -> int:
        self.getattr(path)
        if path in self.dirs:
            raise _err(E.EISDIR)
        mode, _ = self.files[path]
        if (fi.flags & os.O_ACCMODE) != os.O_RDONLY and not mode & 0o200:
            raise _err(E.EACCES)  # KERNFS_ROOT_EXTRA_OPEN_PERM_CHECK: the mode binds root too
        fi.direct_io = 1  # every read reaches us: a live register is read when asked
        fi.keep_cache = 0
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        mode, _ = self.files.get(path, (0, b""))
        if not mode & 0o200:
            raise _err(E.EACCES)
        return 0  # O_TRUNC on open: kernfs ignores the size

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        _, content = self.files[path]
        data = self.registers.read(content) if isinstance(content, str) else content
        return data[offset:offset + size]

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        _, name = self.files[path]
        assert isinstance(name, str)
        if offset >= SIZE:
            raise _err(E.EFBIG)            # sysfs_kf_bin_write: at or past the attribute's size
        count = min(len(data), SIZE - offset)  # ... and a longer write is cut to it
        if offset != 0 or count != SIZE:
            raise _err(E.EINVAL)           # tm_digest_write: partial writes are not supported
        self.registers.extend(name, bytes(data[:SIZE]))
        return count


class Mount(mfusepy.Operations):
    """The emulator's whole mount: ``tsm/...`` served by configfs-tsm's :class:`ReportFs`, ``sys/...``
    by :class:`MeasurementFs`."""

    use_ns = True

    def __init__(self, report: ReportFs, sysfs: MeasurementFs) -> None:
        self.report, self.sysfs = report, sysfs

    def _sys(self, path: str) -> bool:
        return path == "/sys" or path.startswith("/sys/")

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        self.report.init_with_config(conn_info, config)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        return self.sysfs.getattr(path) if self._sys(path) else self.report.getattr(path, fh)

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path == "/":
            return [".", "..", "sys", "tsm"]
        return self.sysfs.readdir(path, fh) if self._sys(path) else self.report.readdir(path, fh)

    def statfs(self, path: str) -> dict[str, int]:
        return self.report.statfs(path)

    def mkdir(self, path: str, mode: int) -> int:
        if self._sys(path):
            raise _err(E.EPERM)
        return self.report.mkdir(path, mode)

    def rmdir(self, path: str) -> int:
        if self._sys(path):
            raise _err(E.EPERM)
        return self.report.rmdir(path)

    def unlink(self, path: str) -> int:
        if self._sys(path):
            raise _err(E.EPERM)
        return self.report.unlink(path)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise _err(E.EACCES)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        return self.sysfs.truncate(path, length) if self._sys(path) else self.report.truncate(path, length, fh)

    def open(self, path: str, fi: Any) -> int:
        return self.sysfs.open(path, fi) if self._sys(path) else self.report.open(path, fi)

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        return self.sysfs.read(path, size, offset, fh) if self._sys(path) else self.report.read(path, size, offset, fh)

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        if self._sys(path):
            return self.sysfs.write(path, data, offset, fh)
        return self.report.write(path, data, offset, fh)

    def flush(self, path: str, fh: Any) -> int:
        return 0 if self._sys(path) else self.report.flush(path, fh)

    def release(self, path: str, fh: Any) -> int:
        return 0 if self._sys(path) else self.report.release(path, fh)


def operations(provider: Provider) -> mfusepy.Operations:
    """What the emulator mounts for ``provider``: configfs-tsm, and for a TD its sysfs too."""
    report = ReportFs(provider)
    registers, boot = getattr(provider, "registers", None), getattr(provider, "boot", None)
    if registers is None or boot is None:
        return report
    return Mount(report, MeasurementFs(registers, boot))

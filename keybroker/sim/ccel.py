"""The emulated TD's measurement registers and its firmware's event log (the ACPI CCEL).

A real TD boots with MRTD built by the TDX module and RTMR0-2 extended by its firmware (TDVF),
the boot loader and the kernel, each extend logged in the CCEL event log; RTMR3 starts at zero
and is the guest's to extend. The emulator does the same: at each start (a boot) it builds a
small, plausible boot log from the simulated platform's identity (so the same ``--state`` gives
the same log and RTMR0-2 every time), replays it into RTMR0-2, and starts RTMR3 at zero.
:class:`Registers` holds the live values: tsm-mr writes extend them, and the emulated quotes
report them.

The log (TCG PC Client crypto-agile, SHA-384 only, as TDVF writes it):

* RTMR0: the configuration firmware volume (EV_EFI_PLATFORM_FIRMWARE_BLOB2 "TDVF CFV"), the
  TD HOB (EV_EFI_HANDOFF_TABLES2 "TdxTable"), a separator;
* RTMR1: "Calling EFI Application from Boot Option" (EV_EFI_ACTION), a separator, the shim and
  the kernel (EV_EFI_BOOT_SERVICES_APPLICATION, with their file paths);
* RTMR2: grub's ``linux`` command and the kernel command line (EV_IPL, as grub 2.12 measures them).

It is padded with 0xFF to the table's log area (LAML, 64 KiB), as the unused area reads.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass

from ..wire import eventlog as wire

LAML = 0x10000
LASA = 0x7F000000
KERNEL_CMDLINE = "/vmlinuz root=/dev/vda1 ro console=ttyS0"
#: The registers tsm-mr shows for tdx_guest, in the driver's order: (name, file name, writable).
REGISTERS = (("rtmr0", "rtmr0:sha384", True), ("rtmr1", "rtmr1:sha384", True),
             ("rtmr2", "rtmr2:sha384", True), ("rtmr3", "rtmr3:sha384", True),
             ("mrtd", "mrtd:sha384", False), ("mrconfigid", "mrconfigid", False),
             ("mrowner", "mrowner", False), ("mrownerconfig", "mrownerconfig", False))
SIZE = 48


@dataclass(frozen=True)
class BootLog:
    table: bytes   # /sys/firmware/acpi/tables/CCEL
    area: bytes    # /sys/firmware/acpi/tables/data/CCEL
    rtmrs: tuple[bytes, bytes, bytes, bytes]


class Registers:
    """A TD's measurement registers: MRTD and the configuration ones fixed, RTMR0-3 extensible."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self._values = dict(values)
        self._lock = threading.Lock()

    def read(self, name: str) -> bytes:
        with self._lock:
            return self._values[name]

    def extend(self, name: str, digest: bytes) -> None:
        """TDG.MR.RTMR.EXTEND: RTMR = SHA-384(RTMR || digest)."""
        assert name.startswith("rtmr") and len(digest) == SIZE
        with self._lock:
            self._values[name] = hashlib.sha384(self._values[name] + digest).digest()

    def hex_values(self) -> dict[str, str]:
        with self._lock:
            return {name: value.hex() for name, value in self._values.items()}


def _event(mr_index: int, event_type: int, data: bytes, measured: bytes) -> tuple[int, bytes, bytes]:
    digest = hashlib.sha384(measured).digest()
    record = (struct.pack("<IIIH", mr_index, event_type, 1, wire.ALG_SHA384) + digest
              + struct.pack("<I", len(data)) + data)
    return mr_index, digest, record


def _spec_id() -> bytes:
    body = (wire.SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
            + struct.pack("<HH", wire.ALG_SHA384, SIZE) + b"\0")
    return struct.pack("<II", 1, wire.EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def _labelled(label: str, tail: bytes) -> bytes:
    """UEFI_PLATFORM_FIRMWARE_BLOB2 / UEFI_HANDOFF_TABLE_POINTERS2: a u8-sized description first."""
    return bytes([len(label)]) + label.encode() + tail


def _image(path: str, length: int) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT with a media file path device path, then the end node."""
    name = (path + "\0").encode("utf-16-le")
    device_path = struct.pack("<BBH", 4, 4, 4 + len(name)) + name + struct.pack("<BBH", 0x7F, 0xFF, 4)
    return struct.pack("<QQQQ", 0x7E000000, length, 0, len(device_path)) + device_path


def ccel_table() -> bytes:
    """The ACPI CCEL table (ACPI 6.5, 5.2.34) of a TDX guest, with a correct checksum."""
    body = bytearray(b"CCEL" + struct.pack("<IBB6s8sI4sI", 56, 1, 0, b"KBSIM ", b"KBSIMTDX", 1, b"KBRK", 1)
                     + struct.pack("<BBHQQ", 2, 0, 0, LAML, LASA))
    body[9] = (-sum(body)) % 256
    return bytes(body)


def boot_log(identity: bytes, cmdline: str = KERNEL_CMDLINE) -> BootLog:
    """The boot log of a TD whose platform is ``identity`` (its MRTD: what its firmware measured)."""
    def blob(what: bytes) -> bytes:  # the bytes firmware "loaded": stable for one identity
        return hashlib.sha384(b"keybroker tsm-sim " + what + identity).digest()

    separator = b"\0\0\0\0"
    shim, kernel = blob(b"shim"), blob(b"kernel")
    events = [
        _event(1, 0x8000000A, _labelled("TDVF CFV", struct.pack("<QQ", 0xFFC00000, 0x40000)), blob(b"cfv")),
        _event(1, 0x8000000B, _labelled("TdxTable", struct.pack("<Q", 0)), blob(b"td hob")),
        _event(1, wire.EV_SEPARATOR, separator, separator),
        _event(2, 0x80000007, b"Calling EFI Application from Boot Option",
               b"Calling EFI Application from Boot Option"),
        _event(2, wire.EV_SEPARATOR, separator, separator),
        _event(2, wire.EV_EFI_BOOT_SERVICES_APPLICATION, _image("\\EFI\\BOOT\\BOOTX64.EFI", 950_000), shim),
        _event(2, wire.EV_EFI_BOOT_SERVICES_APPLICATION, _image("\\vmlinuz", 14_000_000), kernel),
        _event(3, wire.EV_IPL, f"grub_cmd: linux {cmdline}\0".encode(), f"linux {cmdline}".encode()),
        _event(3, wire.EV_IPL, f"grub_kernel_cmdline {cmdline}\0".encode(), cmdline.encode()),
    ]
    rtmrs = [bytes(SIZE)] * 4
    for mr_index, digest, _ in events:
        rtmrs[mr_index - 1] = hashlib.sha384(rtmrs[mr_index - 1] + digest).digest()
    log = _spec_id() + b"".join(record for _, _, record in events)
    assert len(log) < LAML
    return BootLog(ccel_table(), log.ljust(LAML, b"\xff"), (rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]))


def registers(values: dict[str, str], boot: BootLog) -> Registers:
    """The registers at boot: the platform's fixed ones from ``values`` (hex), RTMR0-2 from the boot log."""
    fixed = {name: bytes.fromhex(values[name]) for name, _, writable in REGISTERS if not writable}
    return Registers(fixed | {f"rtmr{i}": boot.rtmrs[i] for i in range(4)})

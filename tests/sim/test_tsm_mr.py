"""The emulated TD's sysfs: tsm-mr registers (read, extend, errors) and the CCEL, consistent with the quotes."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from sim.test_tsm_sim import NONCE, oserror, read, write

from keybroker.verifier.tdx.abi import parse_quote
from keybroker.verifier.tdx.eventlog import claims, replay
from keybroker.wire.eventlog import parse_ccel_table, parse_event_log

MEASUREMENTS = "sys/class/misc/tdx_guest/measurements"


def quote_rtmrs(report_root: Path) -> tuple[bytes, ...]:
    entry = report_root / f"q{os.urandom(4).hex()}"
    os.mkdir(entry)
    try:
        write(entry / "inblob", NONCE)
        return parse_quote(read(entry / "outblob")).body.rtmrs
    finally:
        os.rmdir(entry)


def test_registers_files_modes_and_binary_values(tsm_sim):
    root = tsm_sim("tdx_guest")
    mr = root.parent.parent / MEASUREMENTS
    assert sorted(os.listdir(mr)) == sorted(["mrconfigid", "mrowner", "mrownerconfig", "mrtd:sha384",
                                             *(f"rtmr{i}:sha384" for i in range(4))])
    for i in range(4):
        st = os.stat(mr / f"rtmr{i}:sha384")
        assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_size == 48
    assert stat.S_IMODE(os.stat(mr / "mrtd:sha384").st_mode) == 0o444
    rtmrs = quote_rtmrs(root)
    assert tuple(read(mr / f"rtmr{i}:sha384") for i in range(4)) == rtmrs  # 48 raw bytes, not hex
    assert rtmrs[3] == bytes(48) and all(r != bytes(48) for r in rtmrs[:3])


def test_extend_semantics_and_errors(tsm_sim):
    root = tsm_sim("tdx_guest")
    mr = root.parent.parent / MEASUREMENTS
    before = read(mr / "rtmr3:sha384")
    digest = hashlib.sha384(b"event").digest()
    write(mr / "rtmr3:sha384", digest)
    after = hashlib.sha384(before + digest).digest()
    assert read(mr / "rtmr3:sha384") == after
    assert quote_rtmrs(root)[3] == after  # the next quote reports it
    assert oserror(write, mr / "rtmr3:sha384", bytes(47)) == errno.EINVAL
    fd = os.open(mr / "rtmr3:sha384", os.O_WRONLY)
    try:
        assert os.write(fd, bytes(49)) == 48  # sysfs cuts a longer write to the attribute's size
        assert oserror(os.pwrite, fd, bytes(48), 48) == errno.EFBIG
        assert oserror(os.pwrite, fd, bytes(48), 1) == errno.EINVAL
    finally:
        os.close(fd)
    assert read(mr / "rtmr3:sha384") == hashlib.sha384(after + bytes(48)).digest()
    for name in ("mrtd:sha384", "mrconfigid", "mrowner", "mrownerconfig"):
        assert oserror(os.open, mr / name, os.O_WRONLY) == errno.EACCES
    assert oserror(os.mkdir, mr / "x") in (errno.EPERM, errno.EACCES)


def test_ccel_replays_to_the_boot_rtmrs(tsm_sim):
    root = tsm_sim("tdx_guest")
    tables = root.parent.parent / "sys/firmware/acpi/tables"
    table = parse_ccel_table(read(tables / "CCEL"))
    area = read(tables / "data" / "CCEL")
    assert table.cc_name == "TDX" and len(area) == table.laml
    assert stat.S_IMODE(os.stat(tables / "CCEL").st_mode) == 0o400
    assert oserror(os.open, tables / "CCEL", os.O_WRONLY) == errno.EACCES
    result = replay(parse_event_log(area))
    assert result.rtmrs == quote_rtmrs(root)
    c = claims(result)
    assert {"rtmr": 2, "type": "EV_IPL", "label": "grub_kernel_cmdline",
            "text": "/vmlinuz root=/dev/vda1 ro console=ttyS0"} in [
        {k: v for k, v in e.items() if k != "digest"} for e in c["tdx.events"]]
    assert [e["label"] for e in c["tdx.events"] if e["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"] == [
        "\\EFI\\BOOT\\BOOTX64.EFI", "\\vmlinuz"]


def test_the_same_platform_boots_to_the_same_rtmrs(tsm_sim):
    first = quote_rtmrs(tsm_sim("tdx_guest"))
    assert quote_rtmrs(tsm_sim("tdx_guest")) == first


def test_other_providers_have_no_sysfs(tsm_sim):
    root = tsm_sim("sev_guest")
    assert not (root.parent.parent / "sys").exists()

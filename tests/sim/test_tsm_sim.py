"""The configfs-tsm emulator, driven as the kernel ABI is: raw mkdir, open, write, read."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from support.checks import check_cca, check_snp, check_tdx, snp_certs
from support.emulator import guest_driver

NONCE = bytes(range(64))


def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def oserror(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def generation(entry: Path) -> int:
    return int(read(entry / "generation"))


# -- the ABI ---------------------------------------------------------------------------

def test_fresh_entry_and_generation(tsm_sim):
    root = tsm_sim("sev_guest")
    entry = root / "e"
    os.mkdir(entry)
    assert read(entry / "generation") == b"0\n"
    assert read(entry / "provider") == b"sev_guest\n"
    write(entry / "inblob", NONCE)
    assert read(entry / "generation") == b"1\n"
    os.rmdir(entry)
    assert not entry.exists()


def test_modes_and_wrong_direction_opens(tsm_sim):
    entry = tsm_sim("sev_guest") / "e"
    os.mkdir(entry)
    assert oct(os.stat(entry).st_mode & 0o777) == "0o755"
    assert os.stat(entry / "outblob").st_mode & 0o777 == 0o444
    assert os.stat(entry / "inblob").st_mode & 0o777 == 0o200
    assert oserror(os.open, entry / "outblob", os.O_WRONLY) == errno.EACCES
    assert oserror(os.open, entry / "generation", os.O_WRONLY) == errno.EACCES
    assert oserror(os.open, entry / "inblob", os.O_RDONLY) == errno.EACCES
    assert oserror(os.open, entry / "privlevel", os.O_RDWR) == errno.EACCES


def test_inblob_limit_commit_at_close_and_einval_before_inblob(tsm_sim):
    entry = tsm_sim("sev_guest") / "e"
    os.mkdir(entry)
    assert oserror(read, entry / "outblob") == errno.EINVAL
    assert oserror(read, entry / "auxblob") == errno.EINVAL
    fd = os.open(entry / "inblob", os.O_WRONLY)
    os.write(fd, NONCE[:32])
    os.write(fd, NONCE[32:])
    assert generation(entry) == 0  # accumulated, not yet committed
    os.close(fd)
    assert generation(entry) == 1
    assert read(entry / "outblob")[0x50:0x90] == NONCE


def test_an_inblob_write_refused_with_efbig_still_commits_at_close(tsm_sim):
    # configfs marks a write in progress before it checks the size: the close commits the buffer,
    # empty after a first write that was too long, and that counts as a write (no inblob then).
    entry = tsm_sim("arm_cca_guest") / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    assert oserror(write, entry / "inblob", bytes(65)) == errno.EFBIG
    assert generation(entry) == 2
    assert oserror(read, entry / "outblob") == errno.EINVAL
    fd = os.open(entry / "inblob", os.O_WRONLY)
    try:
        os.write(fd, NONCE[:32])
        assert oserror(os.write, fd, NONCE) == errno.EFBIG  # 32 + 64: what was accumulated stays
    finally:
        os.close(fd)
    assert generation(entry) == 3
    assert NONCE[:32] + bytes(32) in read(entry / "outblob")  # the challenge: 32 bytes, zero-padded


def test_sev_guest_report_and_certificate_table(tsm_sim):
    entry = tsm_sim("sev_guest") / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    check_snp(read(entry / "outblob"), read(entry / "auxblob"), NONCE)
    write(entry / "privlevel", b"2\n")
    assert read(entry / "outblob")[0x30] == 2  # VMPL follows privlevel


def test_tdx_guest_quote(tsm_sim):
    entry = tsm_sim("tdx_guest") / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    check_tdx(read(entry / "outblob"), NONCE)


def test_arm_cca_guest_token(tsm_sim, sim_state):
    entry = tsm_sim("arm_cca_guest") / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE[:32])  # 32..64 bytes, zero-padded to 64
    cpak = serialization.load_pem_public_key((sim_state / "trust" / "cca-cpak.pem").read_bytes())
    check_cca(read(entry / "outblob"), NONCE[:32] + bytes(32), cpak)
    assert read(entry / "auxblob") == b""  # visible, always empty
    write(entry / "inblob", bytes(31))
    assert oserror(read, entry / "outblob") == errno.EINVAL


def test_one_provider_call_fills_every_blob_and_is_cached(tsm_sim):
    entry = tsm_sim("sev_guest") / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    aux = read(entry / "auxblob")  # generation triggered by auxblob
    first = read(entry / "outblob")
    assert read(entry / "outblob") == first  # ECDSA is randomized: equal bytes mean cached
    assert read(entry / "auxblob") == aux
    write(entry / "inblob", NONCE)  # any write invalidates, even with the same value
    assert read(entry / "outblob") != first


def test_per_fd_snapshot(tsm_sim):
    entry = tsm_sim("sev_guest") / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    fd = os.open(entry / "outblob", os.O_RDONLY)
    try:
        head = os.read(fd, 100)
        write(entry / "inblob", bytes(64))
        assert read(entry / "outblob")[0x50:0x90] == bytes(64)
        rest = b"".join(iter(lambda: os.read(fd, 4096), b""))
        assert (head + rest)[0x50:0x90] == NONCE
    finally:
        os.close(fd)


def test_visibility_per_provider(tsm_sim):
    def names(root: Path) -> set[str]:
        os.mkdir(root / "v")
        return set(os.listdir(root / "v"))

    base = {"generation", "provider", "inblob", "outblob"}
    service = {"service_provider", "service_guid", "service_manifest_version", "manifestblob"}
    assert names(tsm_sim("tdx_guest")) == base
    assert names(tsm_sim("sev_guest")) == base | {"auxblob", "privlevel", "privlevel_floor"}
    assert names(tsm_sim("sev_guest", svsm=True)) == base | {"auxblob", "privlevel", "privlevel_floor"} | service
    assert names(tsm_sim("arm_cca_guest")) == base | {"auxblob", "privlevel", "privlevel_floor"} | service


def test_directory_and_file_errors(tsm_sim):
    root = tsm_sim("sev_guest")
    entry = root / "e"
    os.mkdir(entry)
    assert oserror(os.mkdir, entry) == errno.EEXIST
    assert oserror(os.mkdir, entry / "sub") == errno.EPERM
    assert oserror(os.rmdir, root) == errno.EPERM
    assert oserror(os.unlink, entry / "outblob") == errno.EPERM
    assert oserror(os.open, entry / "newfile", os.O_WRONLY | os.O_CREAT) == errno.EACCES
    assert oserror(os.open, entry / "manifestblob", os.O_RDONLY) == errno.ENOENT  # invisible without SVSM


def test_text_stores(tsm_sim):
    entry = tsm_sim("sev_guest", svsm=True) / "e"
    os.mkdir(entry)
    assert read(entry / "privlevel_floor") == b"2\n"
    assert oserror(write, entry / "privlevel", b"1") == errno.EINVAL  # below the floor: no bump
    assert oserror(write, entry / "privlevel", b"4") == errno.EINVAL
    assert oserror(write, entry / "privlevel", b"two") == errno.EINVAL
    assert oserror(write, entry / "privlevel", b"0x100000000") == errno.ERANGE
    assert generation(entry) == 0
    with open(entry / "privlevel", "w") as f:  # O_WRONLY|O_CREAT|O_TRUNC, as echo does
        f.write("0x3\n")
    assert generation(entry) == 1
    assert oserror(write, entry / "service_guid", b"not-a-guid") == errno.EINVAL
    assert generation(entry) == 2  # bumped before the GUID was parsed
    write(entry / "service_provider", b"svsm\n")
    write(entry / "service_guid", b"c476f1eb-0123-45a5-9641-b4e7dde5bfe3\n")
    assert generation(entry) == 4


def test_svsm_service_attestation(tsm_sim):
    entry = tsm_sim("sev_guest", svsm=True) / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    write(entry / "service_provider", b"svsm")
    manifest = read(entry / "manifestblob")
    report = read(entry / "outblob")
    check_snp(report, read(entry / "auxblob"), hashlib.sha512(NONCE + manifest).digest())
    assert report[0x30] == 0  # produced by the SVSM at VMPL0
    assert uuid.UUID(bytes_le=manifest[:16]) == uuid.UUID("63849ebb-3d92-4670-a1ff-58f9c94b87bb")
    write(entry / "service_provider", b"other")
    assert oserror(read, entry / "outblob") == errno.EINVAL


def test_rmdir_with_open_fds(tsm_sim):
    entry = tsm_sim("sev_guest") / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    filled = os.open(entry / "outblob", os.O_RDONLY)
    os.read(filled, 10)
    unfilled = os.open(entry / "auxblob", os.O_RDONLY)
    gen = os.open(entry / "generation", os.O_RDONLY)
    try:
        os.rmdir(entry)
        assert not entry.exists()
        assert len(os.read(filled, 2000)) == 1174  # served from the snapshot
        assert oserror(os.read, unfilled, 10) == errno.ENOENT
        assert oserror(os.read, gen, 10) == errno.ENOENT
    finally:
        for fd in (filled, unfilled, gen):
            os.close(fd)


def test_generation_is_globally_serialised(tsm_sim):
    root = tsm_sim("sev_guest", "slow=1.5")
    slow, other = root / "slow", root / "other"
    os.mkdir(slow)
    os.mkdir(other)
    write(slow / "inblob", NONCE)
    reader = threading.Thread(target=read, args=(slow / "outblob",))
    reader.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert generation(other) == 0  # waits for the slow provider call on the other entry
    waited = time.monotonic() - start
    reader.join()
    assert waited > 0.8


@pytest.mark.parametrize("fault, code", [("eio", errno.EIO), ("ebusy", errno.EBUSY),
                                         ("etimedout", errno.ETIMEDOUT), ("enxio", errno.ENXIO)])
def test_fault_errnos_at_read_time_and_retry(tsm_sim, fault, code):
    entry = tsm_sim("tdx_guest", fault) / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)  # the fault shows when the report is generated, not before
    assert oserror(read, entry / "outblob") == code
    assert oserror(read, entry / "outblob") == code  # a failed generation is tried again


def test_evidence_faults(tsm_sim, sim_state):
    root = tsm_sim("sev_guest", "empty-outblob")
    os.mkdir(root / "e")
    write(root / "e" / "inblob", NONCE)
    assert read(root / "e" / "outblob") == b""

    root = tsm_sim("sev_guest", "corrupt-signature")
    os.mkdir(root / "e")
    write(root / "e" / "inblob", NONCE)
    with pytest.raises(InvalidSignature):
        check_snp(read(root / "e" / "outblob"), read(root / "e" / "auxblob"), NONCE)

    root = tsm_sim("sev_guest", "debug")
    os.mkdir(root / "e")
    write(root / "e" / "inblob", NONCE)
    report = read(root / "e" / "outblob")
    check_snp(report, read(root / "e" / "auxblob"), NONCE)  # correctly signed ...
    assert struct.unpack_from("<Q", report, 8)[0] & (1 << 19)  # ... with POLICY.DEBUG set

    root = tsm_sim("tdx_guest", "debug")
    os.mkdir(root / "e")
    write(root / "e" / "inblob", NONCE)
    quote = read(root / "e" / "outblob")
    check_tdx(quote, NONCE)
    assert quote[48 + 120] & 1  # TDATTRIBUTES.DEBUG


def test_simulated_roots_are_reused(tsm_sim, sim_state):
    tsm_sim("sev_guest")
    ark = (sim_state / "trust" / "snp-ark-genoa.pem").read_bytes()
    root = tsm_sim("sev_guest")
    os.mkdir(root / "e")
    write(root / "e" / "inblob", NONCE)
    table_ark = snp_certs(read(root / "e" / "auxblob"))[uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")]
    assert table_ark.public_bytes(serialization.Encoding.PEM) == ark
    assert oct((sim_state / "snp" / "vcek.key").stat().st_mode & 0o777) == "0o600"


def test_guest_driver_unloaded_and_loaded_again(tsm_sim):
    # Linux 6.15+: the entries stay, what needs the provider is ENXIO, a cached report is still
    # served, and the driver cannot register again while any entry is left.
    root = tsm_sim("sev_guest")
    entry = root / "e"
    os.mkdir(entry)
    write(entry / "inblob", NONCE)
    report = read(entry / "outblob")
    guest_driver(root, loaded=False)
    assert oserror(os.mkdir, root / "f") == errno.ENXIO
    assert read(entry / "outblob") == report  # cached
    for name in ("provider", "privlevel_floor"):
        assert oserror(read, entry / name) == errno.ENXIO
    assert oserror(write, entry / "privlevel", b"0") == errno.ENXIO
    write(entry / "inblob", NONCE)  # needs no provider
    assert generation(entry) == 2
    assert oserror(read, entry / "outblob") == errno.ENXIO
    guest_driver(root, loaded=True, wait=False)
    time.sleep(0.3)
    assert oserror(os.mkdir, root / "f") == errno.ENXIO  # refused: "e" is left
    os.rmdir(entry)
    guest_driver(root, loaded=True)
    os.mkdir(entry)
    assert read(entry / "provider") == b"sev_guest\n"

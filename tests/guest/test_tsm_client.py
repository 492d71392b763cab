"""The configfs-tsm client (library and ``keybroker evidence``) against the emulator."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from keybroker.errors import TsmError
from keybroker.guest.tsm import ReportRequest, TsmClient
from keybroker.wire import envelope
from support.checks import check_snp, check_tdx
from support.emulator import guest_driver

NONCE = hashlib.sha512(b"keybroker").digest()


def evidence(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keybroker", "evidence", "--tsm-root", str(root), *args],
                          capture_output=True, text=True, timeout=60)


def test_evidence_command_prints_an_envelope(tsm_sim):
    root = tsm_sim("sev_guest")
    result = evidence(root, "--nonce", NONCE.hex())
    assert result.returncode == 0, result.stderr
    report = envelope.loads(result.stdout)
    assert report.provider == "sev_guest" and report.generation == 1 and report.inblob == NONCE
    check_snp(report.outblob, report.auxblob, NONCE)
    assert envelope.loads(envelope.dumps(report)) == report
    assert os.listdir(root) == []


def test_tdx_ignores_privlevel(tsm_sim):
    report = TsmClient(tsm_sim("tdx_guest")).get_report(ReportRequest(NONCE, privlevel=1))
    check_tdx(report.outblob, NONCE)
    assert report.privlevel is None and report.auxblob == b""


@pytest.mark.parametrize("fault, message", [
    ("eio", "I/O error (EIO)"),
    ("ebusy", "busy (EBUSY)"),
    ("etimedout", "timed out (ETIMEDOUT)"),
    ("enxio", "could not produce a report (ENXIO)"),
    ("empty-outblob", "empty outblob"),
])
def test_each_fault_gives_a_specific_error_and_leaves_no_entry(tsm_sim, fault, message):
    root = tsm_sim("sev_guest", fault)
    result = evidence(root, "--nonce", NONCE.hex())
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert result.stdout == ""
    assert os.listdir(root) == []


@pytest.mark.parametrize("fault", ["corrupt-signature", "debug"])
def test_evidence_faults_reach_the_verifier(tsm_sim, fault):
    # The guest does not judge its own evidence: the key server refuses it.
    root = tsm_sim("sev_guest", fault)
    result = evidence(root, "--nonce", NONCE.hex())
    assert result.returncode == 0, result.stderr
    assert os.listdir(root) == []


def test_busy_provider_is_retried_a_bounded_number_of_times(tsm_sim):
    root = tsm_sim("tdx_guest", "ebusy")
    start = time.monotonic()
    with pytest.raises(TsmError) as info:
        TsmClient(root, attempts=3, backoff=0.2).get_report(ReportRequest(NONCE))
    assert info.value.errno == 16 and info.value.transient
    assert 0.55 < time.monotonic() - start < 5  # two pauses: 0.2 s and 0.4 s
    assert os.listdir(root) == []


def test_deadline_stops_retries(tsm_sim):
    root = tsm_sim("tdx_guest", "ebusy")
    start = time.monotonic()
    with pytest.raises(TsmError):
        TsmClient(root, attempts=10, backoff=0.5).get_report(ReportRequest(NONCE), deadline=start + 0.7)
    assert time.monotonic() - start < 1.5


def test_generation_mismatch_from_another_writer_is_retried(tsm_sim):
    root = tsm_sim("sev_guest", "slow=0.5")
    interfered: list[str] = []

    def interfere() -> None:
        # Write to the client's entry while its report is being generated.
        while not interfered:
            for name in os.listdir(root):
                try:
                    fd = os.open(root / name / "privlevel", os.O_WRONLY)
                    os.write(fd, b"0")
                    os.close(fd)
                    interfered.append(name)
                    return
                except OSError:
                    pass
            time.sleep(0.01)

    thread = threading.Thread(target=interfere)
    thread.start()
    report = TsmClient(root, backoff=0.05).get_report(ReportRequest(NONCE))
    thread.join()
    assert interfered  # the first entry was disturbed ...
    assert report.generation == 1  # ... and the report came from an undisturbed one
    check_snp(report.outblob, report.auxblob, NONCE)
    assert os.listdir(root) == []


def test_concurrent_clients_get_their_own_nonce(tsm_sim):
    root = tsm_sim("sev_guest", "slow=0.2")
    client = TsmClient(root)
    nonces = [hashlib.sha512(bytes([i])).digest() for i in range(6)]
    with ThreadPoolExecutor(len(nonces)) as pool:
        reports = list(pool.map(lambda n: client.get_report(ReportRequest(n)), nonces))
    for nonce, report in zip(nonces, reports, strict=True):
        assert report.inblob == nonce
        check_snp(report.outblob, report.auxblob, nonce)
    assert os.listdir(root) == []


def test_privlevel_and_its_floor(tsm_sim):
    root = tsm_sim("sev_guest", svsm=True)
    client = TsmClient(root)
    with pytest.raises(TsmError, match="below this guest's privlevel_floor 2"):
        client.get_report(ReportRequest(NONCE, privlevel=1))
    report = client.get_report(ReportRequest(NONCE))  # the floor is written when not asked
    assert report.privlevel == 2 and report.outblob[0x30] == 2
    assert os.listdir(root) == []


def test_svsm_service_attestation(tsm_sim):
    root = tsm_sim("sev_guest", svsm=True)
    report = TsmClient(root).get_report(ReportRequest(NONCE, service_provider="svsm"))
    assert report.manifestblob
    check_snp(report.outblob, report.auxblob, hashlib.sha512(NONCE + report.manifestblob).digest())
    single = TsmClient(root).get_report(ReportRequest(NONCE, service_provider="svsm",
                                                      service_guid="c476f1eb-0123-45a5-9641-b4e7dde5bfe3",
                                                      service_manifest_version=0))
    assert single.manifestblob[:2] == b"\x00\x23"  # the vTPM EK's TPMT_PUBLIC (TPM_ALG_ECC)
    with pytest.raises(TsmError, match="rejected the report request"):
        TsmClient(root).get_report(ReportRequest(NONCE, service_provider="svsm",
                                                 service_guid="00000000-0000-0000-0000-000000000001"))


def test_service_options_need_an_svsm(tsm_sim):
    with pytest.raises(TsmError, match="service_provider is not available"):
        TsmClient(tsm_sim("sev_guest")).get_report(ReportRequest(NONCE, service_provider="svsm"))


def test_inblob_size_per_provider(tsm_sim):
    with pytest.raises(TsmError, match="needs an inblob of exactly 64 bytes"):
        TsmClient(tsm_sim("sev_guest")).get_report(ReportRequest(NONCE[:32]))
    report = TsmClient(tsm_sim("arm_cca_guest")).get_report(ReportRequest(NONCE[:32]))
    assert report.provider == "arm_cca_guest" and report.inblob == NONCE[:32]


def test_missing_interface_is_explained(tmp_path):
    with pytest.raises(TsmError, match="no configfs-tsm report interface"):
        TsmClient(tmp_path / "absent").get_report(ReportRequest(NONCE))
    with pytest.raises(TsmError, match="inblob is 65 bytes, more than the limit of 64"):
        ReportRequest(bytes(65))


def test_entries_of_processes_that_are_gone_are_removed(tsm_sim):
    # A process killed while it holds an entry (the handler's worker at the deadline) never
    # removes it: the next client does, and only what a keybroker process that is gone left.
    root = tsm_sim("sev_guest")
    gone = subprocess.Popen(["true"])
    gone.wait()
    living = subprocess.Popen(["sleep", "60"])
    try:
        names = [f"keybroker-{gone.pid}-0123456789ab", f"keybroker-{gone.pid}-ba9876543210",
                 f"keybroker-{living.pid}-0123456789ab", f"keybroker-{os.getpid()}-0123456789ab",
                 f"other-{gone.pid}-0123456789ab", f"keybroker-{gone.pid}-not-ours"]
        for name in names:
            os.mkdir(root / name)
        TsmClient(root).get_report(ReportRequest(NONCE))
        assert sorted(os.listdir(root)) == sorted(names[2:])
    finally:
        living.kill()
        living.wait()
        for name in os.listdir(root):
            os.rmdir(root / name)


def test_an_abandoned_entry_is_removed_while_no_provider_is_registered(tsm_sim):
    # Since Linux 6.15 a guest driver cannot register while report entries remain, and every
    # request begins with the provider probe, which the missing driver refuses (ENXIO): the entry a
    # killed worker left must go there too, or the driver could not be loaded again.
    root = tsm_sim("tdx_guest")
    gone = subprocess.Popen(["true"])
    gone.wait()
    os.mkdir(root / f"keybroker-{gone.pid}-0123456789ab")
    guest_driver(root, loaded=False)
    with pytest.raises(TsmError, match="no TSM provider is registered") as info:
        TsmClient(root).provider()
    assert info.value.errno == errno.ENXIO
    assert os.listdir(root) == []
    guest_driver(root, loaded=True)
    assert TsmClient(root).provider() == "tdx_guest"


def test_cca_shows_the_sev_options_but_ignores_them(tsm_sim):
    # arm_cca_guest registers no visibility callbacks: privlevel and the service_* attributes are
    # there, and its driver never reads them. An option it ignores is not reported as attested.
    root = tsm_sim("arm_cca_guest")
    with pytest.raises(TsmError, match="service_provider is not available"):
        TsmClient(root).get_report(ReportRequest(NONCE, service_provider="svsm"))
    report = TsmClient(root).get_report(ReportRequest(NONCE, privlevel=1))
    assert report.privlevel is None and report.privlevel_floor is None and report.generation == 1
    assert os.listdir(root) == []


def test_a_session_checks_generation_before_and_after_its_writes_and_bounds_the_outblob(tmp_path, monkeypatch):
    """On a plain folder standing for a report entry (no kernel behind it): an entry someone wrote before
    this request, an inblob write the generation does not count, and an outblob past BLOB_MAX are each
    refused, the first two as retryable, rather than a report taken whose inblob may not be ours."""
    from keybroker.guest import tsm

    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "provider").write_text("sev_guest\n")
    (entry / "inblob").write_bytes(b"")
    (entry / "outblob").write_bytes(b"report")
    request = ReportRequest(bytes(64))
    for generation, problem in (("1\n", "before this request did"), ("0\n", "was not committed")):
        (entry / "generation").write_text(generation)
        with pytest.raises(TsmError, match=problem) as refused:
            tsm._Session(entry).run(request)
        assert refused.value.retryable
    monkeypatch.setattr(tsm._Session, "_generation", lambda session: session.writes)
    assert tsm._Session(entry).run(request).outblob == b"report"
    with open(entry / "outblob", "wb") as out:
        out.truncate(envelope.BLOB_MAX + 1)
    with pytest.raises(TsmError, match="larger than") as refused:
        tsm._Session(entry).run(request)
    assert refused.value.errno == errno.EFBIG


@pytest.mark.parametrize("code, retryable, transient", [
    (errno.EBUSY, True, True), (errno.EINTR, True, True), (errno.ETIMEDOUT, False, True),
    (errno.ENOMEM, False, True), (errno.EIO, False, False), (errno.ENXIO, False, False),
    (errno.ENOTTY, False, False), (errno.EINVAL, False, False), (errno.EFBIG, False, False),
])
def test_each_errno_of_a_report_read_is_kept_and_says_whether_to_try_again(tmp_path, code, retryable, transient):
    """In process: the kernel's errno stays the error's, and only a busy or interrupted provider is tried
    again on a new entry; a throttled host or a short kernel is worth waiting for, the rest is not."""
    from keybroker.guest import tsm

    error = tsm._Session(tmp_path)._error(OSError(code, os.strerror(code)), "read", "outblob")
    assert (error.errno, error.retryable, error.transient) == (code, retryable, transient)


def test_an_entry_removed_by_another_process_is_retried_and_a_missing_attribute_is_not(tmp_path):
    """In process: ENOENT on an entry someone removed is another writer's doing (a new entry may
    succeed); on an entry still there it is an attribute this provider lacks, which no retry brings."""
    from keybroker.guest import tsm

    gone = tsm._Session(tmp_path / "removed")._error(OSError(errno.ENOENT, "gone"), "read", "generation")
    assert gone.errno == errno.ENOENT and gone.retryable and "removed by someone else" in str(gone)
    missing = tsm._Session(tmp_path)._error(OSError(errno.ENOENT, "gone"), "write", "service_guid")
    assert missing.errno == errno.ENOENT and not missing.retryable and "not provided" in str(missing)


def test_an_entry_of_a_zombie_keybroker_process_is_removed(tmp_path):
    """In process, on a plain folder: a worker killed and never reaped runs no more, though its pid
    exists: the entry it left is removed (a live process's is not)."""
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while open(f"/proc/{zombie.pid}/stat", "rb").read().rpartition(b")")[2][:2] != b" Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        names = [f"keybroker-{zombie.pid}-0123456789ab", f"keybroker-{os.getpid()}-0123456789ab"]
        for name in names:
            (tmp_path / name).mkdir()
        TsmClient(tmp_path)._remove_abandoned()
        assert os.listdir(tmp_path) == names[1:]
    finally:
        zombie.wait()


@pytest.mark.parametrize("name, text", [
    ("provider", "sev guest\n"), ("provider", "sev_guest\n\n"), ("provider", "Sev_guest\n"), ("provider", ""),
    ("provider", "a" * 33 + "\n"), ("generation", "0_0\n"), ("generation", "+0\n"), ("generation", " 0\n"),
    ("generation", "0\n\n"), ("generation", ""), ("generation", "1" * 21 + "\n"),
])
def test_a_provider_or_generation_outside_configfs_grammar_is_refused_by_name(tmp_path, name, text):
    """In process, on a plain folder standing for an entry: what another process or a broken provider
    left in ``provider`` or ``generation`` is refused as TsmError naming it, before anything is written."""
    from keybroker.guest import tsm

    (tmp_path / "provider").write_text("sev_guest\n")
    (tmp_path / "generation").write_text("0\n")
    (tmp_path / "inblob").write_bytes(b"")
    (tmp_path / name).write_text(text)
    problem = "unexpected provider name" if name == "provider" else "unexpected value .* attribute generation"
    with pytest.raises(TsmError, match=problem):
        tsm._Session(tmp_path).run(ReportRequest(bytes(64)))
    assert (tmp_path / "inblob").read_bytes() == b""

"""SEV/SEV-ES guests through the real kernel upcall: evidence from a (simulated) host Attestation
Evidence Broker over its ttrpc protocol, verified by the key server, released only where a policy
rule explicitly accepts unbound evidence for the resource and pins the launch digest."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keybroker.errors import ConfigError, ProtocolError, TsmError
from keybroker.guest.aeb import Broker
from keybroker.verifier.sev.abi import parse_platform_cert
from keybroker.verifier.sev.claims import key_digest
from keybroker.wire import aeb
from support.emulator import run_aeb_sim
from support.keyctl import keyctl_session

SECRET = hashlib.sha256(b"sev-es disk key").digest()
REQUEST = 'keyctl request2 user keybroker:default/disk/root "" @s'


@pytest.fixture(scope="session")
def chip_key(sim_state: Path) -> str:
    """The simulated platform's chip identity (claim sev.chip_key: SHA-256 of its CEK's public key)."""
    subprocess.run([sys.executable, "-m", "keybroker", "aeb-sim", "--listen", "unix:/nonexistent/x",
                    "--state", str(sim_state)], capture_output=True, timeout=120)  # creates the platform, then fails
    return key_digest(parse_platform_cert((sim_state / "sev" / "cek.cert").read_bytes()))


def unbound_rule(digest: str, chip: str, *, allow_unbound: bool = True) -> dict:
    rule = {"resources": ["default/disk/*"], "require": {"allOf": [
        {"claim": "tee", "equals": "sev-es"}, {"claim": "sev.launch_digest", "equals": digest},
        {"claim": "sev.chip_key", "in": [chip]}]}}
    return {"version": 1, "rules": [rule | ({"allow_unbound": True} if allow_unbound else {})]}


@pytest.fixture
def aeb_sim(tmp_path: Path, sim_state: Path):
    """Factory: ``aeb_sim(*faults)`` starts a simulated broker; its address and the guest's launch digest."""
    started = []

    def start(*faults: str, launch_digest: bytes | None = None) -> tuple[str, bytes]:
        path = tmp_path / f"aeb{len(started)}.sock"
        cm = run_aeb_sim(path, sim_state, *faults, launch_digest=launch_digest)
        digest = cm.__enter__()
        started.append(cm)
        return f"unix:{path}", digest

    yield start
    for cm in reversed(started):
        cm.__exit__(None, None, None)


def audit(server) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "keybroker", "audit", "list", "--json", "--db", server.db],
                         capture_output=True, text=True, timeout=30, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def sev_guest(aeb_sim, kbs, handler, chip_key: str, *faults: str, policy, digest: bytes | None = None):
    address, launch_digest = aeb_sim(*faults, launch_digest=digest)
    server = kbs(policy=policy(launch_digest.hex(), chip_key) if callable(policy) else policy)
    server.put("default/disk/root", SECRET)
    handler(server.url, None, extra=f'[aeb]\naddress = "{address}"\nguest_handle = 1\n')
    return server, launch_digest


def test_released_only_under_a_rule_that_allows_unbound_evidence(aeb_sim, kbs, handler, chip_key, syslog):
    server, _ = sev_guest(aeb_sim, kbs, handler, chip_key, policy=unbound_rule)
    out = keyctl_session(f"id=$({REQUEST}) && keyctl pipe $id | sha256sum")
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(SECRET).hexdigest() in out.stdout
    assert "form=envelope result=verified" in server.log()
    released = [record for record in audit(server) if record.get("event") == "release"]
    assert released and released[-1]["decision"] == "allow" and released[-1]["provider"] == "sev-es", released


@pytest.mark.parametrize("policy, reason", [
    (None, "no release policy is set"),
    (lambda digest, chip: unbound_rule(digest, chip, allow_unbound=False), "the evidence is unbound"),
    (lambda digest, chip: unbound_rule("00" * 32, chip), "claim sev.launch_digest is"),
    (lambda digest, chip: unbound_rule(digest, "00" * 32), "claim sev.chip_key is"),
], ids=["default", "without-allow-unbound", "other-launch-digest", "other-chip"])
def test_refused_under_the_default_and_any_policy_that_does_not_allow_it(aeb_sim, kbs, handler, chip_key, policy,
                                                                         reason):
    server, _ = sev_guest(aeb_sim, kbs, handler, chip_key, policy=policy)
    out = keyctl_session(REQUEST)
    assert out.returncode != 0 and "Key was rejected by service" in out.stderr
    assert reason in server.log()  # the server's answer and log say why
    refused = [record for record in audit(server) if record.get("event") == "release"]
    assert refused and refused[-1]["decision"] == "deny" and reason in refused[-1]["reason"], refused


@pytest.mark.parametrize("fault, reason", [
    ("corrupt-signature", "report_signature"),
    ("broken-chain", "cek"),
    ("debug", "debug guest"),
    ("ignore-mnonce", "freshness not shown"),
])
def test_bad_evidence_is_refused(aeb_sim, kbs, handler, chip_key, fault, reason):
    server, _ = sev_guest(aeb_sim, kbs, handler, chip_key, fault, policy=unbound_rule)
    out = keyctl_session(REQUEST)
    assert out.returncode != 0 and "Key was rejected by service" in out.stderr
    assert reason in server.log()


@pytest.mark.parametrize("fault, errno_text", [("wrong-handle", "Permission denied"), ("down", "Connection refused")])
def test_a_broker_that_does_not_serve_this_guest_fails_the_request(aeb_sim, kbs, handler, chip_key, syslog,
                                                                  tmp_path, fault, errno_text):
    if fault == "down":
        server = kbs(policy=unbound_rule("00" * 32, chip_key))
        stale = tmp_path / "gone.sock"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(stale))  # a socket nobody listens on: connection refused
        handler(server.url, None, extra=f'[aeb]\naddress = "unix:{stale}"\nguest_handle = 1\n')
    else:
        server, _ = sev_guest(aeb_sim, kbs, handler, chip_key, fault, policy=unbound_rule)
    out = keyctl_session(REQUEST)
    assert out.returncode != 0 and errno_text in out.stderr, out.stderr
    assert server.requests_to("attest") == 0
    assert any("evidence broker" in line for line in syslog if "outcome=rejected" in line), syslog


def test_verify_prints_the_sev_checks_and_claims(aeb_sim, tmp_path, sim_state):
    address, digest = aeb_sim()
    inblob = bytes(range(64))
    report = Broker(address, 1).get_report(inblob, deadline=time.monotonic() + 10)
    (tmp_path / "evidence.bin").write_bytes(report.outblob)
    out = subprocess.run([sys.executable, "-m", "keybroker", "verify", str(tmp_path / "evidence.bin"),
                          "--provider", "sev_aeb", "--trust-roots", str(sim_state / "trust"),
                          "--report-data", inblob[:16].hex()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for text in ("ark", "ask", "cek", "pek", "report_signature", digest.hex(), "unbound"):
        assert text in out.stdout, out.stdout


def test_the_broker_client_survives_a_hostile_broker(tmp_path):
    """Whatever a broker sends (garbage, a giant length, a wrong stream, a lie about the size), the
    client fails with the project's error, within its deadline."""
    answers = [b"\xff" * 10,
               aeb.header(aeb.MESSAGE_MAX + 1, 1, aeb.RESPONSE),
               aeb.header(3, 1, aeb.RESPONSE) + b"\x0a\x05\x08",
               (lambda reply: aeb.header(len(reply), 1, aeb.RESPONSE) + reply)(
                   aeb.Reply(0, "", aeb.EvidenceResponse(0, 10**7).encode()).encode()),
               (lambda reply: aeb.header(len(reply), 1, aeb.RESPONSE) + reply)(aeb.Reply(13, "boom", b"").encode()),
               b""]  # silence: the deadline
    path = tmp_path / "hostile.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    held = []

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            held.append(conn)
            conn.recv(4096)
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        for _ in answers:
            start = time.monotonic()
            with pytest.raises(TsmError) as failure:
                Broker(f"unix:{path}", 1).get_report(bytes(64), deadline=time.monotonic() + 1.5)
            assert time.monotonic() - start < 2.5
            assert "evidence broker" in str(failure.value)
    finally:
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("address", ["vsock:2", "tcp:1.2.3.4:5", "unix:relative", "vsock:x:1", "unix:/" + "a" * 120])
def test_broker_addresses_are_checked(address):
    with pytest.raises(ConfigError):
        Broker(address, 1)
    with pytest.raises(ConfigError):
        Broker("vsock:2:5577", 0)


def test_protobuf_decoding_is_strict():
    good = aeb.EvidenceRequest(7, 6460, bytes(16))
    assert aeb.EvidenceRequest.decode(good.encode()) == good
    for data in (b"\x08", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x1a\x05abc", b"\x0d\0\0\0\0",
                 aeb.EvidenceRequest(1, 0, bytes(5)).encode(), b"\x08\x80\x80\x80\x80\x20"):
        with pytest.raises(ProtocolError):
            aeb.EvidenceRequest.decode(data)


@pytest.mark.parametrize("data, reason", [
    (b"\x00\x01", "field numbered 0"),
    (b"\x08" + b"\xff" * 9 + b"\x02", "varint beyond 64 bits"),  # ten bytes, but past 2**64
    (b"\x08" + b"\xff" * 10 + b"\x01", "truncated or overlong varint"),
])
def test_each_protobuf_rule_refuses_by_name(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        aeb.EvidenceRequest.decode(data)


def test_a_ttrpc_header_past_the_message_bound_is_refused_before_its_body_is_read():
    assert aeb.parse_header(aeb.header(aeb.MESSAGE_MAX, 7, aeb.RESPONSE)) == (aeb.MESSAGE_MAX, 7, aeb.RESPONSE)
    with pytest.raises(ProtocolError, match=f"at most {aeb.MESSAGE_MAX}"):
        aeb.parse_header(aeb.header(aeb.MESSAGE_MAX + 1, 7, aeb.RESPONSE))

"""Trustee's evidence forms: read as serde reads them, turned back into the signed bytes, and written.

The real SEV-SNP evidence that guest-components sent to a Trustee KBS (vectors/trustee-wire)
and the real reports of vectors/snp are the references; tests/wire/test_oracle.py checks the
same against the sev and kbs-types crates themselves.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from keybroker.errors import EvidenceError
from keybroker.sim import providers
from keybroker.sim.roots import SimState
from keybroker.verifier import Context, Evidence, TrustStore, verify
from keybroker.verifier.snp.abi import parse_report
from keybroker.wire import ghcb, trustee
from support import VECTORS

WIRE = VECTORS / "trustee-wire" / "snp-genoa-evidence.json"
GENOA = VECTORS / "snp" / "oak-genoa"


def genoa_evidence() -> dict:
    if not WIRE.exists():
        pytest.skip(f"no vector {WIRE}")
    return json.loads(WIRE.read_text())


def test_the_real_trustee_evidence_reencodes_to_signed_bytes_that_verify():
    evidence = genoa_evidence()
    blobs = trustee.from_json("snp", evidence)
    report = parse_report(blobs.outblob)  # every reserved range zero, the structure right
    assert (report.version, report.cpuid, report.vmpl) == (3, (0x19, 0xA0, 2), 0)
    assert [ghcb.KINDS[guid] for guid, _ in ghcb.parse(blobs.auxblob)] == ["VCEK"]
    if not GENOA.is_dir():
        pytest.skip(f"no Genoa ASK/ARK in {GENOA}")
    verdict = verify(Evidence(blobs.provider, blobs.outblob, blobs.auxblob),
                     Context(TrustStore.default(), certs=(GENOA,)))
    assert verdict.ok, verdict.reason()
    passed = {check.name for check in verdict.checks if check.ok}
    assert {"ark_pinned", "ask_signed_by_ark", "vek_signed_by_ask", "report_signature"} <= passed
    # and back: the JSON keybroker's client would send is the vector's (which an older sev
    # crate wrote without the v5 mitigation vectors, both null for a v3 report)
    assert trustee.snp_report_to_json(blobs.outblob) == evidence["attestation_report"] | {
        "launch_mit_vector": None, "current_mit_vector": None}


def test_keybroker_verify_accepts_the_trustee_evidence(tmp_path):
    genoa_evidence()
    if not GENOA.is_dir():
        pytest.skip(f"no Genoa ASK/ARK in {GENOA}")
    done = subprocess.run([sys.executable, "-m", "keybroker", "verify", str(WIRE), "--certs", str(GENOA)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: every check passed" in done.stdout and "snp.chip_id" in done.stdout
    changed = genoa_evidence()
    changed["attestation_report"]["measurement"][0] ^= 1
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    done = subprocess.run([sys.executable, "-m", "keybroker", "verify", str(tmp_path / "changed.json"),
                           "--certs", str(GENOA)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "report_signature" in done.stdout


@pytest.mark.parametrize("folder", sorted(p.name for p in (VECTORS / "snp").glob("*") if (p / "report.bin").exists()))
def test_real_reports_round_trip(folder):
    raw = (VECTORS / "snp" / folder / "report.bin").read_bytes()
    assert trustee.snp_report_from_json(json.loads(json.dumps(trustee.snp_report_to_json(raw)))) == raw


def test_emulated_reports_round_trip_with_their_certificate_table(sim_state: Path):
    ident = SimState(sim_state).snp()
    raw = providers.snp_report(ident, report_data=b"\x07" * 64, vmpl=0)
    table = providers.snp_cert_table(ident)
    sent = json.loads(json.dumps(trustee.to_json("sev_guest", raw, table)))
    assert [entry["cert_type"] for entry in sent["cert_chain"]] == ["VCEK", "ASK", "ARK"]
    blobs = trustee.from_json("snp", sent)
    assert (blobs.outblob, blobs.auxblob) == (raw, table)
    assert sent["attestation_report"]["launch_mit_vector"] == 0  # a v5 report carries them


def test_turin_puts_fmc_first_and_genoa_has_none():
    evidence = genoa_evidence()
    report = evidence["attestation_report"]
    turin = copy.deepcopy(report) | {"cpuid_fam_id": 0x1A, "cpuid_mod_id": 0x02}
    turin["reported_tcb"] = {"fmc": 3, "bootloader": 1, "tee": 2, "snp": 4, "microcode": 5}
    raw = trustee.snp_report_from_json(turin)
    assert raw[0x180:0x188] == bytes([3, 1, 2, 4, 0, 0, 0, 5])
    assert trustee.snp_report_to_json(raw)["reported_tcb"] == turin["reported_tcb"]
    genoa = copy.deepcopy(report)
    genoa["reported_tcb"] = {"fmc": 9, "bootloader": 1, "tee": 2, "snp": 4, "microcode": 5}  # fmc: not encoded
    assert trustee.snp_report_from_json(genoa)[0x180:0x188] == bytes([1, 2, 0, 0, 0, 0, 4, 5])
    unknown = copy.deepcopy(report) | {"cpuid_fam_id": 0x17}
    with pytest.raises(EvidenceError, match="not a known SEV-SNP processor"):
        trustee.snp_report_from_json(unknown)


def test_serde_rules_for_the_report():
    report = genoa_evidence()["attestation_report"]
    ignored = report | {"unknown_member": [1, 2, 3]}
    assert trustee.snp_report_from_json(ignored) == trustee.snp_report_from_json(report)
    no_options = {k: v for k, v in report.items() if k not in ("cpuid_step",)}
    assert trustee.snp_report_from_json(no_options)[0x18A] == 0  # an absent Option is None
    for change, reason in [
        ({"version": "3"}, r"version must be an integer"),
        ({"version": 3.0}, r"version must be an integer"),
        ({"vmpl": True}, r"vmpl must be an integer"),
        ({"guest_svn": -1}, r"guest_svn must be an integer 0-4294967295"),
        ({"key_info": 1 << 32}, r"key_info must be an integer 0-4294967295"),
        ({"policy": 1 << 64}, r"policy must be an integer"),
        ({"measurement": [0] * 47}, r"measurement must be an array of 48 bytes"),
        ({"host_data": [256] + [0] * 31}, r"host_data must be an array of bytes"),
        ({"host_data": [True] + [0] * 31}, r"host_data must be an array of bytes"),  # serde reads no bool as u8
        ({"chip_id": "00" * 64}, r"chip_id must be an array of 64 bytes"),
        ({"current": {"major": 1, "minor": 2}}, r"current is missing 'build'"),
        ({"reported_tcb": [1, 2, 3, 4, 5]}, r"reported_tcb must be a JSON object"),
        ({"signature": {"r": [0] * 72, "s": [0] * 71}}, r"signature.s must be an array of 72 bytes"),
        ({"version": 1}, r"version 1 is not one keybroker reads"),
    ]:
        with pytest.raises(EvidenceError, match=reason):
            trustee.snp_report_from_json(report | change)
    missing = {k: v for k, v in report.items() if k != "measurement"}
    with pytest.raises(EvidenceError, match="missing 'measurement'"):
        trustee.snp_report_from_json(missing)


def test_a_report_with_reserved_bytes_set_has_no_faithful_json(sim_state: Path):
    raw = bytearray(providers.snp_report(SimState(sim_state).snp(), report_data=bytes(64), vmpl=0))
    raw[0x04C] = 1
    with pytest.raises(EvidenceError, match="reserved"):
        trustee.snp_report_to_json(bytes(raw))
    masked_v2 = bytearray(raw)
    masked_v2[0:4] = (2).to_bytes(4, "little")
    masked_v2[0x1A0:0x1E0] = bytes(64)
    with pytest.raises(EvidenceError, match="masked CHIP_ID"):
        trustee.snp_report_to_json(bytes(masked_v2))


def test_a_report_of_another_size_or_version_has_no_json(sim_state: Path):
    """Only a whole report of version 2 to 5 is written in the sev crate's form: one cut short would
    otherwise fail in struct with no EvidenceError, and another version be turned away only by chance."""
    raw = providers.snp_report(SimState(sim_state).snp(), report_data=bytes(64), vmpl=0)
    for size in (len(raw) - 1, len(raw) + 1, 0x100):
        with pytest.raises(EvidenceError, match=f"SEV-SNP report is {size} bytes, expected 1184"):
            trustee.snp_report_to_json((raw + bytes(1))[:size])
    for version in (1, 6):
        with pytest.raises(EvidenceError, match=f"SEV-SNP report version {version} is not one keybroker reads"):
            trustee.snp_report_to_json(version.to_bytes(4, "little") + raw[4:])


def test_cert_chain_entries():
    other = uuid.uuid4()
    chain = [{"cert_type": "ASK", "data": [1, 2]}, {"cert_type": "Empty", "data": []},
             {"cert_type": {"OTHER": str(other)}, "data": [3]}, {"cert_type": "CRL", "data": [4]}]
    evidence = genoa_evidence() | {"cert_chain": chain}
    table = ghcb.parse(trustee.from_json("snp", evidence).auxblob)
    assert table == [(ghcb.GUIDS["ASK"], b"\1\2"), (other, b"\3"), (ghcb.GUIDS["CRL"], b"\4")]
    assert trustee.from_json("snp", genoa_evidence() | {"cert_chain": None}).auxblob == b""
    for bad, reason in [("VCEK", "cert_chain must be null or a list"),
                        ([{"cert_type": "vcek", "data": []}], "is not ARK, ASK"),
                        ([{"cert_type": {"OTHER": "not-a-uuid"}, "data": []}], "not a UUID"),
                        ([{"cert_type": {"OTHER": str(other), "VCEK": 1}, "data": []}], "is not ARK, ASK"),
                        ([{"cert_type": "VCEK", "data": "MII="}], r"data must be an array of bytes"),
                        ([{"cert_type": "VCEK"}], "missing 'data'")]:
        with pytest.raises(EvidenceError, match=reason):
            trustee.from_json("snp", genoa_evidence() | {"cert_chain": bad})


def test_tdx_and_cca_forms():
    quote = bytes(range(256)) * 4
    assert trustee.from_json("tdx", trustee.to_json("tdx_guest", quote)).outblob == quote
    sent = {"cc_eventlog": base64.b64encode(b"log").decode(), "quote": base64.b64encode(quote).decode(), "x": 1}
    assert trustee.from_json("tdx", sent).outblob == quote
    assert trustee.from_json("tdx", sent).event_log == b"log"
    assert trustee.to_json("tdx_guest", quote, event_log=b"log")["cc_eventlog"] == sent["cc_eventlog"]
    assert trustee.from_json("tdx", trustee.to_json("tdx_guest", quote)).event_log == b""
    for bad, reason in [({"cc_eventlog": None}, "missing 'quote'"),
                        ({"quote": base64.b64encode(quote).decode().rstrip("=") + "A"}, "standard base64"),
                        ({"quote": "AB=="[:3] + "="}, "standard base64"),
                        ({"quote": "QQ=="[:2]}, "standard base64"),  # unpadded
                        ({"quote": "QR=="}, "standard base64"),  # non-canonical trailing bits
                        ({"quote": "QQ==", "cc_eventlog": 5}, "cc_eventlog"),
                        ({"quote": list(quote)}, "standard base64")]:
        with pytest.raises(EvidenceError, match=reason):
            trustee.from_json("tdx", bad)
    token = b"\xd9\x01\x8f" + bytes(100)
    assert trustee.to_json("arm_cca_guest", token) == {"token": list(token)}
    assert trustee.from_json("cca", {"token": list(token)}).outblob == token
    for bad in ({"token": base64.b64encode(token).decode()}, {"token": [1, -1]}, {"token": [1.0]}, {"token": [True]},
                {"tokens": []}):
        with pytest.raises(EvidenceError):
            trustee.from_json("cca", bad)
    with pytest.raises(EvidenceError, match="not one keybroker reads"):
        trustee.from_json("az-snp-vtpm", {})


def test_device_evidence_map():
    assert trustee.device_evidence("") == {}
    assert trustee.device_evidence('{"sampledevice": {"svn": "1"}, "nvidiadpu": []}') == {
        "sampledevice": {"svn": "1"}, "nvidia-dpu": []}
    for bad, reason in [("{", "neither"), ("[]", "JSON object"), ('{"gpu": {}}', "unknown TEE 'gpu'")]:
        with pytest.raises(EvidenceError, match=reason):
            trustee.device_evidence(bad)

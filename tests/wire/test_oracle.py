"""keybroker's JSON against the crates Trustee and guest-components are built from (tests/oracle).

The oracle is a small Rust program over the published ``sev`` (6.3, which guest-components
pins, and 7.x, which Trustee uses) and ``kbs-types`` crates: what they read from keybroker's
JSON, and what they write, is the reference.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from jwcrypto import jwk

from keybroker.errors import EvidenceError
from keybroker.sim import providers
from keybroker.sim.roots import SimState
from keybroker.wire import jwe, trustee
from keybroker.wire import rcar as p
from support import VECTORS
from support.oracle import Oracle, build


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return build()


def reports(sim_state: Path) -> dict[str, bytes]:
    found = {p.parent.name: p.read_bytes() for p in sorted((VECTORS / "snp").glob("*/report.bin"))}
    found["emulator"] = providers.snp_report(SimState(sim_state).snp(), report_data=b"\x01" * 64, vmpl=0)
    return found


def test_report_json_is_what_both_sev_crates_write_and_read(oracle, sim_state):
    for name, raw in reports(sim_state).items():
        ours = trustee.snp_report_to_json(raw)
        theirs = oracle.ask("snp-report", raw.hex())
        assert theirs["sev7"] == ours, name
        assert theirs["sev6"] == ours, name
        encoded = oracle.ask("snp-evidence", {"attestation_report": ours, "cert_chain": None})
        assert encoded["sev7"]["report"] == raw.hex() and encoded["sev6"]["report"] == raw.hex(), name


def test_the_trustee_vector_encodes_as_the_crates_encode_it(oracle):
    path = VECTORS / "trustee-wire" / "snp-genoa-evidence.json"
    if not path.exists():
        pytest.skip(f"no vector {path}")
    evidence = json.loads(path.read_text())
    blobs = trustee.from_json("snp", evidence)
    theirs = oracle.ask("snp-evidence", evidence)
    for version in ("sev7", "sev6"):
        assert theirs[version]["report"] == blobs.outblob.hex()
        assert theirs[version]["cert_chain"] == [["63da758d-e664-4564-adc5-f4b93be8accd", 1347]]


def test_keybroker_refuses_what_the_sev_crate_refuses(oracle, sim_state):
    """Each mutation: the crate and keybroker agree on accepting or refusing it (and on the bytes)."""
    raw = providers.snp_report(SimState(sim_state).snp(), report_data=b"\x02" * 64, vmpl=0)
    table = providers.snp_cert_table(SimState(sim_state).snp())
    base = trustee.to_json("sev_guest", raw, table)
    report = base["attestation_report"]
    mutations = {
        "unknown member": {"attestation_report": report | {"extra": 1}},
        "string for u32": {"attestation_report": report | {"vmpl": "0"}},
        "float for u32": {"attestation_report": report | {"vmpl": 0.0}},
        "bool for u32": {"attestation_report": report | {"vmpl": False}},
        "negative": {"attestation_report": report | {"guest_svn": -1}},
        "u32 overflow": {"attestation_report": report | {"key_info": 2 ** 32}},
        "u64 max": {"attestation_report": report | {"plat_info": 2 ** 64 - 1}},
        "u8 overflow": {"attestation_report": report | {"cpuid_step": 256}},
        "null option": {"attestation_report": report | {"launch_mit_vector": None}},
        "absent option": {"attestation_report": {k: v for k, v in report.items() if k != "current_mit_vector"}},
        "absent field": {"attestation_report": {k: v for k, v in report.items() if k != "host_data"}},
        "short array": {"attestation_report": report | {"report_id": [0] * 31}},
        "long array": {"attestation_report": report | {"chip_id": [0] * 65}},
        "byte overflow": {"attestation_report": report | {"family_id": [256] + [0] * 15}},
        "fmc on genoa": {"attestation_report": report | {"current_tcb": report["current_tcb"] | {"fmc": 7}}},
        "null cert_chain": {"attestation_report": report, "cert_chain": None},
        "absent cert_chain": {"attestation_report": report},
        "lower-case cert_type": {"attestation_report": report, "cert_chain": [{"cert_type": "vcek", "data": []}]},
        "OTHER cert_type": {"attestation_report": report,
                            "cert_chain": [{"cert_type": {"OTHER": "92f81bc3-5811-4d3d-97ff-d19f88dc67eb"},
                                            "data": [1]}]},
        "cert data as string": {"attestation_report": report, "cert_chain": [{"cert_type": "VCEK", "data": "AA=="}]},
    }
    agree = []
    for name, evidence in mutations.items():
        theirs = oracle.ask("snp-evidence", evidence)["sev7"]
        try:
            ours = trustee.from_json("snp", copy.deepcopy(evidence)).outblob.hex()
        except EvidenceError as exc:
            ours = f"refused: {exc}"
        theirs_ok = "report" in theirs
        assert theirs_ok == (not ours.startswith("refused")), f"{name}: crate {theirs}, keybroker {ours}"
        if theirs_ok:
            assert theirs["report"] == ours, name
        agree.append(name)
    assert len(agree) == len(mutations)


def test_the_one_deliberate_difference_a_struct_as_an_array(oracle, sim_state):
    """serde also reads a struct from a JSON array of its fields in order; no serializer writes
    that, and keybroker refuses it rather than read a report in two shapes."""
    raw = providers.snp_report(SimState(sim_state).snp(), report_data=b"\x03" * 64, vmpl=0)
    report = trustee.snp_report_to_json(raw)
    as_array = {"attestation_report": report | {"launch_tcb": list(report["launch_tcb"].values())}}
    assert oracle.ask("snp-evidence", as_array)["sev7"]["report"] == raw.hex()
    with pytest.raises(EvidenceError, match="launch_tcb must be a JSON object"):
        trustee.from_json("snp", as_array)


def test_rcar_records_are_what_kbs_types_reads_and_writes(oracle):
    ec_key = p.check_tee_pubkey(json.loads(jwk.JWK.generate(kty="EC", crv="P-256").export_public())
                                | {"alg": p.KEY_ALGORITHM})
    rsa_key = p.check_tee_pubkey(json.loads(jwk.JWK.generate(kty="RSA", size=2048).export_public())
                                 | {"alg": p.RSA_ALGORITHM})
    init_data = {"format": "toml", "body": 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n'}
    for record in (
        {"request": p.AuthRequest("snp").to_json()},
        {"request": p.AuthRequest("cca").to_json()},
        {"challenge": p.Challenge("bm9uY2U=", envelope=True).to_json()},
        {"challenge": p.Challenge("bm9uY2U=").to_json()},
        {"attestation": p.Attestation("n", ec_key, {"quote": "AA=="}).to_json()},
        {"attestation": p.Attestation("n", rsa_key, {"token": [1]}, '{"sampledevice":{}}', init_data).to_json()},
        {"error": p.problem(p.POLICY_DENIED, "rule 0 (a/b/c): claim tee is \"tdx\", not \"snp\"")},
    ):
        assert oracle.ask("kbs", record) == record


@pytest.mark.parametrize("kind", ["P-256", "P-384", "P-521", "RSA"])
def test_the_jwe_header_is_the_aad_guest_components_computes(oracle, kind):
    key = jwk.JWK.generate(kty="RSA", size=2048) if kind == "RSA" else jwk.JWK.generate(kty="EC", crv=kind)
    body = jwe.wrap(b"k" * 32, json.loads(key.export_public()))
    assert oracle.ask("kbs", {"response": body})["response"] == {"aad": body["protected"]}


def test_a_jwe_member_kbs_types_refuses_keybroker_refuses(oracle):
    """Padding or set unused bits: guest-components' base64 (URL_SAFE_NO_PAD) refuses them, and so does keybroker."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ProtocolError

    private = ec.generate_private_key(ec.SECP256R1())
    body = jwe.wrap(b"k" * 32, jwe.public_jwk(private.public_key()))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    respelled = body["tag"][:-1] + alphabet[alphabet.index(body["tag"][-1]) | 0b1111]  # 16 bytes: 4 bits unused
    for broken in (body | {"tag": respelled}, body | {"iv": body["iv"] + "=="}):
        assert "error" in oracle.ask("kbs", {"response": broken})["response"]
        with pytest.raises(ProtocolError, match="canonical base64url"):
            jwe.unwrap(broken, private)

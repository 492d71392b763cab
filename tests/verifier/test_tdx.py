"""Intel TDX verification: real quotes with their expected verdicts, negatives built from their
bytes, collateral (folders, dcap-qvl bundles, a loopback PCS), TCB level matching, and quotes
built to the spec for the versions and bodies the samples do not cover."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.server.policy import Policy
from keybroker.verifier import Context, Evidence, Fetcher, TrustStore, verify
from keybroker.verifier import fetch as fetch_module
from keybroker.verifier.certs import fingerprint
from keybroker.verifier.fetch import WouldFetch, refresh_lock
from support import VECTORS as ALL_VECTORS
from support import tdx as tb
from support.pcs import PcsServer
from support.policies import ANY_GUEST

VECTORS = ALL_VECTORS / "tdx"
NOW = dt.datetime.now(dt.UTC)

# The verdicts of ../shared/vectors/README.md: (quote file, verifies, released by the default policy
# without collateral, TCB status with the set's own collateral or None when it has none)
EXPECTED = {
    "go-tdx-guest/spr-e4-v4": ("quote.dat", True, True, "NotSupported"),
    "go-tdx-guest/td15-v5": ("quote.dat", True, True, "UpToDate"),
    "go-tdx-guest/gcp-cos113-v4": ("quote.dat", True, True, None),
    "trustee/quote4-debug-v4": ("quote.dat", True, False, None),  # a debug TD: refused by policy
    "trustee/quote5-v5": ("quote.dat", True, True, None),
    "trustee/quote6-v4": ("quote.dat", True, True, "OutOfDate"),
    "trustee/azure-td-quote-v4": ("quote.bin", True, True, None),
}
ALLOWS_OUT_OF_DATE = Policy({"version": 1, "rules": [{"resources": ["*"], "require": {
    "claim": "tdx.tcb_status", "in": ["UpToDate", "OutOfDate"]}}]})


def vector(name: str) -> tuple[Path, bytes]:
    folder = VECTORS / name
    if not folder.is_dir():
        pytest.skip(f"no vector set {name} in {VECTORS}")
    return folder, (folder / EXPECTED[name][0]).read_bytes()


def run(raw: bytes, *, trust: TrustStore | None = None, **kw):
    return verify(Evidence("tdx_guest", raw, inblob=kw.pop("inblob", None)),
                  Context(trust or TrustStore.default(), **kw))


def check(verdict, name):
    return next(c for c in verdict.checks if c.name == name)


def first_failure(verdict) -> str:
    assert not verdict.ok
    return verdict.failures[0].name


def trusting(p: tb.Platform) -> TrustStore:
    return TrustStore({fingerprint(p.root): p.root})


# -- the real vectors ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_sets_get_their_verdicts(name):
    _, raw = vector(name)
    _, verifies, released, _ = EXPECTED[name]
    verdict = run(raw)
    assert verdict.ok is verifies, verdict.reason()
    assert [c.name for c in verdict.checks if c.ok is None] == ["nonce_binding", "tcb_status"]
    assert "tdx.tcb_status" not in verdict.claims
    decision = ANY_GUEST.decide("default/disk/root", verdict.claims)
    assert decision.allowed is released, decision.reason
    c = verdict.claims
    body = 48 if c["tdx.quote_version"] == 4 else 54
    assert c["tee"] == "tdx" and c["measurement"] == c["tdx.mrtd"] == raw[body + 136:body + 184].hex()
    assert c["tdx.report_data"] == raw[body + 520:body + 584].hex()
    if name == "trustee/quote4-debug-v4":
        assert c["debug"] is True and c["tdx.tdattributes.debug"] is True and "debug guest" in decision.reason


def test_without_collateral_no_advisory_is_claimed_absent():
    # The advisories are known only from collateral, as the TCB status is: [] said "none apply" for a
    # TD whose TCB nobody evaluated, and a policy refusing an advisory ("not" contains it) let it in.
    _, raw = vector("trustee/quote5-v5")
    claims = run(raw).claims
    assert "tdx.advisory_ids" not in claims and "tdx.tcb_status" not in claims
    refuses = Policy({"version": 1, "rules": [{"resources": ["*"], "require": {
        "not": {"claim": "tdx.advisory_ids", "contains": "INTEL-SA-00837"}}}]})
    decision = refuses.decide("default/disk/root", claims)
    assert not decision.allowed and "tdx.advisory_ids is absent" in decision.reason, decision


def test_v5_td15_claims_come_from_their_offsets():
    _, raw = vector("trustee/quote5-v5")
    c = run(raw).claims
    assert (c["tdx.quote_version"], c["tdx.body_type"]) == (5, 3)
    body = raw[54:54 + 648]
    assert c["tdx.mrtd"] == body[136:184].hex() and c["tdx.rtmr3"] == body[472:520].hex()
    assert c["tdx.report_data"] == body[520:584].hex() and c["tdx.tee_tcb_svn_2"] == body[584:600].hex()
    assert c["tdx.fmspc"] == "90c06f000000" and c["tdx.pck_ca"] == "platform"


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[3]])
def test_vector_collateral_gives_the_tcb_status(name):
    folder, raw = vector(name)
    verdict = run(raw, collateral=folder)
    assert verdict.ok, verdict.reason()
    status = EXPECTED[name][3]
    assert verdict.claims["tdx.tcb_status"] == status and check(verdict, "tcb_status").ok
    assert verdict.claims["tdx.collateral_expired"] is True  # Intel's documents live 30 days
    assert ANY_GUEST.decide("x", verdict.claims).allowed is (status == "UpToDate")
    if status == "OutOfDate":  # trustee quote6: only the OutOfDate level matches
        assert ALLOWS_OUT_OF_DATE.decide("x", verdict.claims).allowed
        fresh = run(raw, collateral=folder, at=dt.datetime(2025, 11, 1, tzinfo=dt.UTC))
        assert fresh.claims["tdx.collateral_expired"] is False
    if name == "go-tdx-guest/spr-e4-v4":  # all four documents, and CRLs that revoke nothing of this quote
        assert check(verdict, "crl").ok and check(verdict, "qe_identity").ok


def test_vector_collateral_does_not_appraise_another_platform():
    folder, _ = vector("trustee/quote6-v4")
    _, other = vector("trustee/quote5-v5")
    verdict = run(other, collateral=folder)
    assert first_failure(verdict) == "collateral" and "no TDX TCB info for FMSPC 90c06f000000" in \
        verdict.failures[0].detail


# -- negatives built from the vectors' bytes ------------------------------------------------

def flip(raw: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(raw)
    b[offset] ^= mask
    return bytes(b)


V4_SIG = 636  # quote signature; attestation key at 700; QE report at 770; QE auth data at 1220


@pytest.mark.parametrize("what, offset, mask, failed", [
    ("MRTD", 48 + 136, 0x01, "quote_signature"),
    ("REPORTDATA", 48 + 520, 0x01, "quote_signature"),
    ("debug bit", 48 + 120, 0x01, "quote_signature"),
    ("quote signature", V4_SIG + 5, 0x01, "quote_signature"),
    ("QE report ISVSVN", 770 + 258, 0x01, "qe_report_signature"),
    ("QE report signature", 1154, 0x01, "qe_report_signature"),
    ("QE auth data", 1220 + 3, 0x01, "qe_binding"),
])
def test_flipped_v4_bytes_fail_the_named_check(what, offset, mask, failed):
    _, raw = vector("trustee/quote6-v4")
    verdict = run(flip(raw, offset, mask))
    assert first_failure(verdict) == failed, (what, verdict.reason())
    assert failed in verdict.reason()


def test_flipped_v5_mrtd_fails_the_quote_signature():
    _, raw = vector("go-tdx-guest/td15-v5")
    assert first_failure(run(flip(raw, 54 + 136))) == "quote_signature"


def test_swapped_attestation_key_passes_the_quote_signature_only():
    _, raw = vector("trustee/quote6-v4")
    attacker = ec.generate_private_key(ec.SECP256R1())
    numbers = attacker.public_key().public_numbers()
    body = bytearray(raw)
    body[48 + 520:48 + 584] = b"attacker-chosen report data".ljust(64, b"\0")
    body[V4_SIG:V4_SIG + 64] = tb.raw_sig(attacker, bytes(body[:632]))
    body[700:764] = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
    verdict = run(bytes(body))
    assert check(verdict, "quote_signature").ok is True
    assert [c.name for c in verdict.failures] == ["qe_binding"]


def test_chain_under_a_lookalike_root():
    p = tb.platform()
    raw = tb.quote(p)
    verdict = run(raw)
    assert first_failure(verdict) == "root_pinned" and "is not the pinned Intel SGX Root CA" in verdict.reason()
    assert run(raw, trust=trusting(p)).ok  # the forgery is otherwise self-consistent


def _reissued(p: tb.Platform, *, pck_is_ca: bool = False, ca_key: ec.EllipticCurvePrivateKey | None = None,
              root_key: ec.EllipticCurvePrivateKey | None = None):
    """``p`` with its PCK CA's key ``ca_key``, re-signed by ``root_key`` (its own root's by default),
    and its PCK a CA if ``pck_is_ca``."""
    from cryptography import x509

    def copy(cert, public_key, signer, ca):
        builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for ext in cert.extensions:
            if not isinstance(ext.value, x509.BasicConstraints):
                builder = builder.add_extension(ext.value, critical=ext.critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ca_key or p.ca_key
    ca = copy(p.ca, ca_key.public_key(), root_key or p.root_key, True)
    return dataclasses.replace(p, ca=ca, ca_key=ca_key, pck=copy(p.pck, p.pck_key.public_key(), ca_key, pck_is_ca))


@pytest.mark.parametrize("forge, problem", [
    (lambda p: tb.platform(), "Intel SGX PCK Platform CA is not signed by Intel SGX Root CA"),
    (lambda p: _reissued(p, pck_is_ca=True), "the PCK leaf must not be a CA"),
    (lambda p: _reissued(p, ca_key=ec.generate_private_key(ec.SECP384R1())), "PCK keys must be EC P-256"),
    (lambda p: _reissued(tb.platform(ca_name="Intel SGX PCK Lookalike CA"), root_key=p.root_key),
     "'Intel SGX PCK Lookalike CA' is not one of"),
], ids=["CA of another root key", "PCK leaf a CA", "P-384 PCK CA", "unknown PCK CA name"])
def test_a_pck_chain_under_the_pinned_root_is_checked_link_by_link(forge, problem):
    """The pinned root is offered and trusted; the rest of the chain is the forger's (a CA that
    the root did not sign carries its name), or breaks one of the rules of Intel's PCK chain."""
    p = tb.platform()
    forged = forge(p)
    raw = tb.quote(forged, chain=tb.pem(forged.pck, forged.ca, p.root) + b"\0")
    verdict = run(raw, trust=trusting(p), inblob=tb.Td().report_data)
    assert [c.name for c in verdict.failures] == ["pck_chain"] and problem in verdict.reason(), verdict.reason()


def test_real_quote_with_a_lookalike_chain_fails():
    """The PCK chain of a real quote swapped for a look-alike one: even trusting it, the QE
    report was not signed by that PCK."""
    _, raw = vector("trustee/quote4-debug-v4")
    p = tb.platform()
    chain = tb.pem(p.pck, p.ca, p.root) + b"\0"
    start = 1226 + 32
    old_size = struct.unpack_from("<I", raw, start - 4)[0]
    forged = bytearray(raw[:start - 4] + struct.pack("<I", len(chain)) + chain + raw[start + old_size:])
    struct.pack_into("<I", forged, 766, struct.unpack_from("<I", raw, 766)[0] + len(chain) - old_size)
    struct.pack_into("<I", forged, 632, struct.unpack_from("<I", raw, 632)[0] + len(chain) - old_size)
    assert first_failure(run(bytes(forged))) == "root_pinned"
    assert first_failure(run(bytes(forged), trust=trusting(p))) == "qe_report_signature"


def test_truncated_and_mangled_quotes_are_format_failures():
    _, raw = vector("trustee/quote6-v4")
    verdict = run(raw[:1000])
    assert [c.name for c in verdict.checks] == ["format"] and "truncated" in verdict.reason()
    for offset, value, text in ((0, 3, "version 3"), (4, 0, "not TDX"), (2, 3, "not 2 (ECDSA P-256)"),
                                (12, 0, "not Intel's"), (764, 1, "not 6"), (1252, 3, "types 1-4")):
        mangled = bytearray(raw)
        mangled[offset] = value
        verdict = run(bytes(mangled))
        assert first_failure(verdict) == "format" and text in verdict.reason(), text
    # Hostile lengths anywhere never escape as exceptions: every cut is a clean verdict.
    for cut in range(0, len(raw) - 70, 97):
        assert not run(raw[:cut]).ok


def test_nonce_and_report_data_binding():
    p = tb.platform()
    nonce = hashlib.sha512(b"nonce").digest()
    raw = tb.quote(p, tb.Td(report_data=nonce))
    assert check(run(raw, trust=trusting(p), inblob=nonce), "nonce_binding").ok
    wrong = run(raw, trust=trusting(p), nonce=bytes(64))
    assert [c.name for c in wrong.failures] == ["nonce_binding"]
    # The nonce the verifier expects, not the evidence's own inblob (a replay's), is what binds.
    replayed = run(raw, trust=trusting(p), nonce=bytes(64), inblob=nonce)
    assert [c.name for c in replayed.failures] == ["nonce_binding"]
    exact = run(raw, trust=trusting(p), report_data=nonce, inblob=bytes(64))
    assert check(exact, "report_data").ok and exact.ok


def test_only_a_genuine_quote_bound_to_the_nonce_is_proven():
    """What a refusal of it puts on the record (see Verdict.proven): a public quote replayed, or
    any quote changed, proves nothing; one genuine and bound does, whatever fails after."""
    p = tb.platform()
    nonce = hashlib.sha512(b"nonce").digest()
    raw = tb.quote(p, tb.Td(report_data=nonce))
    assert run(raw, trust=trusting(p), inblob=nonce).proven
    assert not run(raw, trust=trusting(p), nonce=bytes(64)).proven  # replayed for another session
    assert not run(flip(raw, 54 + 136), trust=trusting(p), inblob=nonce).proven  # the quote signature fails
    refused = run(raw, trust=trusting(p), inblob=nonce, init_data=bytes(48))  # genuine, bound, then refused
    assert first_failure(refused) == "init_data" and refused.proven


# -- quotes built to the spec: versions, bodies, layouts beyond the samples ---------------------

@pytest.mark.parametrize("version, body_type, trailing, ca", [
    (4, 2, b"", "Intel SGX PCK Platform CA"),
    (5, 2, bytes(3000), "Intel SGX PCK Processor CA"),
    (5, 3, b"\n\nextra bytes(only for testing purpose)\n", "Intel SGX PCK Platform CA"),
])
def test_spec_built_quotes(version, body_type, trailing, ca):
    p = tb.platform(ca_name=ca)
    td = tb.Td(tee_tcb_svn_2=bytes([9, 1, 4]) + bytes(13))
    raw = tb.quote(p, td, version=version, body_type=body_type, trailing=trailing)
    verdict = run(raw, trust=trusting(p), inblob=td.report_data)
    assert verdict.ok, verdict.reason()
    c = verdict.claims
    assert (c["tdx.quote_version"], c["tdx.body_type"]) == (version, body_type)
    assert c["tdx.mrtd"] == td.mrtd.hex() and c["tdx.rtmr2"] == td.rtmrs[2].hex()
    assert c["tdx.pck_ca"] == ("processor" if "Processor" in ca else "platform")
    assert ("tdx.tee_tcb_svn_2" in c) is (body_type == 3)
    signed = 48 + (6 if version == 5 else 0) + (648 if body_type == 3 else 584)
    assert f"signed region {signed} B" in check(verdict, "format").detail
    assert (f"{len(trailing)} unsigned trailing bytes" in check(verdict, "format").detail) is bool(trailing)
    assert first_failure(run(flip(raw, signed - 1), trust=trusting(p))) == "quote_signature"


def test_v5_body_descriptor_is_checked():
    p = tb.platform()
    raw = bytearray(tb.quote(p, version=5, body_type=3))
    raw[48] = 1  # an SGX enclave body in a TDX quote
    assert "not a TD report" in run(bytes(raw), trust=trusting(p)).reason()
    raw[48] = 3
    struct.pack_into("<I", raw, 50, 584)
    assert "has size 584, expected 648" in run(bytes(raw), trust=trusting(p)).reason()


# -- TCB level matching with built collateral ------------------------------------------------

def appraise(tmp_path, p, td=None, *, body_type=2, **collateral):
    folder = tb.collateral(tmp_path / "collateral", p, **collateral)
    raw = tb.quote(p, td, version=5 if body_type == 3 else 4, body_type=body_type)
    return run(raw, trust=trusting(p), collateral=folder, at=tb.AT)


def test_full_collateral_up_to_date(tmp_path):
    p = tb.platform()
    verdict = appraise(tmp_path, p)
    assert verdict.ok, verdict.reason()
    assert [c.name for c in verdict.checks][-4:] == ["collateral_signatures", "crl", "qe_identity", "tcb_status"]
    assert all(c.ok for c in verdict.checks[-4:])
    c = verdict.claims
    assert (c["tdx.tcb_status"], c["tdx.advisory_ids"], c["tdx.collateral_expired"]) == ("UpToDate", [], False)
    assert ANY_GUEST.decide("x", c).allowed
    late = run(tb.quote(p), trust=trusting(p), collateral=tmp_path / "collateral", at=NOW)
    assert late.ok and late.claims["tdx.collateral_expired"] is True and "EXPIRED" in check(late, "tcb_status").detail


def test_a_collateral_file_that_cannot_be_read_fails_the_load_not_the_document(tmp_path):
    """A file listed but gone (a cache folder replaced while it is read; here a dangling link) is no
    document skipped, which would leave collateral without its TCB info: the load fails, and the
    cache fetches again."""
    from keybroker.errors import EvidenceError
    from keybroker.verifier.tdx.collateral import load_folder

    folder = tb.collateral(tmp_path / "collateral", tb.platform())
    (folder / "tcbinfo.json").unlink()
    (folder / "tcbinfo.json").symlink_to(folder / "gone.json")
    with pytest.raises(EvidenceError, match=r"tcbinfo\.json"):
        load_folder(folder)


def _levels(p, *specs):
    return [tb.level(p.components if sgx is None else sgx, p.pcesvn if pce is None else pce, tdx, status,
                     advisories=adv) for sgx, pce, tdx, status, adv in specs]


TOP = [6, 0, 4] + [0] * 13


@pytest.mark.parametrize("case, expected, advisories", [
    ("sw hardening", "SWHardeningNeeded", ["INTEL-SA-00837"]),
    ("module svn judged by its identity", "UpToDate", []),
    ("platform behind", "OutOfDate", ["INTEL-SA-01111"]),
    ("late microcode behind", "OutOfDate", []),
    ("module behind", "OutOfDate", ["INTEL-SA-01099"]),
    ("module revoked", "Revoked", []),
    ("qe behind", "OutOfDate", ["INTEL-SA-00615"]),
    ("configuration and qe behind", "OutOfDateConfigurationNeeded", []),
    ("no level", "NotSupported", []),
    ("no tdx level", "NotSupported", []),
    ("module below every level", "NotSupported", []),
    ("qe below every level", "NotSupported", []),
    ("version 0 module's svns compared from index 0", "OutOfDate", []),
    ("relaunch", "TDRelaunchAdvised", ["INTEL-SA-01099"]),
])
def test_tcb_status_matching(tmp_path, case, expected, advisories):
    p = tb.platform()
    td, body_type, tcb, qe = tb.Td(), 2, None, None
    higher = tuple(s + 1 for s in p.components)
    if case == "sw hardening":
        tcb = tb.tcb_info(p, levels=_levels(p, (None, None, TOP, "SWHardeningNeeded", ["INTEL-SA-00837"])))
    elif case == "module svn judged by its identity":  # TEE_TCB_SVN[0] = 6 < 9: compared from index 2
        tcb = tb.tcb_info(p, levels=_levels(p, (None, None, [9, 0, 4] + [0] * 13, "UpToDate", [])))
    elif case == "platform behind":  # the PCK matches only the second level
        tcb = tb.tcb_info(p, levels=_levels(p, (higher, None, TOP, "UpToDate", []),
                                            (None, None, TOP, "OutOfDate", ["INTEL-SA-01111"])))
    elif case == "late microcode behind":  # TEE_TCB_SVN[2] below the first level's
        tcb = tb.tcb_info(p, levels=_levels(p, (None, None, [6, 0, 5] + [0] * 13, "UpToDate", []),
                                            (None, None, TOP, "OutOfDate", [])))
    elif case == "module behind":
        tcb = tb.tcb_info(p, module_levels=[tb.isv_level(7), tb.isv_level(5, "OutOfDate", ["INTEL-SA-01099"])])
    elif case == "module revoked":
        tcb = tb.tcb_info(p, module_levels=[tb.isv_level(6, "Revoked")])
    elif case == "qe behind":
        qe = tb.qe_identity(levels=[tb.isv_level(8), tb.isv_level(6, "OutOfDate", ["INTEL-SA-00615"])])
    elif case == "configuration and qe behind":
        tcb = tb.tcb_info(p, levels=_levels(p, (None, None, TOP, "ConfigurationNeeded", [])))
        qe = tb.qe_identity(levels=[tb.isv_level(8), tb.isv_level(6, "OutOfDate")])
    elif case == "no level":
        tcb = tb.tcb_info(p, levels=_levels(p, (higher, None, TOP, "UpToDate", [])))
    elif case == "no tdx level":  # the PCK matches, TEE_TCB_SVN[2] = 4 is below the only level's
        tcb = tb.tcb_info(p, levels=_levels(p, (None, None, [6, 0, 5] + [0] * 13, "UpToDate", [])))
    elif case == "module below every level":  # TEE_TCB_SVN[0] = 6: the module identity knows none so old
        tcb = tb.tcb_info(p, module_levels=[tb.isv_level(9)])
    elif case == "qe below every level":
        qe = tb.qe_identity(levels=[tb.isv_level(9)])
    elif case == "version 0 module's svns compared from index 0":  # TEE_TCB_SVN[0] = 6 is below the first
        td = tb.Td(tee_tcb_svn=bytes([6, 0, 4]) + bytes(13))
        tcb = tb.tcb_info(p, levels=_levels(p, (None, None, [7, 0, 4] + [0] * 13, "UpToDate", []),
                                            (None, None, TOP, "OutOfDate", [])))
    elif case == "relaunch":  # launched on module SVN 6 (out of date), now running SVN 9 (current)
        body_type = 3
        td = tb.Td(tee_tcb_svn_2=bytes([9, 1, 4]) + bytes(13))
        tcb = tb.tcb_info(p, levels=_levels(p, (None, None, TOP, "UpToDate", [])),
                          module_levels=[tb.isv_level(9), tb.isv_level(6, "OutOfDate", ["INTEL-SA-01099"])])
    verdict = appraise(tmp_path, p, td, body_type=body_type, tcb=tcb, qe=qe)
    assert verdict.ok, verdict.reason()
    assert verdict.claims["tdx.tcb_status"] == expected
    assert verdict.claims["tdx.advisory_ids"] == advisories
    assert ANY_GUEST.decide("x", verdict.claims).allowed is (expected in ("UpToDate", "SWHardeningNeeded"))


def test_relaunch_not_advised_when_the_running_module_is_behind_too(tmp_path):
    p = tb.platform()
    tcb = tb.tcb_info(p, module_levels=[tb.isv_level(9), tb.isv_level(6, "OutOfDate")])
    verdict = appraise(tmp_path, p, tb.Td(tee_tcb_svn_2=bytes([8, 1, 4]) + bytes(13)), body_type=3, tcb=tcb)
    assert verdict.claims["tdx.tcb_status"] == "OutOfDate"


@pytest.mark.parametrize("change, failed, text", [
    ("module identity missing", "tcb_status", "no identity TDX_01"),
    ("module signer", "tcb_status", "MRSIGNERSEAM"),
    ("module attributes", "tcb_status", "SEAMATTRIBUTES 0000000000000000 do not match 0100000000000000"),
    ("qe signer", "qe_identity", "QE MRSIGNER"),
    ("pck revoked", "crl", "revoked by the CRL of Intel SGX PCK Platform CA: Intel SGX PCK Certificate"),
    ("tcb info tampered", "collateral_signatures", "TCB info"),
    ("signing cert under another root", "collateral_signatures", "not issued by the quote's root"),
    ("crl signed by another key", "crl", "is not signed by it"),
    ("unknown status", "collateral", "tcbStatus 'Great'"),
])
def test_collateral_negatives(tmp_path, change, failed, text):
    p = tb.platform()
    kw: dict = {}
    if change == "module identity missing":
        kw["tcb"] = tb.tcb_info(p, module_id="TDX_03")
    elif change == "module signer":
        kw["tcb"] = tb.tcb_info(p)
        kw["tcb"]["tdxModuleIdentities"][0]["mrsigner"] = "11" * 48
    elif change == "module attributes":
        kw["tcb"] = tb.tcb_info(p)
        kw["tcb"]["tdxModuleIdentities"][0]["attributes"] = "0100000000000000"
    elif change == "qe signer":
        kw["qe"] = tb.qe_identity(mrsigner=bytes(32))
    elif change == "pck revoked":
        kw["revoked"] = [p.pck.serial_number]
    elif change == "unknown status":
        kw["tcb"] = tb.tcb_info(p, levels=_levels(p, (None, None, TOP, "Great", [])))
    folder = tb.collateral(tmp_path / "c", p, **kw)
    if change == "tcb info tampered":
        text_ = (folder / "tcbinfo.json").read_bytes().replace(b'"tcbEvaluationDataNumber":19',
                                                               b'"tcbEvaluationDataNumber":20')
        (folder / "tcbinfo.json").write_bytes(text_)
    elif change == "signing cert under another root":
        other = tb.platform()
        (folder / "tcbinfo.json").write_bytes(tb.signed_json("tcbInfo", tb.tcb_info(p), other.signing_key))
        (folder / "tcb_signing_chain.pem").write_bytes(tb.pem(other.signing, other.root))
    elif change == "crl signed by another key":
        forged = tb.crl(p.ca, ec.generate_private_key(ec.SECP256R1()))
        (folder / "pck_crl.der").write_bytes(forged.public_bytes(serialization.Encoding.DER))
    verdict = run(tb.quote(p), trust=trusting(p), collateral=folder, at=tb.AT)
    assert first_failure(verdict) == failed and text in verdict.failures[0].detail, verdict.reason()


def _without_next_update(crl, key) -> bytes:
    """``crl`` re-signed by ``key`` without its nextUpdate (optional in a CRL; cryptography cannot build one)."""
    from keybroker.verifier.certs import der_items, der_read

    _, outer, _ = der_read(crl.public_bytes(serialization.Encoding.DER))
    (_, tbs), (alg_tag, alg), _ = der_items(outer)
    items = der_items(tbs)
    del items[[i for i, (tag, _) in enumerate(items) if tag in (0x17, 0x18)][1]]  # thisUpdate stays
    tbs = tb._der(0x30, b"".join(tb._der(tag, value) for tag, value in items))
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return tb._der(0x30, tbs + tb._der(alg_tag, alg) + tb._der(0x03, b"\0" + signature))


def test_a_crl_without_next_update_is_expired_collateral(tmp_path):
    """A CRL whose issuer signed it without nextUpdate was to count as expired, but the expiry's text
    formatted None as a date: TypeError out of verify(), a traceback and a 500 at the key server."""
    p = tb.platform()
    folder = tb.collateral(tmp_path / "c", p)
    (folder / "pck_crl.der").write_bytes(_without_next_update(tb.crl(p.ca, p.ca_key), p.ca_key))
    verdict = run(tb.quote(p), trust=trusting(p), collateral=folder, at=tb.AT)
    assert verdict.ok and check(verdict, "crl").ok, verdict.reason()
    assert verdict.claims["tdx.collateral_expired"] is True
    assert "CRL of Intel SGX PCK Platform CA (no next update)" in check(verdict, "tcb_status").detail


def test_collateral_files_are_read_by_content(tmp_path):
    """Whitespace around the signed member is outside it (a verifier that re-serialises the JSON,
    or cuts the text wrongly, fails here); unrelated files are skipped, damaged collateral is not."""
    p = tb.platform()
    folder = tb.collateral(tmp_path / "c", p)
    (folder / "tcbinfo.json").write_bytes(tb.signed_json("tcbInfo", tb.tcb_info(p), p.signing_key, pretty=True))
    assert run(tb.quote(p), trust=trusting(p), collateral=folder, at=tb.AT).ok
    (folder / "vector.json").write_text('{"quote": "quote.bin"}')  # unrelated files are not collateral
    (folder / "key.pem").write_bytes(p.ak.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    (folder / "quote.bin").write_bytes(tb.quote(p))
    assert run(tb.quote(p), trust=trusting(p), collateral=folder, at=tb.AT).ok
    (folder / "tcbinfo.json").write_bytes(b'{"tcbInfo":{},"tcbInfo":{},"signature":""}')
    assert "appears twice" in run(tb.quote(p), trust=trusting(p), collateral=folder, at=tb.AT).reason()
    (folder / "tcbinfo.json").write_bytes(tb.signed_json("tcbInfo", tb.tcb_info(p), p.signing_key))
    (folder / "pck_crl.der").write_bytes(b"\x30\x03damaged")
    damaged = run(tb.quote(p), trust=trusting(p), collateral=folder, at=tb.AT)
    assert first_failure(damaged) == "collateral" and "pck_crl.der" in damaged.reason()


def test_dcap_qvl_bundle_and_partial_collateral(tmp_path):
    p = tb.platform()
    der = serialization.Encoding.DER
    tcb_body = json.dumps(tb.tcb_info(p), separators=(",", ":"))
    qe_body = json.dumps(tb.qe_identity(), separators=(",", ":"))
    bundle = {"tcb_info": tcb_body, "tcb_info_signature": tb.raw_sig(p.signing_key, tcb_body.encode()).hex(),
              "tcb_info_issuer_chain": tb.pem(p.signing, p.root).decode(),
              "qe_identity": qe_body, "qe_identity_signature": tb.raw_sig(p.signing_key, qe_body.encode()).hex(),
              "qe_identity_issuer_chain": tb.pem(p.signing, p.root).decode(),
              "pck_crl_issuer_chain": tb.pem(p.ca, p.root).decode(),
              "pck_crl": tb.crl(p.ca, p.ca_key).public_bytes(der).hex(),
              "root_ca_crl": tb.crl(p.root, p.root_key).public_bytes(der).hex()}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "collateral.json").write_text(json.dumps(bundle))
    verdict = run(tb.quote(p), trust=trusting(p), collateral=tmp_path / "b", at=tb.AT)
    assert verdict.ok and verdict.claims["tdx.tcb_status"] == "UpToDate" and check(verdict, "crl").ok
    # TCB info alone: QE and revocation are reported as not evaluated, the status still is.
    only = tmp_path / "only"
    only.mkdir()
    (only / "tcbinfo.json").write_bytes(tb.signed_json("tcbInfo", tb.tcb_info(p), p.signing_key))
    (only / "chain.pem").write_bytes(tb.pem(p.signing, p.root))
    partial = run(tb.quote(p), trust=trusting(p), collateral=only, at=tb.AT)
    assert partial.ok and check(partial, "crl").ok is None and check(partial, "qe_identity").ok is None
    assert partial.claims["tdx.tcb_status"] == "UpToDate"


# -- a loopback PCS / PCCS ----------------------------------------------------------------------

@pytest.fixture
def pcs():
    servers: list[PcsServer] = []

    def start(p: tb.Platform, *, root_crl: bool = True, lower_case_headers: bool = False) -> PcsServer:
        der = serialization.Encoding.DER
        servers.append(PcsServer(
            fmspc=p.fmspc, tcb_info=tb.signed_json("tcbInfo", tb.tcb_info(p), p.signing_key),
            qe_identity=tb.signed_json("enclaveIdentity", tb.qe_identity(), p.signing_key),
            signing_chain=tb.pem(p.signing, p.root), pck_crl=tb.crl(p.ca, p.ca_key).public_bytes(der),
            pck_crl_chain=tb.pem(p.ca, p.root),
            root_crl=tb.crl(p.root, p.root_key).public_bytes(der) if root_crl else None,
            lower_case_headers=lower_case_headers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_collateral_from_a_pcs_is_cached(tmp_path, pcs):
    p = tb.platform()
    server = pcs(p)
    raw = tb.quote(p)
    first = run(raw, trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path), at=tb.AT)
    assert first.ok and first.claims["tdx.tcb_status"] == "UpToDate", first.reason()
    assert check(first, "crl").ok and "Root CA" in check(first, "crl").detail
    assert len(server.requests) == 4
    again = run(raw, trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path), at=tb.AT)
    assert again.ok and len(server.requests) == 4  # from the cache
    # Past nextUpdate: fetched again, unless the service served it so less than an hour ago
    # (then asking again for every attestation would gain nothing).
    stale = lambda: run(raw, trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path),  # noqa: E731
                        at=tb.NEXT_UPDATE + dt.timedelta(1))
    kept = stale()
    assert kept.ok and kept.claims["tdx.collateral_expired"] and len(server.requests) == 4
    folder = tmp_path / "pcs" / f"{p.fmspc.hex()}-platform"
    os.utime(folder, (time.time() - 3700, time.time() - 3700))
    assert stale().ok and len(server.requests) == 8
    assert stale().ok and len(server.requests) == 8  # the service served it stale just now
    assert sorted(f.name for f in (tmp_path / "pcs" / f"{p.fmspc.hex()}-platform").iterdir()) == [
        "pck_crl.der", "pck_crl_issuer_chain.pem", "qe_identity.json", "qe_identity_issuer_chain.pem",
        "root_crl.der", "tcb_info_issuer_chain.pem", "tcbinfo.json"]


def test_stale_collateral_kept_in_the_future_is_asked_for_again(tmp_path, pcs):
    """Collateral past its nextUpdate is reused for STALE_RECHECK seconds (fetch) from when it was kept; kept 'in
    the future' (the clock was stepped back since, as after a boot with a clock ahead), it must not
    count as just fetched until the clock gets there (a year of TCB updates and revocations unseen)."""
    p = tb.platform()
    server = pcs(p)
    raw = tb.quote(p)
    assert run(raw, trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path), at=tb.AT).ok
    assert len(server.requests) == 4
    ahead = time.time() + 365 * 86400
    os.utime(tmp_path / "pcs" / f"{p.fmspc.hex()}-platform", (ahead, ahead))
    verdict = run(raw, trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path),
                  at=tb.NEXT_UPDATE + dt.timedelta(1))
    assert verdict.ok and len(server.requests) == 8


def test_issuer_chain_headers_in_lower_case_are_found(pcs):
    """A PCCS behind an HTTP/2 gateway sends header names in lower case: tcb-info-issuer-chain."""
    p = tb.platform()
    server = pcs(p, lower_case_headers=True)
    verdict = run(tb.quote(p), trust=trusting(p), pcs_url=server.url, at=tb.AT)
    assert verdict.ok and verdict.claims["tdx.tcb_status"] == "UpToDate", verdict.reason()
    assert check(verdict, "collateral_signatures").ok and check(verdict, "crl").ok


def verify_at_once(raw: bytes, p: tb.Platform, server: PcsServer, fetcher: Fetcher, at: dt.datetime,
                   threads: int = 4, each: int = 4) -> tuple[list, list[BaseException]]:
    """``threads`` x ``each`` verifications at once with one fetcher: (verdicts, exceptions raised)."""
    verdicts: list = []
    raised: list[BaseException] = []

    def one() -> None:
        for _ in range(each):
            try:
                verdicts.append(run(raw, trust=trusting(p), pcs_url=server.url, fetcher=fetcher, at=at))
            except Exception as exc:  # what escapes verify() is a 500 in the key server
                raised.append(exc)

    running = [threading.Thread(target=one) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(60)
    return verdicts, raised


def test_a_stale_cache_refreshed_by_many_at_once_gives_each_a_verdict(tmp_path, pcs, monkeypatch):
    """Concurrent attestations that all find the cached collateral stale (threads here; forked
    workers sharing --cache-dir alike) must not trip over one another's refresh: no OSError
    from renaming onto a folder another one published, none from reading a folder being replaced."""
    monkeypatch.setattr(fetch_module, "STALE_RECHECK", 0)  # the service serves it stale: every verdict refreshes
    p = tb.platform()
    server = pcs(p)
    raw = tb.quote(p)
    fetcher = Fetcher(tmp_path)
    assert run(raw, trust=trusting(p), pcs_url=server.url, fetcher=fetcher, at=tb.AT).ok
    verdicts, raised = verify_at_once(raw, p, server, fetcher, tb.NEXT_UPDATE + dt.timedelta(1))
    assert raised == [] and len(verdicts) == 16 and all(v.ok for v in verdicts), raised
    assert len(server.requests) >= 4 * 16  # each verdict refreshed (one at a time)
    assert [f.name for f in (tmp_path / "pcs").iterdir()] == [f"{p.fmspc.hex()}-platform"]  # no leftovers


def in_processes(count: int, work) -> list[int]:
    """Run ``work`` in ``count`` forked processes at once: their exit codes (``work``'s return value)."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                code = work()
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python 3.12+ warns of fork() beside threads
def test_a_stale_cache_shared_by_forked_workers_gives_each_a_verdict(tmp_path, pcs, monkeypatch):
    """The server's forked workers share --cache-dir but not the refresh lock: each publishes its
    refresh over the others' and reads folders the others replace, and still gets verdicts."""
    monkeypatch.setattr(fetch_module, "STALE_RECHECK", 0)  # the service serves it stale: every verdict refreshes
    p = tb.platform()
    server = pcs(p)
    raw = tb.quote(p)
    assert run(raw, trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path), at=tb.AT).ok

    def worker() -> int:
        verdicts, raised = verify_at_once(raw, p, server, Fetcher(tmp_path), tb.NEXT_UPDATE + dt.timedelta(1),
                                          threads=2, each=6)
        return len(raised) + sum(not v.ok for v in verdicts)

    assert in_processes(3, worker) == [0, 0, 0]
    assert len(server.requests) >= 4 * 3 * 12  # each verdict refreshed
    assert [f.name for f in (tmp_path / "pcs").iterdir()] == [f"{p.fmspc.hex()}-platform"]


def test_the_offline_view_does_not_wait_for_a_refresh(tmp_path, pcs):
    """The key server verifies offline on its event loop: a refresh running on a thread makes it
    WouldFetch (verify on a thread too), never a wait that stalls the loop."""
    p = tb.platform()
    server = pcs(p)
    with refresh_lock(str(tmp_path / "pcs" / f"{p.fmspc.hex()}-platform")), pytest.raises(WouldFetch):
        run(tb.quote(p), trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path).offline(), at=tb.AT)
    assert server.requests == []


def test_a_cache_that_cannot_be_written_is_a_verdict(tmp_path, pcs):
    p = tb.platform()
    server = pcs(p)
    (tmp_path / "pcs").write_bytes(b"")  # not a folder: nothing can be cached under it
    verdict = run(tb.quote(p), trust=trusting(p), pcs_url=server.url, fetcher=Fetcher(tmp_path), at=tb.AT)
    assert first_failure(verdict) == "collateral" and f"cannot keep TDX collateral in {tmp_path}" in verdict.reason()


def test_pcs_without_cache_or_root_crl_and_unknown_platforms(pcs):
    p = tb.platform()
    server = pcs(p, root_crl=False)
    verdict = run(tb.quote(p), trust=trusting(p), pcs_url=server.url, at=tb.AT)
    assert verdict.ok and "no Root CA CRL" in check(verdict, "crl").detail
    other = tb.platform(fmspc=bytes.fromhex("00906ed50000"))
    unknown = run(tb.quote(other), trust=trusting(other), pcs_url=server.url, at=tb.AT)
    assert first_failure(unknown) == "collateral" and "HTTP 404" in unknown.reason()
    down = run(tb.quote(p), trust=trusting(p), pcs_url="http://127.0.0.1:9", at=tb.AT)
    assert first_failure(down) == "collateral" and "cannot fetch" in down.reason()


# -- the command line ------------------------------------------------------------------------

def keybroker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keybroker", "verify", *args], capture_output=True, text=True,
                          timeout=60)


def test_verify_command(tmp_path):
    folder, raw = vector("trustee/quote6-v4")
    plain = keybroker(str(folder / "quote.dat"))
    assert plain.returncode == 0 and "N/A   tcb_status" in plain.stdout and "PASS  qe_binding" in plain.stdout
    out = keybroker(str(folder / "quote.dat"), "--collateral", str(folder), "--json")
    result = json.loads(out.stdout)
    assert out.returncode == 0 and result["ok"] and result["claims"]["tdx.tcb_status"] == "OutOfDate"
    (tmp_path / "q").write_bytes(flip(raw, 48 + 136))
    bad = keybroker(str(tmp_path / "q"), "--provider", "tdx_guest")
    assert bad.returncode == 1 and "FAIL  quote_signature" in bad.stdout
    rd = keybroker(str(folder / "quote.dat"), "--report-data", "00" * 64)
    assert rd.returncode == 1 and "FAIL  report_data" in rd.stdout


# -- the quoting enclave is Intel's, with or without collateral ------------------------------

@pytest.mark.parametrize("values, named", [
    ({"qe_mrsigner": "ab" * 32}, "QE MRSIGNER abab"),
    ({"qe_isvprodid": 77}, "QE ISVPRODID 77 is not the TD QE's 2"),
])
def test_a_foreign_quoting_enclave_is_refused_without_collateral(sim_state, tsm_sim, values, named):
    """A host that gets an enclave of its own certified by its PCK must not vouch for TD quotes."""
    from dataclasses import replace

    from keybroker.sim import providers, roots

    tsm_sim("tdx_guest")  # makes the simulated platform (and its PCK) in sim_state
    identity = roots.SimState(sim_state).tdx()
    nonce = bytes(range(64))
    genuine = providers.tdx_quote_v4(identity, report_data=nonce)
    forged = providers.tdx_quote_v4(replace(identity, values={**identity.values, **values}), report_data=nonce)
    trust = TrustStore.default().with_dirs([sim_state / "trust"])
    assert verify(Evidence("tdx_guest", genuine, inblob=nonce), Context(trust)).ok
    verdict = verify(Evidence("tdx_guest", forged, inblob=nonce), Context(trust))
    assert check(verdict, "qe_report_signature").ok  # the PCK did sign it
    assert not verdict.ok and verdict.failures[0].name == "qe_pinned" and named in verdict.failures[0].detail


def test_a_debug_quoting_enclave_is_refused():
    p = tb.platform()
    raw = bytearray(tb.quote(p))
    verdict = run(bytes(raw), trust=trusting(p), at=tb.AT)
    assert check(verdict, "qe_pinned").ok
    qe_at = raw.index(hashlib.sha256(b"qe").digest()) - 64  # the QE report: ATTRIBUTES at 48, MRENCLAVE at 64
    raw[qe_at + 48] |= 0x02
    signed = bytes(raw[qe_at:qe_at + 384])
    raw[qe_at + 384:qe_at + 448] = tb.raw_sig(p.pck_key, signed)  # re-signed by the PCK: only the QE is wrong
    verdict = run(bytes(raw), trust=trusting(p), at=tb.AT)
    assert verdict.failures[0].name == "qe_pinned" and "debug mode" in verdict.failures[0].detail


def test_platform_ca_pck_gives_platform_claims():
    p = tb.platform()
    verdict = run(tb.quote(p), trust=trusting(p))
    assert verdict.ok, verdict.reason()
    assert verdict.claims["tdx.platform_instance_id"] == bytes(range(16)).hex()
    assert verdict.claims["tdx.platform.cached_keys"] is True
    assert verdict.claims["tdx.platform.smt_enabled"] is False


def test_platform_ca_pck_without_platform_fields_is_refused(monkeypatch):
    monkeypatch.setattr(tb, "_platform_fields", lambda ca_name: b"")
    p = tb.platform()
    verdict = run(tb.quote(p), trust=trusting(p))
    assert first_failure(verdict) == "format"
    assert "no PlatformInstanceID or Configuration" in verdict.reason()


def test_processor_ca_pck_has_no_platform_claims():
    p = tb.platform(ca_name="Intel SGX PCK Processor CA")
    verdict = run(tb.quote(p), trust=trusting(p))
    assert verdict.ok, verdict.reason()
    assert "tdx.platform_instance_id" not in verdict.claims


@pytest.mark.parametrize("oid, named", [
    (b"\x2a" + b"\xff" * 2100 + b"\x01", "larger than 128 bits"),  # an arc of 4400 digits
    (b"\x2a\x86\x48\x86", "truncated OID"),
])
def test_a_pck_extension_entry_with_a_hostile_oid_is_a_format_failure(monkeypatch, oid, named):
    """The SGX extension is read before any signature is checked: an entry's OID whose arc is too
    large to be written in decimal (ValueError) ended verify() in a traceback, a 500 at the key server."""
    fields = tb._platform_fields
    entry = tb._der(0x30, tb._der(0x06, oid) + tb._der(0x04, b"x"))
    monkeypatch.setattr(tb, "_platform_fields", lambda ca_name: entry + fields(ca_name))
    p = tb.platform()
    verdict = run(tb.quote(p), trust=trusting(p))
    assert first_failure(verdict) == "format" and named in verdict.reason()

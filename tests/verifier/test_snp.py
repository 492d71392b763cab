"""SEV-SNP verification: real vectors with their expected verdicts, negatives built from their
bytes, certificates from auxblob, folders and a (loopback) KDS, SVSM, and spec-built reports of
products and versions the vectors do not cover."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import http.server
import json
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from keybroker.errors import EvidenceError
from keybroker.verifier import Context, Evidence, Fetcher, TrustStore, certs, verify
from keybroker.verifier.certs import fingerprint
from support import VECTORS as ALL_VECTORS
from support import snp as sb
from support.child import in_child
from support.policies import ANY_GUEST

VECTORS = ALL_VECTORS / "snp"
NOW = dt.datetime.now(dt.UTC)
VLEK_TIME = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)

# The verdicts of /work/shared/vectors/README.md: (verifies now, released by the default policy now)
EXPECTED = {
    "go-sev-guest": (True, False),         # real report of a DEBUG guest: verifies, refused by policy
    "virtee-sev": (True, True),
    "trustee-vcek": (True, True),
    "trustee-vlek": (False, False),        # VLEK expired 2025-12-10; verifies at 2025-06-01
    "trustee-azure-milan": (True, True),
    "oak-milan": (True, True),
    "oak-genoa": (True, True),
}
GUID = {"vcek": "63da758d-e664-4564-adc5-f4b93be8accd", "vlek": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
        "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782", "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae"}


def vector(name: str) -> Path:
    if not (VECTORS / name).is_dir():
        pytest.skip(f"no vector set {name} in {VECTORS}")
    return VECTORS / name


def check(verdict, name):
    return next((c for c in verdict.checks if c.name == name), None)


def run(raw: bytes, *, certs=(), at=NOW, trust=None, **kw):
    return verify(Evidence("sev_guest", raw, **kw.pop("evidence", {})),
                  Context(trust or TrustStore.default(), at=at, certs=tuple(certs), **kw))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_sets_get_their_verdicts(name):
    folder = vector(name)
    verifies, released = EXPECTED[name]
    verdict = run((folder / "report.bin").read_bytes(), certs=[folder])
    assert verdict.ok is verifies, verdict.reason()
    assert ANY_GUEST.decide("default/disk/root", verdict.claims).allowed is (verifies and released)
    if name == "go-sev-guest":
        assert verdict.claims["debug"] is True and "debug guest" in ANY_GUEST.decide("x", verdict.claims).reason
    if name == "trustee-vlek":
        assert verdict.failures[0].name == "certificates_valid" and "2025-12-10" in verdict.failures[0].detail
        at_issue = run((folder / "report.bin").read_bytes(), certs=[folder], at=VLEK_TIME)
        assert at_issue.ok, at_issue.reason()
        assert at_issue.claims["snp.signing_key"] == "vlek" and at_issue.claims["snp.vmpl"] == 1


def test_azure_report_data_binds_the_runtime_claims():
    folder = vector("trustee-azure-milan")
    expected = hashlib.sha256((folder / "runtime-data.json").read_bytes()).digest() + bytes(32)
    verdict = run((folder / "report.bin").read_bytes(), certs=[folder], report_data=expected)
    assert verdict.ok and check(verdict, "report_data").ok


def test_genoa_claims_and_tcb():
    folder = vector("oak-genoa")
    raw = (folder / "report.bin").read_bytes()
    verdict = run(raw, certs=[folder])
    c = verdict.claims
    assert c["snp.product"] == "Genoa" and c["snp.version"] == 5 and c["tee"] == "snp"
    # Milan/Genoa layout: boot loader, TEE, SNP and microcode SPLs at bytes 0, 1, 6 and 7.
    assert (c["snp.reported_tcb.bootloader"], c["snp.reported_tcb.tee"], c["snp.reported_tcb.snp"],
            c["snp.reported_tcb.microcode"]) == (raw[0x180], raw[0x181], raw[0x186], raw[0x187])
    assert "snp.reported_tcb.fmc" not in c
    assert c["snp.launch_mit_vector"] == int.from_bytes(raw[0x1F8:0x200], "little")
    assert c["measurement"] == raw[0x90:0xC0].hex() == c["snp.measurement"]


def test_certificates_from_the_auxblob_table():
    folder = vector("virtee-sev")
    der = lambda f: _der(folder / f)  # noqa: E731
    table = sb.cert_table([(GUID["vcek"], der("vcek.der")), (GUID["ask"], der("ask.pem")),
                           (GUID["ark"], der("ark.pem"))])
    verdict = run((folder / "report.bin").read_bytes(), evidence={"auxblob": table})
    assert verdict.ok and verdict.proven, verdict.reason()
    without = run((folder / "report.bin").read_bytes())
    assert not without.ok and without.failures[0].name == "certificates"
    assert not without.proven  # nothing says who made the report: a refusal of it is nobody's on the record
    # A genuine guest launched with other init-data is refused on the record.
    refused = run((folder / "report.bin").read_bytes(), evidence={"auxblob": table}, init_data=b"\x07" * 48)
    assert refused.failures[0].name == "init_data" and refused.proven


def test_a_table_with_a_crl_or_an_entry_of_another_kind_still_verifies():
    """The table may carry AMD's CRL (GUID CRL, virtee/sev's CertType::CRL; Trustee's cert_type "CRL")
    and entries of GUIDs keybroker does not know: they are not certificates of the chain."""
    from keybroker.wire import trustee

    folder = vector("virtee-sev")
    der = lambda f: _der(folder / f)  # noqa: E731
    crl = (x509.CertificateRevocationListBuilder().issuer_name(x509.Name([]))
           .last_update(dt.datetime(2025, 1, 1)).next_update(dt.datetime(2026, 1, 1))
           .sign(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())).public_bytes(serialization.Encoding.DER)
    table = sb.cert_table([(GUID["vcek"], der("vcek.der")), (GUID["ask"], der("ask.pem")),
                           (GUID["ark"], der("ark.pem")), ("92f81bc3-5811-4d3d-97ff-d19f88dc67ea", crl),
                           (str(uuid.uuid4()), b"opaque bytes of another kind")])
    raw = (folder / "report.bin").read_bytes()
    verdict = run(raw, evidence={"auxblob": table})
    assert verdict.ok, verdict.reason()
    blobs = trustee.from_json("snp", trustee.to_json("sev_guest", raw, table))  # as guest-components sends it
    assert run(blobs.outblob, evidence={"auxblob": blobs.auxblob}).ok


def test_a_table_of_overlapping_or_bundled_entries_is_refused_before_it_is_parsed_again_and_again():
    # A hostile host (or guest: the table is unsigned) once had one large PEM bundle parsed once
    # per entry pointing at it, and each remembered: gigabytes for a few attestations.
    folder = vector("virtee-sev")
    raw = (folder / "report.bin").read_bytes()
    ders = [_der(folder / "vcek.der"), _der(folder / "ask.pem"), _der(folder / "ark.pem")]
    bundle = b"".join((folder / f).read_bytes() for f in ("ask.pem", "ark.pem")) * 20
    head = struct.pack("<16sII", uuid.UUID(GUID["ask"]).bytes, 24 * 65, len(bundle))
    overlapping = head * 64 + bytes(24) + bundle
    verdict = run(raw, evidence={"auxblob": overlapping})
    assert verdict.failures[0].name == "format" and "entries overlap" in verdict.reason()
    bundled = sb.cert_table([(GUID["vcek"], ders[0]), (GUID["ask"], bundle)])
    verdict = run(raw, evidence={"auxblob": bundled})
    assert verdict.failures[0].name == "format" and "more than 1 certificate where one belongs" in verdict.reason()
    assert run(raw, evidence={"auxblob": sb.cert_table(list(zip(
        (GUID["vcek"], GUID["ask"], GUID["ark"]), ders, strict=True)))}).ok


def _self_signed(cn: str, extensions: int = 0) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW))
    for n in range(extensions):
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(f"1.2.3.{n}"), b""),
                                        critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_what_is_remembered_per_certificate_object_is_never_another_ones():
    """Remembered by identity: a certificate freed and another parsed in its place (Python reuses the
    address, and so the id) must not be answered with the first one's fingerprint or signature."""
    ders = [_self_signed("one"), _self_signed("two")]
    other = x509.load_der_x509_certificate(_self_signed("three"))
    for n in range(2 * certs.CACHE_MAX + 10):  # past the bound too: what is forgotten is worked out again
        cert = x509.load_der_x509_certificate(ders[n % 2])
        assert certs.fingerprint(cert) == hashlib.sha256(ders[n % 2]).hexdigest()
        assert certs.signed_by(cert, cert) and not certs.signed_by(cert, other)
        assert certs.subject_cn(cert) == ["one", "two"][n % 2] and certs.names_issuer(cert, cert)
        del cert
    # Every remembering function shares the one bound, and with it the certificates held.
    assert certs._remembered.cache_info().currsize <= certs.CACHE_MAX


def test_what_is_remembered_is_worked_out_once_per_object_and_text():
    calls = []

    @certs.remembered
    def seen(cert: x509.Certificate, label: str) -> str:
        calls.append(label)
        return label

    cert = x509.load_der_x509_certificate(_self_signed("one"))
    again = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    assert seen(cert, "snp") == seen(cert, "".join(["s", "np"])) == "snp"  # equal text: one call
    assert seen(again, "snp") == "snp" and calls == ["snp", "snp"]  # the same bytes in another object: a miss
    with pytest.raises(TypeError, match="remembers certificates and text, not bytes"):
        certs.fingerprint(cert.public_bytes(serialization.Encoding.DER))  # type: ignore[arg-type]


def test_a_certificate_with_too_many_extensions_is_refused_when_parsed():
    assert len(certs.load_certs(_self_signed("fine", certs.EXTENSIONS_MAX))) == 1
    with pytest.raises(EvidenceError, match="more than 32 extensions"):
        certs.load_certs(_self_signed("many", certs.EXTENSIONS_MAX + 1))


def test_what_is_remembered_of_certificates_is_bounded_in_bytes():
    def certificate(extension: bytes = b"") -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keybroker test")])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW))
        if extension:
            builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), extension),
                                            critical=False)
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    one = certificate()
    before = certs._parse_cached.cache_info().currsize
    assert len(certs.load_certs(one)) == 1 and certs._parse_cached.cache_info().currsize == before + 1
    large = b"".join(certificate() for _ in range(40))  # over CACHED_INPUT_MAX: parsed, not remembered
    assert len(large) > certs.CACHED_INPUT_MAX
    assert len(certs.load_certs(large)) == 40 and certs._parse_cached.cache_info().currsize == before + 1
    with pytest.raises(EvidenceError, match="more than 8 certificates"):
        certs.load_certs(large, most=8)
    relabelled = large.replace(b"BEGIN CERTIFICATE", b"BEGIN X509 CERTIFICATE").replace(
        b"END CERTIFICATE", b"END X509 CERTIFICATE")  # a label the PEM parser reads as well
    with pytest.raises(EvidenceError, match="more than 1 certificate where one belongs"):
        certs.load_certs(one + relabelled, most=1)
    with pytest.raises(EvidenceError, match=f"a certificate of more than {certs.CERT_MAX} bytes"):
        certs.load_certs(certificate(bytes(certs.CERT_MAX)))


def _der(path: Path) -> bytes:
    from keybroker.verifier.certs import load_certs

    return load_certs(path.read_bytes())[0].public_bytes(serialization.Encoding.DER)


# -- negatives built from the vectors' bytes ------------------------------------------------

def flip(raw: bytes, offset: int) -> bytes:
    b = bytearray(raw)
    b[offset] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("what, offset, failed", [
    ("measurement", 0x090, "report_signature"),
    ("signature r", 0x2A0, "report_signature"),
    ("signature s", 0x2E8 + 5, "report_signature"),
    ("report data", 0x050, "report_signature"),
])
def test_flipped_bytes_fail_the_named_check(what, offset, failed):
    folder = vector("oak-milan")
    verdict = run(flip((folder / "report.bin").read_bytes(), offset), certs=[folder])
    assert not verdict.ok and verdict.failures[0].name == failed, (what, verdict.reason())


def test_rewritten_vmpl_fails_the_signature():
    folder = vector("trustee-vlek")
    raw = bytearray((folder / "report.bin").read_bytes())
    raw[0x30] = 0  # VMPL1 -> VMPL0
    verdict = run(bytes(raw), certs=[folder], at=VLEK_TIME)
    assert verdict.failures[0].name == "report_signature"


def test_expected_report_data_mismatch():
    folder = vector("oak-genoa")
    verdict = run((folder / "report.bin").read_bytes(), certs=[folder], report_data=b"\x01" * 64)
    assert [c.name for c in verdict.failures] == ["report_data"]


def test_vcek_from_another_chip(tmp_path):
    report = (vector("oak-milan") / "report.bin").read_bytes()
    other = vector("virtee-sev")
    for f in ("vcek.der", "ask.pem", "ark.pem"):
        (tmp_path / f).write_bytes((other / f).read_bytes())
    verdict = run(report, certs=[tmp_path])
    assert not verdict.ok and verdict.failures[0].name in ("tcb_matches_vek", "chip_id_matches")
    assert "REPORTED_TCB" in verdict.failures[0].detail or "CHIP_ID" in verdict.failures[0].detail


def test_vlek_presented_with_the_vcek_ask(tmp_path):
    vlek = vector("trustee-vlek")
    (tmp_path / "vlek.der").write_bytes((vlek / "vlek.der").read_bytes())
    (tmp_path / "ask.pem").write_bytes((vector("oak-milan") / "ask.pem").read_bytes())  # SEV-Milan, not SEV-VLEK-Milan
    (tmp_path / "ark.pem").write_bytes((vlek / "ark.pem").read_bytes())
    verdict = run((vlek / "report.bin").read_bytes(), certs=[tmp_path], at=VLEK_TIME)
    assert verdict.failures[0].name == "vek_signed_by_ask"
    assert "SEV-VLEK is not signed by SEV-Milan" in verdict.failures[0].detail


def test_chain_under_an_unpinned_lookalike_ark(tmp_path):
    p = sb.platform("Milan")
    raw = sb.report(p, version=3)
    for name, cert in (("ark", p.ark), ("ask", p.intermediate), ("vcek", p.vek)):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verdict = run(raw, certs=[tmp_path])
    assert [c.name for c in verdict.failures] == ["ark_pinned"]
    assert "is not a trusted AMD root" in verdict.failures[0].detail
    trusted = run(raw, certs=[tmp_path], trust=TrustStore({fingerprint(p.ark): p.ark}))
    assert trusted.ok, trusted.reason()  # everything else about the forgery is self-consistent


def _vlek_with_a_hwid(p: sb.Platform) -> sb.Platform:
    """``p`` (a VLEK platform) whose VLEK, issued by the genuine ASVK, also carries a chip's hwID."""
    builder = (x509.CertificateBuilder().subject_name(p.vek.subject).issuer_name(p.vek.issuer)
               .public_key(p.vek_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(p.vek.not_valid_before_utc).not_valid_after(p.vek.not_valid_after_utc))
    for ext in p.vek.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{sb.AMD_OID}.4"),
                                                               bytes(range(1, 65))), critical=False)
    assert p.intermediate_key is not None
    return dataclasses.replace(p, vek=builder.sign(p.intermediate_key, hashes.SHA384(), rsa_padding=sb.PSS))


@pytest.mark.parametrize("forgery, failed", [
    # An ASK with the genuine ARK's name (and that ARK pinned and offered) but its own key: it
    # signs a VCEK of the forger's choosing.
    (lambda p: (sb.platform(p.product), p.ark), "ask_signed_by_ark"),
    # The VCEK of this chip for an older TCB signs a report claiming a newer one.
    (lambda p: (dataclasses.replace(p, tcb=sb.Tcb(snp=p.tcb.snp + 2)), p.ark), "tcb_matches_vek"),
    # Another chip's VCEK (same TCB) signs a report claiming this chip.
    (lambda p: (dataclasses.replace(p, chip_id=bytes(reversed(p.chip_id))), p.ark), "chip_id_matches"),
    # A VCEK with no hwID to speak of, for a report with a masked CHIP_ID (MASK_CHIP_ID).
    (lambda p: (dataclasses.replace(sb.issue_vek(p, p.tcb, chip_id=bytes(64)), chip_id=bytes(64)), p.ark),
     "chip_id_matches"),
    # A VLEK is bound to no chip: one carrying a hwID is not AMD's.
    (lambda p: (_vlek_with_a_hwid(sb.platform(p.product, "vlek")), None), "chip_id_matches"),
], ids=["foreign ASK", "older TCB's VCEK", "another chip's VCEK", "masked CHIP_ID", "VLEK with a hwID"])
def test_a_chain_or_binding_forgery_under_a_trusted_ark_fails_the_named_check(forgery, failed):
    """Each of these is self-consistent but for one check, which must fail (with it made always true,
    the report verified)."""
    genuine = sb.platform("Milan")
    forged, ark = forgery(genuine)
    ark = ark or forged.ark
    table = sb.cert_table([(GUID[forged.kind], forged.vek.public_bytes(serialization.Encoding.DER)),
                           (GUID["ask"], forged.intermediate.public_bytes(serialization.Encoding.DER)),
                           (GUID["ark"], ark.public_bytes(serialization.Encoding.DER))])
    verdict = run(sb.report(forged, version=3), trust=TrustStore({fingerprint(ark): ark}),
                  evidence={"auxblob": table})
    assert [c.name for c in verdict.failures] == [failed], verdict.reason()


@pytest.mark.parametrize("kind", ["vcek", "vlek"])
def test_a_folder_of_veks_for_several_tcbs_gives_the_one_for_the_reported_tcb(tmp_path, kind):
    """A firmware update raises the SNP SPL and leaves the microcode's: the folder that keeps the
    chip's VEKs across updates holds two with the same microcode SPL (the VLEK's CSP, one per TCB)."""
    old = sb.platform("Genoa", kind, tcb=sb.Tcb(snp=20))
    new = sb.issue_vek(old, sb.Tcb(snp=22))
    for name, cert in (("ark", old.ark), ("ask", old.intermediate), ("a-vek-old", old.vek), ("b-vek-new", new.vek)):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    trust = TrustStore({fingerprint(old.ark): old.ark})
    for platform in (old, new):
        verdict = run(sb.report(platform), certs=[tmp_path], trust=trust)
        assert verdict.ok, verdict.reason()


def test_a_folder_of_vleks_of_several_regions_gives_the_one_that_signed(tmp_path):
    """A VLEK cannot be fetched, so an operator's folder holds one per CSP region (csp_id), all for
    the same TCB and under the same ASVK: only the report's signature tells which signed it."""
    east = sb.platform("Milan", "vlek")
    west = sb.issue_vek(east, east.tcb)
    for name, cert in (("ark", east.ark), ("asvk", east.intermediate), ("a-east", east.vek), ("b-west", west.vek)):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    trust = TrustStore({fingerprint(east.ark): east.ark})
    for platform in (east, west):
        verdict = run(sb.report(platform), certs=[tmp_path], trust=trust)
        assert verdict.ok, verdict.reason()


# -- revocation: the ARK's CRL -----------------------------------------------------------

CRL_GUID = "92f81bc3-5811-4d3d-97ff-d19f88dc67ea"


def _table(p, *extra):
    return sb.cert_table([(GUID[p.kind], p.vek.public_bytes(serialization.Encoding.DER)),
                          (GUID["ask"], p.intermediate.public_bytes(serialization.Encoding.DER)),
                          (GUID["ark"], p.ark.public_bytes(serialization.Encoding.DER)), *extra])


@pytest.mark.parametrize("kind", ["vcek", "vlek"])
def test_an_intermediate_the_arks_crl_revokes_is_refused_from_the_host_or_a_folder(tmp_path, kind):
    """AMD revokes an ASK or ASVK on the CRL its ARK signs (KDS /vcek|vlek/v1/{product}/crl); the
    host's table may carry it (GUID CRL) and an operator keeps it in a --certs folder."""
    p = sb.platform("Genoa", kind)
    trust = TrustStore({fingerprint(p.ark): p.ark})
    revoking = sb.crl(p, (7, p.intermediate.serial_number)).public_bytes(serialization.Encoding.DER)
    refused = run(sb.report(p), trust=trust, evidence={"auxblob": _table(p, (CRL_GUID, revoking))})
    assert refused.failures[0].name == "crl" and "is revoked" in refused.failures[0].detail, refused.reason()
    assert refused.proven is False  # the chain is not AMD's word any more: nobody's refusal on the record

    (tmp_path / "genoa.crl").write_bytes(sb.crl(p, (p.intermediate.serial_number,)).public_bytes(
        serialization.Encoding.PEM))
    from_folder = run(sb.report(p), trust=trust, certs=[tmp_path], evidence={"auxblob": _table(p)})
    assert from_folder.failures[0].name == "crl", from_folder.reason()

    (tmp_path / "genoa.crl").write_bytes(sb.crl(p, (7,)).public_bytes(serialization.Encoding.DER))
    current = run(sb.report(p), trust=trust, certs=[tmp_path], evidence={"auxblob": _table(p)})
    assert current.ok and check(current, "crl").ok and "is not on the CRL" in check(current, "crl").detail


def test_a_crl_not_signed_by_the_ark_checks_nothing_and_an_operators_damaged_one_is_an_error(tmp_path):
    p = sb.platform("Milan")
    trust = TrustStore({fingerprint(p.ark): p.ark})
    forged = sb.crl(p, (p.intermediate.serial_number,), signer=rsa.generate_private_key(65537, 2048))
    for table in (_table(p), _table(p, (CRL_GUID, forged.public_bytes(serialization.Encoding.DER))),
                  _table(p, (CRL_GUID, b"not a CRL"))):
        verdict = run(sb.report(p), trust=trust, evidence={"auxblob": table})
        assert verdict.ok and check(verdict, "crl").ok is None, verdict.reason()  # N/A: as if none were sent
    assert "1 offered, none signed by it" in check(
        run(sb.report(p), trust=trust, evidence={"auxblob": _table(p, (CRL_GUID, forged.public_bytes(
            serialization.Encoding.DER)))}), "crl").detail

    stale = sb.crl(p, (), next_update=dt.datetime(2025, 2, 1, tzinfo=dt.UTC))
    (tmp_path / "milan.crl").write_bytes(stale.public_bytes(serialization.Encoding.DER))
    verdict = run(sb.report(p), trust=trust, certs=[tmp_path], evidence={"auxblob": _table(p)})
    assert verdict.ok and "its next update was due 2025-02-01" in check(verdict, "crl").detail

    (tmp_path / "milan.crl").write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    with pytest.raises(EvidenceError, match=r"milan\.crl: cannot parse CRL"):
        certs.load_crl_dir(tmp_path)
    assert not run(sb.report(p), trust=trust, certs=[tmp_path], evidence={"auxblob": _table(p)}).ok


def test_key_server_refuses_a_guest_whose_ask_its_certs_folder_crl_revokes(tsm_sim, sim_state, kbs, tmp_path):
    from keybroker.errors import ReleaseRefused
    from keybroker.guest.client import RcarClient
    from keybroker.guest.tsm import ReportRequest, TsmClient
    from keybroker.sim.providers import snp_crl
    from keybroker.sim.roots import SimState

    root = tsm_sim("sev_guest")
    state = SimState(sim_state)
    ident, ark_key = state.snp(), state.snp_ark_key()
    (tmp_path / "revoking").mkdir()
    (tmp_path / "revoking" / "genoa.crl").write_bytes(snp_crl(ident, ark_key, (ident.ask.serial_number,)))
    (tmp_path / "current").mkdir()
    (tmp_path / "current" / "genoa.crl").write_bytes(snp_crl(ident, ark_key, (ident.ask.serial_number + 1,)))
    revoking, current = kbs("--certs", str(tmp_path / "revoking")), kbs("--certs", str(tmp_path / "current"))
    for server in (revoking, current):
        server.put("default/key/a", b"released")
    tsm = TsmClient(root)
    report = lambda inblob: tsm.get_report(ReportRequest(inblob))  # noqa: E731
    with pytest.raises(ReleaseRefused, match="revoked"):
        RcarClient(revoking.url).fetch("default/key/a", "snp", report)
    assert bytes(RcarClient(current.url).fetch("default/key/a", "snp", report).value) == b"released"


def test_a_look_alike_intermediate_before_the_real_one_does_not_refuse_the_guest(tmp_path):
    """Same subject, another key (a host's table, or a folder that kept an ASK AMD reissued): the
    intermediate that signs the VEK is the one taken, whichever comes first."""
    p = sb.platform("Genoa")
    other = sb.platform("Genoa")  # the same names, other keys
    look_alike = other.intermediate.public_bytes(serialization.Encoding.DER)
    trust = TrustStore({fingerprint(p.ark): p.ark})
    table = sb.cert_table([(GUID["vcek"], p.vek.public_bytes(serialization.Encoding.DER)), (GUID["ask"], look_alike),
                           (GUID["ask"], p.intermediate.public_bytes(serialization.Encoding.DER)),
                           (GUID["ark"], p.ark.public_bytes(serialization.Encoding.DER))])
    verdict = run(sb.report(p), trust=trust, evidence={"auxblob": table})
    assert verdict.ok, verdict.reason()
    for name, cert in (("a-ask-old", other.intermediate), ("b-ask", p.intermediate), ("ark", p.ark), ("vcek", p.vek)):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verdict = run(sb.report(p), trust=trust, certs=[tmp_path])
    assert verdict.ok, verdict.reason()


def test_a_trusted_look_alike_ark_before_the_one_that_signs_does_not_refuse_the_guest():
    """Two trusted roots of one name (AMD's ARK-Genoa and a --trust-roots anchor that bears the same
    name, as the emulator's does): the one that signs the intermediate is taken, whichever comes first."""
    p = sb.platform("Genoa")
    other = sb.platform("Genoa")  # the same names, other keys
    table = sb.cert_table([(GUID["vcek"], p.vek.public_bytes(serialization.Encoding.DER)),
                           (GUID["ask"], p.intermediate.public_bytes(serialization.Encoding.DER))])
    for arks in ([other.ark, p.ark], [p.ark, other.ark]):
        verdict = run(sb.report(p), trust=TrustStore({fingerprint(ark): ark for ark in arks}),
                      evidence={"auxblob": table})
        assert verdict.ok, verdict.reason()


def test_a_certs_folder_file_gone_or_unreadable_is_a_refusal_naming_it(tmp_path, monkeypatch):
    """The --certs folders are read at each attestation; an operator refreshing the ARK's CRL may
    remove a file between the listing and its reading. That was an OSError out of the verifier:
    a key server's 500 with a traceback, where the folder's other failures name the file."""
    import pathlib

    folder = vector("virtee-sev")
    for name in ("ark.pem", "ask.pem", "vcek.der"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "milan.crl").write_bytes(b"")
    read = pathlib.Path.read_bytes

    def racing(path):
        if path.name == "milan.crl":
            path.unlink()  # gone since the folder was listed
        return read(path)

    monkeypatch.setattr(pathlib.Path, "read_bytes", racing)
    verdict = run((folder / "report.bin").read_bytes(), certs=[tmp_path])
    assert not verdict.ok and verdict.failures[0].name == "format", verdict.reason()
    assert f"{tmp_path / 'milan.crl'}: No such file or directory" in verdict.reason()


def test_an_issuer_key_costlier_than_amds_verifies_nothing():
    """AMD's chain keys are RSA-4096 with e = 65537. A host's table may hold 64 look-alike issuers, each
    tried against the VEK before any signature is known good: with RSA-3072 keys of 3071-bit exponents
    that was 6 ms each, 0.4 s of a worker per attestation for random bytes. Such a key signs nothing."""
    import math
    import secrets

    from cryptography.hazmat.primitives.asymmetric import padding

    base = rsa.generate_private_key(65537, 3072).private_numbers()
    p, q = base.p, base.q
    lam = math.lcm(p - 1, q - 1)
    e = next(e for e in iter(lambda: secrets.randbits(3071) | 1 << 3070 | 1, None) if math.gcd(e, lam) == 1)
    d = pow(e, -1, lam)
    key = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), rsa.rsa_crt_iqmp(p, q),
                                rsa.RSAPublicNumbers(e, p * q)).private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SEV-Milan")])

    def cert(subject_key, serial):
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(subject_key)
                .serial_number(serial).not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW)
                .sign(key, hashes.SHA384(), rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()),
                                                                   salt_length=48)))

    issuer, child = cert(key.public_key(), 1), cert(ec.generate_private_key(ec.SECP384R1()).public_key(), 2)
    child.verify_directly_issued_by(issuer)  # a genuine signature
    assert not certs.signed_by_rsa_pss_sha384(child, issuer)


# -- reports built to the spec: products and versions beyond the samples ------------------

@pytest.mark.parametrize("product, version, kind", [
    ("Turin", 5, "vcek"), ("Turin", 3, "vcek"), ("Genoa", 4, "vcek"), ("Milan", 2, "vcek"),
    ("Genoa", 5, "vlek"), ("Turin", 5, "vlek"),
])
def test_spec_built_reports(product, version, kind):
    tcb = sb.Tcb(bootloader=4, tee=1, snp=22, microcode=0xD9, fmc=2)
    p = sb.platform(product, kind, tcb=tcb)
    nonce = hashlib.sha512(b"nonce").digest()
    raw = sb.report(p, version=version, report_data=nonce)
    table = sb.cert_table([(GUID[kind], p.vek.public_bytes(serialization.Encoding.DER)),
                           (GUID["ask"], p.intermediate.public_bytes(serialization.Encoding.DER)),
                           (GUID["ark"], p.ark.public_bytes(serialization.Encoding.DER))])
    trust = TrustStore({fingerprint(p.ark): p.ark})
    verdict = verify(Evidence("sev_guest", raw, auxblob=table, inblob=nonce), Context(trust))
    assert verdict.ok, verdict.reason()
    c = verdict.claims
    assert c["snp.product"] == product and c["snp.signing_key"] == kind
    assert (c["snp.reported_tcb.bootloader"], c["snp.reported_tcb.tee"], c["snp.reported_tcb.snp"],
            c["snp.reported_tcb.microcode"]) == (4, 1, 22, 0xD9)
    assert c.get("snp.reported_tcb.fmc") == (2 if product == "Turin" else None)
    if product == "Turin":
        assert c["snp.platform_info.iommu_write_safe"] is True  # bit 6, reserved elsewhere: decoded, not refused
    # The same report claiming another product is refused.
    wrong = TrustStore({fingerprint(p.ark): p.ark})
    if version >= 3:
        other = {"Milan": "Genoa", "Genoa": "Turin", "Turin": "Milan"}[product]
        forged = bytearray(raw)
        forged[0x188:0x18B] = bytes(sb.CPUID[other])
        assert verify(Evidence("sev_guest", bytes(forged), auxblob=table), Context(wrong)).failures[0].name \
            == "product_consistent"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[:1000], "1000 bytes, expected 1184"),
    (lambda r: (6).to_bytes(4, "little") + r[4:], "unsupported SEV-SNP report version 6"),
    (lambda r: r[:0x4C] + b"\x01" + r[0x4D:], "reserved bytes 0x04C-0x04F"),
    (lambda r: r[:0x34] + (2).to_bytes(4, "little") + r[0x38:], "SIGNATURE_ALGO is 2"),
])
def test_malformed_reports_are_clear_format_errors(mutate, message):
    p = sb.platform("Genoa")
    verdict = verify(Evidence("sev_guest", mutate(sb.report(p))), Context(TrustStore.default()))
    assert verdict.failures[0].name == "format" and message in verdict.failures[0].detail


def answer(handler: http.server.BaseHTTPRequestHandler, body: bytes | int) -> None:
    """A loopback KDS's answer: ``body`` with 200, or the HTTP status ``body`` with nothing."""
    if isinstance(body, int):
        handler.send_response(body)
        handler.end_headers()
        return
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def crl_kds():
    """A loopback KDS that serves ``state["crl"]`` (bytes, or an HTTP status) at /{vcek,vlek}/v1/{product}/crl,
    after ``state["delay"]`` seconds."""
    state: dict = {"crl": 404, "delay": 0}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            time.sleep(state["delay"])
            body = state["crl"] if self.path.endswith("/crl") else 404
            answer(self, body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state, hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["vcek", "vlek"])
def test_the_arks_crl_comes_from_kds_when_none_is_at_hand_and_is_cached_until_due(crl_kds, tmp_path, kind):
    url, state, hits = crl_kds
    p = sb.platform("Genoa", kind)
    trust = TrustStore({fingerprint(p.ark): p.ark})
    report = sb.report(p)
    der = serialization.Encoding.DER

    def attest(folder="cache", **kw):
        return run(report, trust=trust, kds_url=url, fetcher=Fetcher(tmp_path / folder),
                   evidence={"auxblob": _table(p, *kw.pop("extra", ()))}, **kw)

    # Revoked on the CRL KDS serves: refused, and a second verifier answers from the cache.
    state["crl"] = sb.crl(p, (p.intermediate.serial_number,)).public_bytes(der)
    refused = attest()
    assert refused.failures[0].name == "crl" and "is revoked" in refused.failures[0].detail, refused.reason()
    assert hits == [f"/{kind}/v1/Genoa/crl"]
    state["crl"] = 500
    assert attest().failures[0].name == "crl" and len(hits) == 1

    # The host's CRL, though the ARK's, does not stand in for KDS's: it may predate the revocation.
    state["crl"] = sb.crl(p, (p.intermediate.serial_number,)).public_bytes(der)
    older = sb.crl(p, (7,)).public_bytes(der)
    assert attest("host", extra=[(CRL_GUID, older)]).failures[0].name == "crl" and len(hits) == 2
    # The operator's does: KDS is not asked.
    (tmp_path / "operator").mkdir()
    (tmp_path / "operator" / "genoa.crl").write_bytes(older)
    verdict = attest("operator", certs=[tmp_path / "operator"])
    assert verdict.ok and check(verdict, "crl").ok and len(hits) == 2, verdict.reason()

    # Past its next update the cached CRL is asked for again; a KDS that fails leaves it in use, said so.
    due = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    state["crl"] = sb.crl(p, (), next_update=due).public_bytes(der)
    stale = attest("stale")
    assert stale.ok and f"its next update was due {due:%Y-%m-%d}" in check(stale, "crl").detail, stale.reason()
    cached = tmp_path / "stale" / "kds" / kind / "v1" / "Genoa" / "crl"
    os.utime(cached, (time.time() - 7200, time.time() - 7200))  # KDS served it stale two hours ago
    state["crl"] = 500
    asked = len(hits)
    assert attest("stale").ok and len(hits) > asked  # asked again, failed, the stale CRL still counts
    assert check(attest("stale"), "crl").ok

    # A CRL not signed by the ARK (or no CRL) checks nothing, says why, is not kept, and is
    # remembered as a failure: the same fetcher does not ask again at once.
    for body in (sb.crl(p, (p.intermediate.serial_number,), signer=rsa.generate_private_key(65537, 2048))
                 .public_bytes(der), b"not a CRL"):
        state["crl"] = body
        fetcher, asked = Fetcher(tmp_path / "forged"), len(hits)
        for _ in range(2):
            forged = run(report, trust=trust, kds_url=url, fetcher=fetcher, evidence={"auxblob": _table(p)})
            assert forged.ok and check(forged, "crl").ok is None, forged.reason()
        assert len(hits) == asked + 1
        detail = check(forged, "crl").detail
        assert "not signed by the ARK" in detail or "cannot parse CRL" in detail, detail
        assert not (tmp_path / "forged" / "kds" / kind / "v1" / "Genoa" / "crl").exists()

    # KDS has none: N/A, as without --kds-url.
    state["crl"] = 404
    assert check(attest("none"), "crl").ok is None and "AMD KDS" in check(attest("none"), "crl").detail


def test_a_crl_from_kds_older_than_the_cached_one_does_not_replace_it(crl_kds, tmp_path):
    """A MITM on KDS (or a KDS mirror) may replay a CRL the ARK signed before a revocation; once the
    newer, revoking one is cached, the older one must not take its place when the cache is due."""
    url, state, hits = crl_kds
    p = sb.platform("Genoa")
    trust = TrustStore({fingerprint(p.ark): p.ark})
    der = serialization.Encoding.DER
    due = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)

    def attest():
        return run(sb.report(p), trust=trust, kds_url=url, fetcher=Fetcher(tmp_path / "cache"),
                   evidence={"auxblob": _table(p)})

    state["crl"] = sb.crl(p, (p.intermediate.serial_number,), issued=dt.datetime(2025, 6, 1, tzinfo=dt.UTC),
                          next_update=due).public_bytes(der)
    assert "is revoked" in attest().failures[0].detail
    cached = tmp_path / "cache" / "kds" / "vcek" / "v1" / "Genoa" / "crl"
    os.utime(cached, (time.time() - 7200, time.time() - 7200))  # due: KDS is asked again
    state["crl"] = sb.crl(p, (), issued=dt.datetime(2025, 1, 1, tzinfo=dt.UTC), next_update=due).public_bytes(der)
    asked = len(hits)
    for _ in range(2):  # asked once: the older answer does not leave the cache due
        verdict = attest()
        assert verdict.failures and "is revoked" in verdict.failures[0].detail, verdict.reason()
    assert len(hits) == asked + 1


def test_a_cached_crl_that_is_no_regular_file_or_too_large_is_fetched_again(crl_kds, tmp_path):
    """The cache is read on the key server's event loop (the offline pass): a FIFO put in place of
    the cached CRL must not block it, nor a huge file fill memory; either counts as no cache."""
    url, state, _ = crl_kds
    p = sb.platform("Genoa")
    trust = TrustStore({fingerprint(p.ark): p.ark})
    state["crl"] = sb.crl(p, (p.intermediate.serial_number,)).public_bytes(serialization.Encoding.DER)
    cached = tmp_path / "kds" / "vcek" / "v1" / "Genoa" / "crl"
    cached.parent.mkdir(parents=True)
    verdicts: list = []
    for make in (os.mkfifo, lambda path: path.write_bytes(b"\0" * (2 * 1024 * 1024))):
        make(cached)
        verdicts.clear()
        worker = threading.Thread(target=lambda: verdicts.append(run(
            sb.report(p), trust=trust, kds_url=url, fetcher=Fetcher(tmp_path), evidence={"auxblob": _table(p)})),
            daemon=True)
        worker.start()
        worker.join(10)
        if worker.is_alive():  # let the blocked open go, and fail
            os.close(os.open(cached, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(10)
            pytest.fail("reading the cached CRL blocked")
        assert "is revoked" in verdicts[0].failures[0].detail, verdicts[0].reason()
        cached.unlink()


def test_attestations_that_find_the_cached_crl_due_at_once_ask_kds_once(crl_kds, tmp_path):
    """The key server's fetcher serves every request: those that find the cached CRL due while KDS is
    being asked for it wait for that answer rather than each asking again."""
    url, state, hits = crl_kds
    p = sb.platform("Genoa")
    trust = TrustStore({fingerprint(p.ark): p.ark})
    due = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cached = tmp_path / "kds" / "vcek" / "v1" / "Genoa" / "crl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(sb.crl(p, (), next_update=due).public_bytes(serialization.Encoding.DER))
    os.utime(cached, (time.time() - 7200, time.time() - 7200))
    state["crl"] = sb.crl(p, (p.intermediate.serial_number,)).public_bytes(serialization.Encoding.DER)
    state["delay"] = 0.5
    fetcher, verdicts = Fetcher(tmp_path), []
    workers = [threading.Thread(target=lambda: verdicts.append(run(
        sb.report(p), trust=trust, kds_url=url, fetcher=fetcher, evidence={"auxblob": _table(p)})))
        for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [v.failures[0].name for v in verdicts] == ["crl"] * 4
    assert hits == ["/vcek/v1/Genoa/crl"]


def test_an_attestation_waits_for_another_fetch_of_the_crl_no_longer_than_a_fetch(crl_kds, tmp_path):
    """A fetch of the CRL that takes its whole budget (a cache that cannot keep what KDS answered makes
    every attestation fetch, one at a time) holds the others no longer than a fetch would."""
    from keybroker.verifier.fetch import refresh_lock

    url, _, hits = crl_kds
    p = sb.platform("Genoa")
    trust = TrustStore({fingerprint(p.ark): p.ark})
    with refresh_lock(f"{url}/vcek/v1/Genoa/crl"):  # another thread's fetch, never ending
        start = time.monotonic()
        verdict = run(sb.report(p), trust=trust, kds_url=url, fetcher=Fetcher(tmp_path, budget=1),
                      evidence={"auxblob": _table(p)})
        assert time.monotonic() - start < 5
    assert verdict.ok and check(verdict, "crl").ok is None and "did not end within 1 s" in check(verdict, "crl").detail
    assert hits == []


def test_a_cached_crl_past_its_next_update_kept_in_the_future_is_asked_for_again(crl_kds, tmp_path):
    """A CRL KDS served past its next update is used for STALE_RECHECK seconds (fetch) from when it was kept;
    kept 'in the future' (the clock was stepped back since, as after a boot with a clock ahead), it
    must not count as just checked until the clock gets there."""
    url, state, hits = crl_kds
    p = sb.platform("Genoa")
    trust = TrustStore({fingerprint(p.ark): p.ark})
    der = serialization.Encoding.DER
    cached = tmp_path / "kds" / "vcek" / "v1" / "Genoa" / "crl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(sb.crl(p, (), next_update=dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).public_bytes(der))
    ahead = time.time() + 365 * 86400
    os.utime(cached, (ahead, ahead))
    state["crl"] = sb.crl(p, (p.intermediate.serial_number,)).public_bytes(der)
    verdict = run(sb.report(p), trust=trust, kds_url=url, fetcher=Fetcher(tmp_path), evidence={"auxblob": _table(p)})
    assert verdict.failures and "is revoked" in verdict.failures[0].detail, verdict.reason()
    assert hits == ["/vcek/v1/Genoa/crl"]



# -- AMD KDS over loopback ----------------------------------------------------------------

@pytest.fixture
def kds():
    folder = vector("oak-milan")
    hits: list[str] = []
    state = {"throttle": 1}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if state["throttle"]:
                state["throttle"] -= 1
                self.send_response(429)
                self.send_header("Retry-After", "1")
                self.end_headers()
                return
            if self.path.startswith("/vcek/v1/Milan/") and "cert_chain" not in self.path:
                answer(self, (folder / "vcek.der").read_bytes())
            elif self.path == "/vcek/v1/Milan/cert_chain":
                answer(self, (folder / "ask.pem").read_bytes() + (folder / "ark.pem").read_bytes())
            else:
                answer(self, 404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits, server
    finally:
        server.shutdown()
        server.server_close()


def test_certificates_from_kds_with_cache_and_back_off(kds, tmp_path):
    url, hits, server = kds
    raw = (vector("oak-milan") / "report.bin").read_bytes()
    verdict = run(raw, kds_url=url, fetcher=Fetcher(tmp_path))
    assert verdict.ok, verdict.reason()
    assert hits[0] == hits[1] and "blSPL=" in hits[0] and "ucodeSPL=" in hits[0]  # 429, then the retry
    assert "/vcek/v1/Milan/cert_chain" in hits
    server.shutdown()  # the cache answers from now on (KDS had no CRL: refused, not left to time out)
    server.server_close()
    again = run(raw, kds_url=url, fetcher=Fetcher(tmp_path))
    assert again.ok
    assert sorted(p.name for p in (tmp_path / "kds" / "vcek" / "v1" / "Milan").iterdir())


def test_a_v2_vlek_report_gets_its_own_products_chain_from_kds(tmp_path):
    """A v2 report names no product (no CPUID) and KDS cannot serve a VLEK: the chain of every product
    that had v2 reports is fetched, so that a Genoa VLEK is not checked against Milan's ASVK only."""
    der = serialization.Encoding.DER
    genoa, milan = sb.platform("Genoa", "vlek"), sb.platform("Milan", "vlek")
    pem = serialization.Encoding.PEM
    chains = {p.product: p.intermediate.public_bytes(pem) + p.ark.public_bytes(pem) for p in (genoa, milan)}
    crls = {p.product: sb.crl(p).public_bytes(der) for p in (genoa, milan)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            kind, _, product, what = self.path.strip("/").split("/")
            answer(self, (chains if what == "cert_chain" else crls).get(product, 404) if kind == "vlek" else 404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        verdict = run(sb.report(genoa, version=2), trust=TrustStore({fingerprint(genoa.ark): genoa.ark}),
                      kds_url=f"http://127.0.0.1:{server.server_address[1]}", fetcher=Fetcher(tmp_path),
                      evidence={"auxblob": sb.cert_table([(GUID["vlek"], genoa.vek.public_bytes(der))])})
    finally:
        server.shutdown()
        server.server_close()
    assert verdict.ok, verdict.reason()


def test_kds_answers_fetched_side_by_side_or_not_kept_still_verify(kds, tmp_path):
    """Threads (and workers) fetching the same certificates each keep a file of their own; a cache
    that cannot be written costs a fetch later, not the verdict."""
    from concurrent.futures import ThreadPoolExecutor

    url, _, _ = kds
    raw = (vector("oak-milan") / "report.bin").read_bytes()
    fetchers = [Fetcher(tmp_path / "shared") for _ in range(8)]  # no shared memory: only the folder
    with ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda fetcher: run(raw, kds_url=url, fetcher=fetcher), fetchers * 3))
    assert all(verdict.ok for verdict in verdicts), [v.reason() for v in verdicts if not v.ok]
    assert not list((tmp_path / "shared").rglob(".*"))  # no temporary file left
    (tmp_path / "unwritable").mkdir()
    (tmp_path / "unwritable" / "kds").write_bytes(b"")  # a file where the cache's folder would be
    assert run(raw, kds_url=url, fetcher=Fetcher(tmp_path / "unwritable")).ok


@pytest.mark.parametrize("damage", [b"", b"-----BEGIN CERTIFICATE-----\ntruncated"], ids=["empty", "garbage"])
def test_a_cached_certificate_that_does_not_parse_is_fetched_again(kds, tmp_path, damage):
    """A cached VCEK or chain left empty (a crash between the write and the disk) or damaged failed every
    attestation of that chip (cannot parse certificate) until someone removed it: it is no cache, as a
    damaged CRL or collateral folder is, and what KDS answers takes its place."""
    url, _, _ = kds
    raw = (vector("oak-milan") / "report.bin").read_bytes()
    assert run(raw, kds_url=url, fetcher=Fetcher(tmp_path)).ok
    folder = tmp_path / "kds" / "vcek" / "v1" / "Milan"
    for cached in folder.iterdir():
        if cached.name != "crl":
            cached.write_bytes(damage)
    verdict = run(raw, kds_url=url, fetcher=Fetcher(tmp_path))
    assert verdict.ok, verdict.reason()
    assert all(certs.load_certs(cached.read_bytes()) for cached in folder.iterdir() if cached.name != "crl")


def test_kds_unreachable_is_named(tmp_path):
    raw = (vector("oak-milan") / "report.bin").read_bytes()
    verdict = run(raw, kds_url="http://127.0.0.1:9", fetcher=Fetcher(tmp_path))
    assert verdict.failures[0].name == "certificates" and "cannot fetch" in verdict.failures[0].detail


def test_a_stale_vcek_from_the_host_is_replaced_from_kds(kds, tmp_path):
    """A host whose certificate table was not refreshed after a TCB update (or that gives another
    chip's VCEK) offers a VCEK that cannot have signed the report: KDS has the one that did."""
    url, hits, _ = kds
    oak, other = vector("oak-milan"), vector("virtee-sev")
    table = sb.cert_table([(GUID["vcek"], _der(other / "vcek.der")), (GUID["ask"], _der(oak / "ask.pem")),
                           (GUID["ark"], _der(oak / "ark.pem"))])
    raw = (oak / "report.bin").read_bytes()
    verdict = run(raw, kds_url=url, fetcher=Fetcher(tmp_path), evidence={"auxblob": table})
    assert verdict.ok, verdict.reason()
    assert any("blSPL=" in hit for hit in hits)
    # KDS away: the verdict names what is wrong with the host's VCEK.
    verdict = run(raw, kds_url="http://127.0.0.1:9", fetcher=Fetcher(tmp_path / "other"), evidence={"auxblob": table})
    assert verdict.failures[0].name in ("tcb_matches_vek", "chip_id_matches"), verdict.reason()
    assert "the current one could not be fetched: " in verdict.failures[0].detail  # and why not


# -- SVSM service attestation through the emulator -------------------------------------------

def test_svsm_manifest_is_bound_and_exposed(tsm_sim, sim_state):
    from keybroker.guest.tsm import ReportRequest, TsmClient

    root = tsm_sim("sev_guest", svsm=True)
    nonce = hashlib.sha512(b"svsm").digest()
    report = TsmClient(root).get_report(ReportRequest(nonce, service_provider="svsm"))
    trust = TrustStore.default().with_dirs([sim_state / "trust"])
    verdict = verify(Evidence.from_report(report), Context(trust, nonce=nonce))
    assert verdict.ok, verdict.reason()
    assert check(verdict, "svsm_manifest_binding").ok
    ek = verdict.claims["snp.svsm.vtpm.ek_public"]
    assert ek.startswith("0023000b")  # TPMT_PUBLIC: TPM_ALG_ECC, nameAlg SHA-256
    assert verdict.claims["snp.svsm.services"] == ["c476f1eb-0123-45a5-9641-b4e7dde5bfe3"]
    tampered = Evidence.from_report(report)
    tampered = Evidence(tampered.provider, tampered.outblob, tampered.auxblob,
                        tampered.manifestblob[:-1] + bytes([tampered.manifestblob[-1] ^ 1]), tampered.inblob)
    assert verify(tampered, Context(trust, nonce=nonce)).failures[0].name == "svsm_manifest_binding"


def test_an_svsm_manifest_not_shown_bound_is_no_claim(tsm_sim, sim_state):
    """With REPORT_DATA given exactly (--report-data) or no nonce at all, nothing shows that the
    manifest is the one REPORT_DATA binds: its bytes, which anyone can change, make no claim."""
    from keybroker.guest.tsm import ReportRequest, TsmClient

    root = tsm_sim("sev_guest", svsm=True)
    nonce = hashlib.sha512(b"svsm exact").digest()
    report = TsmClient(root).get_report(ReportRequest(nonce, service_provider="svsm"))
    trust = TrustStore.default().with_dirs([sim_state / "trust"])
    manifest = bytearray(report.manifestblob)
    manifest[-1] ^= 1  # another vTPM EK
    report_data = hashlib.sha512(nonce + report.manifestblob).digest()
    evidence = Evidence("sev_guest", report.outblob, report.auxblob, bytes(manifest))
    for context in (Context(trust, report_data=report_data), Context(trust)):
        verdict = verify(evidence, context)
        assert not any(name.startswith("snp.svsm.") for name in verdict.claims), verdict.claims
        assert check(verdict, "svsm_manifest_binding").ok is None


def test_emulator_reports_verify_under_the_simulated_roots_only(tsm_sim, sim_state):
    from keybroker.guest.tsm import ReportRequest, TsmClient

    report = TsmClient(tsm_sim("sev_guest")).get_report(ReportRequest(bytes(64)))
    assert verify(Evidence.from_report(report), Context(TrustStore.default())).failures[0].name == "ark_pinned"
    trust = TrustStore.default().with_dirs([sim_state / "trust"])
    assert verify(Evidence.from_report(report), Context(trust)).ok


# -- the command ---------------------------------------------------------------------------

def keybroker(*args):
    return subprocess.run([sys.executable, "-m", "keybroker", *args], capture_output=True, text=True, timeout=60)


def test_verify_command():
    vlek = vector("trustee-vlek")
    expired = keybroker("verify", str(vlek / "report.bin"), "--provider", "sev_guest", "--certs", str(vlek))
    assert expired.returncode == 1 and "FAIL  certificates_valid" in expired.stdout
    ok = keybroker("verify", str(vlek / "report.bin"), "--certs", str(vlek), "--at", "2025-06-01T00:00:00Z")
    assert ok.returncode == 0 and "PASS  report_signature" in ok.stdout and "snp.vmpl = 1" in ok.stdout
    genoa = vector("oak-genoa")
    as_json = json.loads(keybroker("verify", str(genoa / "report.bin"), "--certs", str(genoa), "--json").stdout)
    assert as_json["ok"] is True and as_json["claims"]["snp.product"] == "Genoa"
    wrong = keybroker("verify", str(genoa / "report.bin"), "--certs", str(genoa), "--report-data", "00" * 64)
    assert wrong.returncode == 1 and "FAIL  report_data" in wrong.stdout


def test_verify_command_on_an_envelope(tsm_sim, sim_state, tmp_path):
    from keybroker.guest.tsm import ReportRequest, TsmClient
    from keybroker.wire import envelope

    report = TsmClient(tsm_sim("sev_guest")).get_report(ReportRequest(os.urandom(64)))
    path = tmp_path / "evidence.json"
    path.write_text(envelope.dumps(report))
    out = keybroker("verify", str(path), "--trust-roots", str(sim_state / "trust"))
    assert out.returncode == 0, out.stdout
    assert "PASS  nonce_binding" in out.stdout


def test_key_server_fetches_what_the_host_did_not_supply(tsm_sim, sim_state, kbs, tmp_path):
    """No certificate table from the host: the key server gets the VCEK and chain from the KDS."""
    import dataclasses

    from keybroker.guest.client import RcarClient
    from keybroker.guest.tsm import ReportRequest, TsmClient

    root = tsm_sim("sev_guest")
    snp = sim_state / "snp"
    chip = json.loads((snp / "values.json").read_text())["chip_id"]
    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            if self.path.startswith(f"/vcek/v1/Genoa/{chip}?"):
                body = (snp / "vcek.pem").read_bytes()
            elif self.path == "/vcek/v1/Genoa/cert_chain":
                body = (snp / "ask.pem").read_bytes() + (snp / "ark.pem").read_bytes()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    kds_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=kds_server.serve_forever, daemon=True).start()
    try:
        server = kbs("--kds-url", f"http://127.0.0.1:{kds_server.server_address[1]}",
                     "--cache-dir", str(tmp_path / "cache"))
        server.put("default/key/a", b"released")
        tsm = TsmClient(root)
        without_certs = lambda inblob: dataclasses.replace(tsm.get_report(ReportRequest(inblob)), auxblob=b"")  # noqa: E731
        released = RcarClient(server.url).fetch("default/key/a", "snp", without_certs)
        assert bytes(released.value) == b"released"
        assert any(path.startswith("/vcek/v1/Genoa/") for path in served)
    finally:
        kds_server.shutdown()
        kds_server.server_close()


def test_key_server_refuses_a_guest_whose_ask_the_crl_from_kds_revokes(tsm_sim, sim_state, kbs, crl_kds, tmp_path):
    """The host's table has no CRL and the operator keeps none: the key server asks KDS (on a thread,
    as the event loop verifies without the network) and keeps what it got."""
    from keybroker.errors import ReleaseRefused
    from keybroker.guest.client import RcarClient
    from keybroker.guest.tsm import ReportRequest, TsmClient
    from keybroker.sim.providers import snp_crl
    from keybroker.sim.roots import SimState

    url, state, hits = crl_kds
    sim = SimState(sim_state)
    ident = sim.snp()
    state["crl"] = snp_crl(ident, sim.snp_ark_key(), (ident.ask.serial_number,))
    server = kbs("--kds-url", url, "--cache-dir", str(tmp_path / "cache"))
    server.put("default/key/a", b"released")
    tsm = TsmClient(tsm_sim("sev_guest"))
    report = lambda inblob: tsm.get_report(ReportRequest(inblob))  # noqa: E731
    for _ in range(2):
        with pytest.raises(ReleaseRefused, match="revoked"):
            RcarClient(server.url).fetch("default/key/a", "snp", report)
    assert hits == ["/vcek/v1/Genoa/crl"]  # the second attestation read the cache


def test_svsm_guests_attest_through_the_svsm(tsm_sim, kbs, tmp_path, system_lock):
    """Linux under an SVSM runs at VMPL2: its own reports are refused by the default policy
    (VMPL0 wanted); with [tsm] service_provider = "svsm" the SVSM reports at VMPL0 and binds
    its manifest, and the key is released. (The machine lock: obtain keeps its token in root's user
    keyring, which tests on other workers read and empty.)"""
    from keybroker.errors import ServerError
    from keybroker.guest import config
    from keybroker.guest.broker import obtain
    from keybroker.guest.request import parse_request

    root = tsm_sim("sev_guest", svsm=True)
    server = kbs()
    server.put("default/disk/root", b"svsm key")
    request = parse_request("user", "keybroker:default/disk/root", "")

    def client(extra: str):
        path = tmp_path / "client.toml"
        path.write_text(f'[server]\nurl = "{server.url}"\n[tsm]\nroot = "{root}"\n{extra}')
        return config.load(path)

    def value(extra: str) -> bytes:  # in a child: obtain keeps its token through its process keyring
        return in_child(lambda: bytes(obtain(client(extra), request, deadline=time.monotonic() + 20).value))

    with pytest.raises(ServerError) as info:
        value("")
    assert info.value.problem == "PolicyDenied" and "claim snp.vmpl is 2, not 0" in str(info.value)
    assert value('service_provider = "svsm"\n') == b"svsm key"
    assert value('service_provider = "svsm"\nservice_guid = "c476f1eb-0123-45a5-9641-b4e7dde5bfe3"\n') == b"svsm key"


def test_svsm_service_claims_come_from_signed_bytes_only(tsm_sim, sim_state):
    """A single service's manifest does not name its service: relabelling it in the envelope
    (service_guid, which no signature covers) must not make it a vTPM key."""
    from dataclasses import replace

    from keybroker.guest.tsm import ReportRequest, TsmClient

    root = tsm_sim("sev_guest", svsm=True)
    nonce = hashlib.sha512(b"single").digest()
    vtpm = "c476f1eb-0123-45a5-9641-b4e7dde5bfe3"
    report = TsmClient(root).get_report(ReportRequest(nonce, service_provider="svsm", service_guid=vtpm,
                                                      service_manifest_version=0))
    trust = TrustStore.default().with_dirs([sim_state / "trust"])
    for envelope_guid in (vtpm, "a4453a59-9e1b-4787-a033-1986d6adbe55", None):
        relabelled = replace(report, service_guid=envelope_guid)
        verdict = verify(Evidence.from_report(relabelled), Context(trust, nonce=nonce))
        assert verdict.ok, verdict.reason()
        assert verdict.claims["snp.svsm.manifest"] == report.manifestblob.hex()
        assert "snp.svsm.vtpm.ek_public" not in verdict.claims and "snp.svsm.services" not in verdict.claims

"""Intel TDX collateral and quotes that must not be appraised as current: which document applies
when a folder holds several, the QE identity's signature and fields, the TCB signing certificate's
validity, the Root CA CRL, the PCK chain's validity, the QE binding's zero half, the relaunch rule.

Each case is one that a weakened check let through with every other TDX test still passing."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from keybroker.verifier import Context, Evidence, TrustStore, verify
from keybroker.verifier.certs import fingerprint
from support import tdx as tb
from support.policies import ANY_GUEST

DER = serialization.Encoding.DER
TOP = [6, 0, 4] + [0] * 13
QE_REPORT = 770  # in a v4 quote built by support.tdx: the QE report, its REPORTDATA at +320, signature at +384


def run(raw: bytes, p: tb.Platform, folder=None, *, at: dt.datetime = tb.AT):
    return verify(Evidence("tdx_guest", raw, inblob=tb.Td().report_data),
                  Context(TrustStore({fingerprint(p.root): p.root}), collateral=folder, at=at))


def check(verdict, name):
    return next(c for c in verdict.checks if c.name == name)


def first_failure(verdict):
    assert not verdict.ok, "the verdict passed"
    return verdict.failures[0]


def crl(issuer, key, revoked=(), *, last: dt.datetime = tb.ISSUED) -> bytes:
    builder = x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(last).next_update(
        tb.NEXT_UPDATE)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(DER)


def write_signed(path, member: str, obj: dict, p: tb.Platform) -> None:
    path.write_bytes(tb.signed_json(member, obj, p.signing_key))


# -- which of several documents applies ---------------------------------------------------------------

def test_the_newest_tcb_info_applies(tmp_path):
    """An older TCB info (evaluation data number 18) still says UpToDate; the newer one (19) says the
    same TCB is OutOfDate. Appraising by the older one would release a TD Intel has since downgraded."""
    p = tb.platform()
    newer = tb.tcb_info(p, levels=[tb.level(p.components, p.pcesvn, TOP, "OutOfDate")])
    folder = tb.collateral(tmp_path / "c", p, tcb=newer)
    older = tb.tcb_info(p) | {"tcbEvaluationDataNumber": 18}
    write_signed(folder / "tcbinfo-18.json", "tcbInfo", older, p)
    verdict = run(tb.quote(p), p, folder)
    assert verdict.ok and verdict.claims["tdx.tcb_status"] == "OutOfDate", verdict.reason()
    assert not ANY_GUEST.decide("x", verdict.claims).allowed


def test_the_newest_td_qe_identity_applies_and_only_a_td_qe_one(tmp_path):
    """The newest TD_QE identity puts the QE (ISVSVN 7) OutOfDate; an older TD_QE identity, and a newer
    identity of another enclave ("QE", the SGX quoting enclave), would have it UpToDate."""
    p = tb.platform()
    behind = [tb.isv_level(8), tb.isv_level(6, "OutOfDate")]
    folder = tb.collateral(tmp_path / "c", p, qe=tb.qe_identity(levels=behind))
    older = tb.qe_identity() | {"issueDate": tb.stamp(tb.ISSUED - dt.timedelta(days=30))}
    write_signed(folder / "qe_identity-older.json", "enclaveIdentity", older, p)
    sgx_qe = tb.qe_identity() | {"id": "QE", "issueDate": tb.stamp(tb.ISSUED + dt.timedelta(days=1))}
    write_signed(folder / "qe_identity-sgx.json", "enclaveIdentity", sgx_qe, p)
    verdict = run(tb.quote(p), p, folder)
    assert verdict.ok and verdict.claims["tdx.tcb_status"] == "OutOfDate", verdict.reason()
    assert "QE level ISVSVN 6 (OutOfDate)" in check(verdict, "tcb_status").detail


def test_the_newest_pck_crl_applies(tmp_path):
    """An older PCK CRL without the PCK beside the newer one that revokes it: the PCK is revoked."""
    p = tb.platform()
    folder = tb.collateral(tmp_path / "c", p, revoked=[p.pck.serial_number])
    (folder / "pck_crl-older.der").write_bytes(crl(p.ca, p.ca_key, last=tb.ISSUED - dt.timedelta(days=30)))
    failure = first_failure(run(tb.quote(p), p, folder))
    assert failure.name == "crl" and "revoked by the CRL of Intel SGX PCK Platform CA" in failure.detail


# -- signatures, signer, revocation by the root ---------------------------------------------------------

def test_a_tampered_qe_identity_fails_its_signature(tmp_path):
    p = tb.platform()
    folder = tb.collateral(tmp_path / "c", p)
    path = folder / "qe_identity.json"
    path.write_bytes(path.read_bytes().replace(b'"tcbEvaluationDataNumber":19', b'"tcbEvaluationDataNumber":20'))
    failure = first_failure(run(tb.quote(p), p, folder))
    assert failure.name == "collateral_signatures" and "QE identity" in failure.detail and "TCB info" not in \
        failure.detail.split(":", 1)[1], failure.detail


def test_an_expired_tcb_signing_certificate_signs_nothing(tmp_path):
    p = tb.platform()
    folder = tb.collateral(tmp_path / "c", p)
    expired = (x509.CertificateBuilder().subject_name(p.signing.subject).issuer_name(p.signing.issuer)
               .public_key(p.signing_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(tb.START).not_valid_after(tb.AT - dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .sign(p.root_key, hashes.SHA256()))
    (folder / "tcb_signing_chain.pem").write_bytes(tb.pem(expired, p.root))
    failure = first_failure(run(tb.quote(p), p, folder))
    assert failure.name == "collateral_signatures" and "is not valid at 2026-01-15" in failure.detail


@pytest.mark.parametrize("revoked, named", [("ca", "Intel SGX PCK Platform CA"),
                                            ("signing", "Intel SGX TCB Signing")])
def test_the_root_ca_crl_revokes_the_pck_ca_and_the_tcb_signer(tmp_path, revoked, named):
    p = tb.platform()
    folder = tb.collateral(tmp_path / "c", p)
    serial = (p.ca if revoked == "ca" else p.signing).serial_number
    (folder / "root_crl.der").write_bytes(crl(p.root, p.root_key, [serial]))
    failure = first_failure(run(tb.quote(p), p, folder))
    assert failure.name == "crl" and failure.detail == f"revoked by the CRL of Intel SGX Root CA: {named}"


# -- fields of the TCB info and the QE identity ----------------------------------------------------------

@pytest.mark.parametrize("document, change, failed, text", [
    ("tcb", {"version": 2}, "tcb_status", "has version 2"),
    ("tcb", {"pceId": "0100"}, "tcb_status", "PCE-ID 0100"),
    ("qe", {"version": 1}, "qe_identity", "QE identity version 1 is not 2"),
    ("qe", {"isvprodid": 1}, "qe_identity", "QE ISVPRODID 2 is not 1"),
    ("qe", {"miscselect": "01000000"}, "qe_identity", "QE MISCSELECT 00000000 does not match 01000000"),
    ("qe", {"attributes": "13000000000000000000000000000000"}, "qe_identity", "QE ATTRIBUTES 15000000"),
])
def test_collateral_fields_that_do_not_match_the_quote(tmp_path, document, change, failed, text):
    p = tb.platform()
    kw = {"tcb": tb.tcb_info(p) | change} if document == "tcb" else {"qe": tb.qe_identity() | change}
    failure = first_failure(run(tb.quote(p), p, tb.collateral(tmp_path / "c", p, **kw)))
    assert failure.name == failed and text in failure.detail, failure.detail


def test_a_tcb_info_with_an_unsigned_member_beside_the_signed_one_is_refused(tmp_path):
    p = tb.platform()
    folder = tb.collateral(tmp_path / "c", p)
    path = folder / "tcbinfo.json"
    path.write_bytes(path.read_bytes()[:-1] + b',"tcbStatus":"UpToDate"}')
    failure = first_failure(run(tb.quote(p), p, folder))
    assert failure.name == "collateral" and "expected exactly the members 'tcbInfo' and 'signature'" in failure.detail



@pytest.mark.parametrize("damage, text", [
    ("17 components", "sgxtcbcomponents has 17 components, expected 16"),
    ("short signature", "signature is 63 bytes, expected 64"),
])
def test_tcb_info_sizes_are_checked_when_it_is_loaded(tmp_path, damage, text):
    p = tb.platform()
    tcb = tb.tcb_info(p)
    if damage == "17 components":
        tcb["tcbLevels"][0]["tcb"]["sgxtcbcomponents"].append({"svn": 0})
    folder = tb.collateral(tmp_path / "c", p, tcb=tcb)
    if damage == "short signature":
        path = folder / "tcbinfo.json"
        path.write_bytes(path.read_bytes()[:-4] + b'"}')  # one byte (two hex digits) fewer
    failure = first_failure(run(tb.quote(p), p, folder))
    assert failure.name == "collateral" and text in failure.detail, failure.detail

# -- TDX 1.5 relaunch advice ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["qe behind", "running module's late microcode behind"])
def test_relaunch_is_not_advised_when_more_than_the_launch_module_is_behind(tmp_path, case):
    """Launched on module SVN 6 (OutOfDate), running SVN 9 (current): a relaunch helps only if nothing
    else is behind, neither the QE nor TEE_TCB_SVN_2[2] (below the latest level's 4 here)."""
    p = tb.platform()
    running = bytes([9, 1, 3 if case != "qe behind" else 4]) + bytes(13)
    tcb = tb.tcb_info(p, levels=[tb.level(p.components, p.pcesvn, TOP, "UpToDate")],
                      module_levels=[tb.isv_level(9), tb.isv_level(6, "OutOfDate")])
    qe = tb.qe_identity(levels=[tb.isv_level(8), tb.isv_level(6, "OutOfDate")]) if case == "qe behind" else None
    folder = tb.collateral(tmp_path / "c", p, tcb=tcb, qe=qe)
    verdict = run(tb.quote(p, tb.Td(tee_tcb_svn_2=running), version=5, body_type=3), p, folder)
    assert verdict.ok and verdict.claims["tdx.tcb_status"] == "OutOfDate", verdict.reason()


# -- the quote itself --------------------------------------------------------------------------------

@pytest.mark.parametrize("at", [tb.START - dt.timedelta(days=1), tb.START.replace(year=2050)])
def test_a_pck_chain_outside_its_validity_fails(at):
    p = tb.platform()
    failure = first_failure(run(tb.quote(p), p, at=at))
    assert failure.name == "pck_chain" and f"not valid at {at:%Y-%m-%d}" in failure.detail


def test_the_qe_binding_needs_the_zero_half_of_reportdata():
    """REPORTDATA is SHA-256(AK || auth data) followed by 32 zero bytes: one byte set in the zero half,
    the QE report re-signed by the PCK (a QE reporting something else), fails the binding."""
    p = tb.platform()
    raw = bytearray(tb.quote(p))
    report = slice(QE_REPORT, QE_REPORT + 384)
    assert raw[QE_REPORT + 320:QE_REPORT + 352] == hashlib.sha256(raw[700:764] + bytes(range(32))).digest()
    raw[QE_REPORT + 383] = 1
    raw[QE_REPORT + 384:QE_REPORT + 448] = tb.raw_sig(p.pck_key, bytes(raw[report]))
    verdict = run(bytes(raw), p)
    assert [c.name for c in verdict.failures] == ["qe_binding"], verdict.reason()


def test_any_td_under_debug_bit_is_a_debug_guest():
    """TDATTRIBUTES bits 0-7 are the TUD ("TD under debug") group: bit 1, not only bit 0, is debug."""
    p = tb.platform()
    verdict = run(tb.quote(p, tb.Td(td_attributes=(1 << 28 | 1 << 1).to_bytes(8, "little"))), p)
    assert verdict.ok and verdict.claims["debug"] is True and not verdict.claims["tdx.tdattributes.debug"]
    assert not ANY_GUEST.decide("x", verdict.claims).allowed

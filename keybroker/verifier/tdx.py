"""Intel TDX: parse a DCAP quote (v4, v5), verify it under Intel's chain, appraise its claims.

Layout and checks follow tdx.md (Intel TDX DCAP Quoting Library API, Intel QVL): a 48-byte
header, in v5 a 6-byte body descriptor, a TD report body (TDX 1.0: 584 bytes, TDX 1.5: 648),
then the signature data. Three ECDSA P-256 signatures (raw r||s, big-endian): the
attestation key (AK) signs every byte before the signature data; the PCK leaf signs the
quoting enclave's 384-byte report; the chain PCK -> PCK Platform/Processor CA -> Intel SGX
Root CA, pinned by fingerprint. The QE report binds the AK:
``REPORTDATA == SHA-256(AK || QE auth data) || 32 zero bytes``. Bytes after the declared
signature data (zero padding, test strings) are unsigned and ignored.

With collateral (TCB info, QE identity, CRLs; see ``collateral``) the TCB status is
derived as Intel's QVL does (see ``tcb``).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import EvidenceError
from . import Checks, Context, Evidence, check_freshness
from . import tcb
from .certs import common_name, fingerprint, is_ec_key, load_cert_dir, load_certs, signed_by, valid_at, validity
from .collateral import Collateral, load_folder
from .pck import PCK_CA_NAMES, TCB_SIGNING_CN, PckChain, PckInfo, pck_chain, pck_info
from .tcb import qe_identity_mismatch

QUOTE_MAX = 1024 * 1024  # real quotes are ~5 KB; kernels hand out at most a few pages of padding
HEADER_SIZE = 48
ATT_KEY_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
BODY_TD10, BODY_TD15 = 2, 3
BODY_SIZES = {BODY_TD10: 584, BODY_TD15: 648}
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
QE_REPORT_SIZE = 384
CHAIN_CERTS_MAX = 8

# -- the quote (abi) --------------------------------------------------------------------


@dataclass(frozen=True)
class TdReport:
    """The TD report body: TDX 1.0 fields, plus TEE_TCB_SVN_2 and MRSERVICETD for TDX 1.5."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn_2: bytes | None = None
    mrservicetd: bytes | None = None

    @classmethod
    def parse(cls, raw: bytes) -> "TdReport":
        def at(offset: int, size: int) -> bytes:
            return raw[offset:offset + size]

        extra = {}
        if len(raw) == BODY_SIZES[BODY_TD15]:
            extra = {"tee_tcb_svn_2": at(584, 16), "mrservicetd": at(600, 48)}
        return cls(tee_tcb_svn=at(0, 16), mrseam=at(16, 48), mrsignerseam=at(64, 48),
                   seam_attributes=at(112, 8), td_attributes=at(120, 8), xfam=at(128, 8),
                   mrtd=at(136, 48), mrconfigid=at(184, 48), mrowner=at(232, 48), mrownerconfig=at(280, 48),
                   rtmrs=(at(328, 48), at(376, 48), at(424, 48), at(472, 48)), report_data=at(520, 64), **extra)

    @property
    def td_attributes_value(self) -> int:
        return int.from_bytes(self.td_attributes, "little")


@dataclass(frozen=True)
class QeReport:
    """The TD quoting enclave's SGX REPORTBODY (384 bytes)."""

    raw: bytes
    cpusvn: bytes
    miscselect: bytes
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isvprodid: int
    isvsvn: int
    report_data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> "QeReport":
        isvprodid, isvsvn = struct.unpack_from("<HH", raw, 256)
        return cls(raw=raw, cpusvn=raw[0:16], miscselect=raw[16:20], attributes=raw[48:64],
                   mrenclave=raw[64:96], mrsigner=raw[128:160], isvprodid=isvprodid, isvsvn=isvsvn,
                   report_data=raw[320:384])


@dataclass(frozen=True)
class Quote:
    version: int
    body_type: int
    user_data: bytes
    body: TdReport
    signed: bytes               # header || [descriptor] || body: what the AK signed
    signature: bytes            # r || s
    attestation_key: bytes      # X || Y
    qe_report: QeReport
    qe_report_signature: bytes  # r || s, by the PCK leaf
    qe_auth_data: bytes
    certs: tuple[x509.Certificate, ...]  # the PCK chain from certification data type 5
    trailing: int               # unsigned bytes after the signature data


class _Reader:
    """Bounded reads from a hostile buffer: every length is checked before use."""

    def __init__(self, data: bytes, start: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, start, end, what

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.pos + size > self.end:
            raise EvidenceError(f"TDX quote truncated while reading {field} in {self.what} "
                                f"(need {size} bytes at offset {self.pos}, have {max(self.end - self.pos, 0)})")
        out = self.data[self.pos:self.pos + size]
        self.pos += size
        return out

    def u16(self, field: str) -> int:
        return struct.unpack("<H", self.take(2, field))[0]

    def u32(self, field: str) -> int:
        return struct.unpack("<I", self.take(4, field))[0]


def parse_quote(raw: bytes) -> Quote:
    """Parse a TDX quote v4 or v5 (body type 2 or 3) with QE report certification data."""
    if len(raw) > QUOTE_MAX:
        raise EvidenceError(f"TDX quote is {len(raw)} bytes, more than the {QUOTE_MAX} accepted")
    r = _Reader(raw, 0, len(raw), "the quote")
    version, key_type, tee_type = struct.unpack("<HHI", r.take(8, "header"))
    r.take(4, "header")  # reserved for TDX (QE/PCE SVN in SGX v3 quotes)
    vendor, user_data = r.take(16, "QE vendor ID"), r.take(20, "user data")
    if version not in (4, 5):
        raise EvidenceError(f"unsupported TDX quote version {version} (known: 4 and 5)")
    if tee_type != TEE_TYPE_TDX:
        raise EvidenceError(f"TEE type 0x{tee_type:08x} is not TDX (0x00000081)")
    if key_type != ATT_KEY_ECDSA_P256:
        raise EvidenceError(f"attestation key type {key_type} is not 2 (ECDSA P-256)")
    if vendor != INTEL_QE_VENDOR_ID:
        raise EvidenceError(f"QE vendor ID {vendor.hex()} is not Intel's {INTEL_QE_VENDOR_ID.hex()}")
    body_type = BODY_TD10
    if version == 5:
        body_type, body_size = r.u16("body type"), r.u32("body size")
        if body_type not in BODY_SIZES:
            raise EvidenceError(f"quote v5 body type {body_type} is not a TD report (2: TDX 1.0, 3: TDX 1.5)")
        if body_size != BODY_SIZES[body_type]:
            raise EvidenceError(f"quote v5 body type {body_type} has size {body_size}, "
                                f"expected {BODY_SIZES[body_type]}")
    body = TdReport.parse(r.take(BODY_SIZES[body_type], "TD report body"))
    signed = raw[:r.pos]

    sig_len = r.u32("signature data length")
    sig = _Reader(raw, r.pos, r.pos + sig_len, "the signature data")
    if sig.end > len(raw):
        raise EvidenceError(f"TDX quote truncated: the signature data needs {sig_len} bytes at offset "
                            f"{r.pos}, have {len(raw) - r.pos}")
    signature, attestation_key = sig.take(64, "quote signature"), sig.take(64, "attestation key")
    cert_type, cert_size = sig.u16("certification data type"), sig.u32("certification data size")
    if cert_type != CERT_DATA_QE_REPORT:
        raise EvidenceError(f"certification data type {cert_type} is not 6 (QE report certification data)")
    qe = _Reader(raw, sig.pos, sig.pos + cert_size, "the QE report certification data")
    sig.take(cert_size, "QE report certification data")
    qe_report = QeReport.parse(qe.take(QE_REPORT_SIZE, "QE report"))
    qe_report_signature = qe.take(64, "QE report signature")
    qe_auth_data = qe.take(qe.u16("QE authentication data size"), "QE authentication data")
    inner_type, inner_size = qe.u16("PCK certification data type"), qe.u32("PCK certification data size")
    if inner_type != CERT_DATA_PCK_CHAIN:
        raise EvidenceError(f"PCK certification data type {inner_type} is not 5 (PEM PCK chain); types 1-4 "
                            "need the PCK certificate from Intel's PCS, which keybroker does not fetch")
    pem = qe.take(inner_size, "PCK certificate chain")
    if b"-----BEGIN CERTIFICATE-----" not in pem or pem.count(b"-----BEGIN") > CHAIN_CERTS_MAX:
        raise EvidenceError(f"the PCK chain must be 1 to {CHAIN_CERTS_MAX} PEM certificates")
    certs = load_certs(pem.rstrip(b"\0"))
    return Quote(version=version, body_type=body_type, user_data=user_data, body=body, signed=signed,
                 signature=signature, attestation_key=attestation_key, qe_report=qe_report,
                 qe_report_signature=qe_report_signature, qe_auth_data=qe_auth_data, certs=tuple(certs),
                 trailing=len(raw) - sig.end)


# -- appraisal: claims ------------------------------------------------------------------

TD_ATTRIBUTE_BITS = {"debug": 0, "sept_ve_disable": 28, "migratable": 29, "pks": 30, "kl": 31, "perfmon": 63}
TUD_MASK = 0xFF  # bits 0-7, the "TD under debug" group


def claims(quote: Quote) -> dict[str, Any]:
    """The quote as flat claims for the release policy."""
    b = quote.body
    attributes = b.td_attributes_value
    c: dict[str, Any] = {
        "tee": "tdx", "provider": "tdx_guest",
        "debug": bool(attributes & TUD_MASK),
        "measurement": b.mrtd.hex(),
        "tdx.quote_version": quote.version,
        "tdx.body_type": quote.body_type,
        "tdx.mrtd": b.mrtd.hex(),
        "tdx.mrconfigid": b.mrconfigid.hex(),
        "tdx.mrowner": b.mrowner.hex(),
        "tdx.mrownerconfig": b.mrownerconfig.hex(),
        "tdx.tdattributes": b.td_attributes.hex(),
        "tdx.xfam": b.xfam.hex(),
        "tdx.tee_tcb_svn": b.tee_tcb_svn.hex(),
        "tdx.mrseam": b.mrseam.hex(),
        "tdx.mrsignerseam": b.mrsignerseam.hex(),
        "tdx.seamattributes": b.seam_attributes.hex(),
        "tdx.report_data": b.report_data.hex(),
        "tdx.qe.isvsvn": quote.qe_report.isvsvn,
        "tdx.advisory_ids": [],
    }
    for i, rtmr in enumerate(b.rtmrs):
        c[f"tdx.rtmr{i}"] = rtmr.hex()
    for name, bit in TD_ATTRIBUTE_BITS.items():
        c[f"tdx.tdattributes.{name}"] = bool(attributes >> bit & 1)
    if b.tee_tcb_svn_2 is not None:
        c["tdx.tee_tcb_svn_2"] = b.tee_tcb_svn_2.hex()
        c["tdx.mrservicetd"] = b.mrservicetd.hex()  # type: ignore[union-attr]
    return c


def _pck_claims(info: PckInfo, chain: PckChain) -> dict[str, Any]:
    return {"tdx.fmspc": info.fmspc.hex(), "tdx.pce_id": info.pce_id.hex(), "tdx.pcesvn": info.pcesvn,
            "tdx.pck_ca": chain.ca_kind or common_name(chain.ca.subject)}


# -- verification -----------------------------------------------------------------------

def _raw_ecdsa_p256(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def verify(evidence: Evidence, context: Context, checks: Checks, claims_out: dict[str, Any]) -> None:
    quote = parse_quote(evidence.outblob)
    claims_out.update(claims(quote))
    anchors = context.trust.anchors() + [c for folder in context.certs for c in load_cert_dir(folder)]
    chain = pck_chain(list(quote.certs), anchors, context.trust.is_trusted)
    info = pck_info(chain.leaf)
    claims_out.update(_pck_claims(info, chain))
    trailing = f", {quote.trailing} unsigned trailing bytes ignored" if quote.trailing else ""
    checks.passed("format", f"quote v{quote.version}, TDX {'1.5' if quote.body_type == BODY_TD15 else '1.0'} "
                            f"body ({BODY_SIZES[quote.body_type]} B), signed region {len(quote.signed)} B{trailing}")

    _check_chain(chain, context, checks)
    leaf_key = chain.leaf.public_key()
    checks.require(_raw_ecdsa_p256(leaf_key, quote.qe_report_signature, quote.qe_report.raw),  # type: ignore[arg-type]
                   "qe_report_signature", "ECDSA P-256 SHA-256 over the QE report, by the PCK leaf",
                   "the QE report signature does not verify under the PCK leaf's key")
    ak = _attestation_key(quote.attestation_key)
    checks.require(ak is not None and _raw_ecdsa_p256(ak, quote.signature, quote.signed), "quote_signature",
                   f"ECDSA P-256 SHA-256 over quote[0:{len(quote.signed)}], by the attestation key",
                   "the quote signature does not verify under the attestation key in the quote"
                   if ak else "the attestation key is not a P-256 point")
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    checks.require(quote.qe_report.report_data == expected, "qe_binding",
                   f"QE REPORTDATA = SHA-256(attestation key || QE auth data [{len(quote.qe_auth_data)} B]) || 0^32",
                   "QE REPORTDATA is not SHA-256(attestation key || QE auth data) || 0^32: the attestation key "
                   "or the QE authentication data is not the one the quoting enclave reported")
    check_freshness(quote.body.report_data, evidence, context, checks, what="REPORTDATA")
    _appraise_tcb(quote, chain, info, context, checks, claims_out)


def _check_chain(chain: PckChain, context: Context, checks: Checks) -> None:
    leaf, ca, root = chain.leaf, chain.ca, chain.root
    if root is None:
        checks.failed("root_pinned", f"no root certificate for {common_name(ca.issuer)!r}: neither the quote, "
                                     "the --certs folders nor the trust anchors hold it")
    assert root is not None
    fp = fingerprint(root)
    checks.require(context.trust.is_trusted(root), "root_pinned",
                   f"sha256 {fp[:16]}... of {common_name(root.subject)} is a trusted root",
                   f"root {common_name(root.subject)!r} (sha256 {fp}) is not the pinned Intel SGX Root CA "
                   "or a --trust-roots anchor")
    problems = []
    if chain.ca_kind is None:
        problems.append(f"the PCK issuer {common_name(ca.subject)!r} is not one of {', '.join(PCK_CA_NAMES)}")
    if _is_ca(leaf) or not _is_ca(ca):
        problems.append("the PCK leaf must not be a CA and its issuer must be one")
    if not all(is_ec_key(c, ec.SECP256R1) for c in (leaf, ca)):
        problems.append("PCK keys must be EC P-256")
    for child, issuer in ((leaf, ca), (ca, root), (root, root)):
        if not signed_by(child, issuer):
            problems.append(f"{common_name(child.subject)} is not signed by {common_name(issuer.subject)}")
    expired = [f"{common_name(c.subject)} ({validity(c)})" for c in (leaf, ca, root) if not valid_at(c, context.at)]
    if expired:
        problems.append(f"not valid at {context.at:%Y-%m-%dT%H:%M:%SZ}: {', '.join(expired)}")
    checks.require(not problems, "pck_chain",
                   f"{common_name(leaf.subject)} -> {common_name(ca.subject)} -> {common_name(root.subject)}, "
                   f"valid at {context.at:%Y-%m-%dT%H:%M:%SZ}", "; ".join(problems))


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# -- appraisal with collateral ----------------------------------------------------------

def _collateral(context: Context, info: PckInfo, chain: PckChain) -> Collateral | None:
    if context.collateral is not None:
        return load_folder(context.collateral)
    if context.pcs_url is not None:
        from .pcs import fetch_collateral
        assert chain.ca_kind is not None  # pck_chain passed: the CA is a platform or processor CA
        return fetch_collateral(context, info.fmspc, chain.ca_kind)
    return None


def _appraise_tcb(quote: Quote, chain: PckChain, info: PckInfo, context: Context, checks: Checks,
                  claims_out: dict[str, Any]) -> None:
    try:
        collateral = _collateral(context, info, chain)
    except EvidenceError as exc:
        checks.failed("collateral", str(exc))
    if collateral is None:
        checks.skipped("tcb_status", "no collateral (--collateral DIR or --pcs-url URL): TCB status not evaluated")
        return
    root = chain.root
    assert root is not None
    tcb_info = collateral.tcb_info(info.fmspc)
    if tcb_info is None:
        checks.failed("collateral", f"no TDX TCB info for FMSPC {info.fmspc.hex()} in {collateral.source}")
    assert tcb_info is not None
    qe_identity = collateral.qe_identity()
    pck_crl, root_crl = collateral.crl(chain.ca.subject), collateral.crl(root.subject)

    signer = _tcb_signer(collateral, root, context)
    if isinstance(signer, str):
        checks.failed("collateral_signatures", signer)
    assert isinstance(signer, x509.Certificate)
    key = signer.public_key()
    bad = [f"{what} ({doc.source})" for what, doc in (("TCB info", tcb_info), ("QE identity", qe_identity))
           if doc is not None and not _raw_ecdsa_p256(key, doc.signature, doc.body)]  # type: ignore[arg-type]
    checks.require(not bad, "collateral_signatures",
                   f"TCB info{' and QE identity' if qe_identity else ''} signed by {common_name(signer.subject)} "
                   f"under {common_name(root.subject)}",
                   f"signature does not verify under {common_name(signer.subject)}: {', '.join(bad)}")

    _check_crls(chain, signer, pck_crl, root_crl, checks)

    qe_level = None
    if qe_identity is None:
        checks.skipped("qe_identity", f"no TD_QE identity in {collateral.source}: the QE is not appraised")
    else:
        identity = qe_identity.content
        mismatch = qe_identity_mismatch(identity, quote.qe_report)
        if identity.version != 2:
            mismatch = f"QE identity version {identity.version} is not 2"
        checks.require(mismatch is None, "qe_identity",
                       f"TD_QE MRSIGNER, ISVPRODID {identity.isvprodid}, MISCSELECT and ATTRIBUTES match",
                       mismatch or "")
        qe_level = tcb.qe_level(identity, quote.qe_report)

    content = tcb_info.content
    if content.version < 3 or content.pce_id != info.pce_id:
        checks.failed("tcb_status", f"TCB info for FMSPC {content.fmspc.hex()} has version {content.version} and "
                                    f"PCE-ID {content.pce_id.hex()}; the quote needs version 3 or later and the "
                                    f"PCK's PCE-ID {info.pce_id.hex()}")
    try:
        result = tcb.tdx_tcb_status(content, info, quote.body, qe_level)
    except EvidenceError as exc:
        checks.failed("tcb_status", str(exc))
    used = [(f"TCB info {tcb_info.source}", content.next_update)]
    used += [(f"QE identity {qe_identity.source}", qe_identity.content.next_update)] if qe_identity else []
    used += [(f"CRL of {common_name(c.issuer)}", c.next_update_utc) for c in (pck_crl, root_crl) if c is not None]
    expired = [f"{what} (next update {when:%Y-%m-%d})" for what, when in used if when is None or when < context.at]
    claims_out.update({"tdx.tcb_status": result.status, "tdx.advisory_ids": list(result.advisory_ids),
                       "tdx.tcb_date": result.date, "tdx.collateral_expired": bool(expired)})
    advisories = f"; advisories {', '.join(result.advisory_ids)}" if result.advisory_ids else ""
    freshness = f"; EXPIRED at {context.at:%Y-%m-%d}: {', '.join(expired)}" if expired else ""
    checks.passed("tcb_status", f"{result.status} ({result.explanation}){advisories}{freshness}")


def _tcb_signer(collateral: Collateral, root: x509.Certificate, context: Context) -> x509.Certificate | str:
    """The "Intel SGX TCB Signing" certificate, issued by the quote's (pinned) root."""
    signers = [c for c in collateral.certs if common_name(c.subject) == TCB_SIGNING_CN]
    if not signers:
        return f"no {TCB_SIGNING_CN!r} certificate in {collateral.source} (the TCB info issuer chain)"
    issued = [c for c in signers if signed_by(c, root)]
    if not issued:
        return (f"{TCB_SIGNING_CN!r} in {collateral.source} is not issued by the quote's root "
                f"{common_name(root.subject)} (sha256 {fingerprint(root)[:16]}...)")
    current = [c for c in issued if valid_at(c, context.at) and is_ec_key(c, ec.SECP256R1)]
    if not current:
        return f"{TCB_SIGNING_CN!r} is not valid at {context.at:%Y-%m-%dT%H:%M:%SZ} ({validity(issued[0])})"
    return current[0]


def _check_crls(chain: PckChain, signer: x509.Certificate, pck_crl: x509.CertificateRevocationList | None,
                root_crl: x509.CertificateRevocationList | None, checks: Checks) -> None:
    root = chain.root
    assert root is not None
    if pck_crl is None and root_crl is None:
        checks.skipped("crl", "no PCK CRL and no Root CA CRL in the collateral: revocation not checked")
        return
    problems, done = [], []
    for crl, issuer, subjects in ((pck_crl, chain.ca, (chain.leaf,)), (root_crl, root, (chain.ca, signer))):
        if crl is None:
            continue
        name = f"CRL of {common_name(issuer.subject)}"
        if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            problems.append(f"the {name} is not signed by it")
            continue
        revoked = [common_name(c.subject) for c in subjects
                   if crl.get_revoked_certificate_by_serial_number(c.serial_number) is not None]
        if revoked:
            problems.append(f"revoked by the {name}: {', '.join(revoked)}")
        done.append(name)
    missing = [f"no {name}" for name, crl in (("PCK CRL", pck_crl), ("Root CA CRL", root_crl)) if crl is None]
    checks.require(not problems, "crl", f"{' and '.join(done)} signed; nothing revoked"
                   + (f" ({missing[0]})" if missing else ""), "; ".join(problems))

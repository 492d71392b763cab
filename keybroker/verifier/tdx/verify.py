"""Intel TDX, verified: the PCK chain to the pinned root, the QE report, the quote, the bindings, the TCB.

Three ECDSA P-256 signatures (raw r||s, big-endian): the attestation key (AK) signs every
byte before the signature data; the PCK leaf signs the quoting enclave's 384-byte report;
the chain PCK -> PCK Platform/Processor CA -> Intel SGX Root CA, pinned by fingerprint. The
QE report binds the AK: ``REPORTDATA == SHA-256(AK || QE auth data) || 32 zero bytes``.
With collateral (TCB info, QE identity, CRLs; see ``collateral``, from a folder or ``pcs``)
the TCB status is derived as Intel's QVL does (``tcb``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ...errors import EventLogError, EvidenceError
from ...wire.eventlog import parse_event_log
from ..certs import (
    common_name,
    fingerprint,
    is_ec_key,
    issuer_cn,
    load_cert_dir,
    signed_by,
    subject_cn,
    valid_at,
    validity,
)
from ..core import Checks, Context, Evidence, check_freshness, check_init_data
from ..trust import INTEL_TD_QE_ISVPRODID, INTEL_TD_QE_MRSIGNER
from . import tcb
from .abi import BODY_SIZES, BODY_TD15, Quote, parse_quote
from .claims import claims, pck_claims
from .collateral import Collateral, load_folder
from .eventlog import claims as event_claims
from .eventlog import replay
from .pck import PCK_CA_NAMES, TCB_SIGNING_CN, PckChain, PckInfo, pck_chain, pck_info
from .pcs import fetch_collateral
from .tcb import qe_identity_mismatch

SGX_ATTRIBUTE_DEBUG = 0x02  # ATTRIBUTES.FLAGS bit 1


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
    if chain.ca_kind == "platform" and (info.platform_instance_id is None or info.configuration is None):
        raise EvidenceError("the PCK certificate is the Platform CA's but has no PlatformInstanceID or "
                            "Configuration, which every Platform-CA PCK certificate carries")
    claims_out.update(pck_claims(info, chain))
    trailing = f", {quote.trailing} unsigned trailing bytes ignored" if quote.trailing else ""
    checks.passed("format", f"quote v{quote.version}, TDX {'1.5' if quote.body_type == BODY_TD15 else '1.0'} "
                            f"body ({BODY_SIZES[quote.body_type]} B), signed region {len(quote.signed)} B{trailing}")

    _check_chain(chain, context, checks)
    leaf_key = chain.leaf.public_key()
    checks.require(_raw_ecdsa_p256(leaf_key, quote.qe_report_signature, quote.qe_report.raw),  # type: ignore[arg-type]
                   "qe_report_signature", "ECDSA P-256 SHA-256 over the QE report, by the PCK leaf",
                   "the QE report signature does not verify under the PCK leaf's key")
    checks.require(_qe_problem(quote) is None, "qe_pinned",
                   "the quoting enclave is Intel's TD QE (MRSIGNER and ISVPRODID pinned), not in debug mode",
                   _qe_problem(quote) or "")
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
    checks.genuine_and_bound()  # the PCK chain, the QE report's and the quote's signatures, both bindings
    check_init_data(quote.body.mrconfigid, context, checks, what="MRCONFIGID")
    if evidence.event_log:
        _check_event_log(evidence.event_log, quote, checks, claims_out)
    _appraise_tcb(quote, chain, info, context, checks, claims_out)


def _check_event_log(raw: bytes, quote: Quote, checks: Checks, claims_out: dict[str, Any]) -> None:
    """The event log replays to each of RTMR0-3 exactly; only then do its events become claims."""
    try:
        result = replay(parse_event_log(raw))
        mismatches = result.mismatches(quote.body.rtmrs)
        found = event_claims(result) if not mismatches else {}
    except EventLogError as exc:
        checks.failed("event_log", str(exc))
    if mismatches:
        checks.failed("event_log", "; ".join(
            f"RTMR{i}: the log ({result.counts[i]} events) replays to {computed.hex()}, the quote has {quoted.hex()}"
            for i, computed, quoted in mismatches) + ": the log is not the whole story of these RTMRs")
    claims_out.update(found)
    counts = ", ".join(f"RTMR{i} {n}" for i, n in enumerate(result.counts))
    checks.passed("event_log", f"{len(result.extended)} events replay to RTMR0-3 ({counts})")


def _qe_problem(quote: Quote) -> str | None:
    """Why the enclave that signed for the attestation key is not Intel's TD quoting enclave, or None."""
    qe = quote.qe_report
    if qe.mrsigner != INTEL_TD_QE_MRSIGNER:
        return f"QE MRSIGNER {qe.mrsigner.hex()} is not Intel's TD QE signer {INTEL_TD_QE_MRSIGNER.hex()}"
    if qe.isvprodid != INTEL_TD_QE_ISVPRODID:
        return f"QE ISVPRODID {qe.isvprodid} is not the TD QE's {INTEL_TD_QE_ISVPRODID}"
    if qe.attributes[0] & SGX_ATTRIBUTE_DEBUG:
        return "the quoting enclave runs in debug mode (ATTRIBUTES.DEBUG): its memory, keys included, is readable"
    return None


def _check_chain(chain: PckChain, context: Context, checks: Checks) -> None:
    leaf, ca, root = chain.leaf, chain.ca, chain.root
    if root is None:
        checks.failed("root_pinned", f"no root certificate for {issuer_cn(ca)!r}: neither the quote, "
                                     "the --certs folders nor the trust anchors hold it")
    assert root is not None
    fp = fingerprint(root)
    checks.require(context.trust.is_trusted(root), "root_pinned",
                   f"sha256 {fp[:16]}... of {subject_cn(root)} is a trusted root",
                   f"root {subject_cn(root)!r} (sha256 {fp}) is not the pinned Intel SGX Root CA "
                   "or a --trust-roots anchor")
    problems = []
    if chain.ca_kind is None:
        problems.append(f"the PCK issuer {subject_cn(ca)!r} is not one of {', '.join(PCK_CA_NAMES)}")
    if _is_ca(leaf) or not _is_ca(ca):
        problems.append("the PCK leaf must not be a CA and its issuer must be one")
    if not all(is_ec_key(c, ec.SECP256R1) for c in (leaf, ca)):
        problems.append("PCK keys must be EC P-256")
    for child, issuer in ((leaf, ca), (ca, root), (root, root)):
        if not signed_by(child, issuer):
            problems.append(f"{subject_cn(child)} is not signed by {subject_cn(issuer)}")
    expired = [f"{subject_cn(c)} ({validity(c)})" for c in (leaf, ca, root) if not valid_at(c, context.at)]
    if expired:
        problems.append(f"not valid at {context.at:%Y-%m-%dT%H:%M:%SZ}: {', '.join(expired)}")
    checks.require(not problems, "pck_chain",
                   f"{subject_cn(leaf)} -> {subject_cn(ca)} -> {subject_cn(root)}, "
                   f"valid at {context.at:%Y-%m-%dT%H:%M:%SZ}", "; ".join(problems))


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _collateral(context: Context, info: PckInfo, chain: PckChain) -> Collateral | None:
    if context.collateral is not None:
        return load_folder(context.collateral)
    if context.pcs_url is not None:
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
                   f"TCB info{' and QE identity' if qe_identity else ''} signed by {subject_cn(signer)} "
                   f"under {subject_cn(root)}",
                   f"signature does not verify under {subject_cn(signer)}: {', '.join(bad)}")

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
    expired = [f"{what} ({'no next update' if when is None else f'next update {when:%Y-%m-%d}'})"
               for what, when in used if when is None or when < context.at]
    claims_out.update({"tdx.tcb_status": result.status, "tdx.advisory_ids": list(result.advisory_ids),
                       "tdx.tcb_date": result.date, "tdx.collateral_expired": bool(expired)})
    advisories = f"; advisories {', '.join(result.advisory_ids)}" if result.advisory_ids else ""
    freshness = f"; EXPIRED at {context.at:%Y-%m-%d}: {', '.join(expired)}" if expired else ""
    checks.passed("tcb_status", f"{result.status} ({result.explanation}){advisories}{freshness}")


def _tcb_signer(collateral: Collateral, root: x509.Certificate, context: Context) -> x509.Certificate | str:
    """The "Intel SGX TCB Signing" certificate, issued by the quote's (pinned) root."""
    signers = [c for c in collateral.certs if subject_cn(c) == TCB_SIGNING_CN]
    if not signers:
        return f"no {TCB_SIGNING_CN!r} certificate in {collateral.source} (the TCB info issuer chain)"
    issued = [c for c in signers if signed_by(c, root)]
    if not issued:
        return (f"{TCB_SIGNING_CN!r} in {collateral.source} is not issued by the quote's root "
                f"{subject_cn(root)} (sha256 {fingerprint(root)[:16]}...)")
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
        name = f"CRL of {subject_cn(issuer)}"
        if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            problems.append(f"the {name} is not signed by it")
            continue
        revoked = [subject_cn(c) for c in subjects
                   if crl.get_revoked_certificate_by_serial_number(c.serial_number) is not None]
        if revoked:
            problems.append(f"revoked by the {name}: {', '.join(revoked)}")
        done.append(name)
    missing = [f"no {name}" for name, crl in (("PCK CRL", pck_crl), ("Root CA CRL", root_crl)) if crl is None]
    checks.require(not problems, "crl", f"{' and '.join(done)} signed; nothing revoked"
                   + (f" ({missing[0]})" if missing else ""), "; ".join(problems))

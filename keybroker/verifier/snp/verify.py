"""AMD SEV-SNP, verified: the chain ARK -> ASK/ASVK -> VCEK/VLEK, the report signature, the bindings.

The chain is RSASSA-PSS SHA-384 (salt 48) with the ARK pinned by fingerprint; the VEK's SPL
and hwID extensions must match REPORTED_TCB and CHIP_ID; the report's ECDSA P-384 signature
covers bytes 0x000-0x29F. Certificates come from the host's table in ``auxblob``, the
operator's folders, or AMD's KDS (``kds``) when neither has them (or only a VCEK for another
chip or TCB); the binding to the nonce is checked before anything is fetched.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ...errors import EvidenceError
from ...wire import ghcb
from ..certs import (
    crl_signed_by_rsa_pss_sha384,
    fingerprint,
    is_ec_key,
    issuer_cn,
    load_cert_dir,
    load_certs,
    load_crl,
    load_crl_dir,
    names_issuer,
    signed_by_rsa_pss_sha384,
    subject_cn,
    valid_at,
    validity,
)
from ..core import Checks, Context, Evidence, check_freshness, check_init_data
from ..trust import TrustStore
from .abi import (
    PRODUCTS,
    REPORT_SIZE,
    SIGNED_SIZE,
    Report,
    parse_report,
    vek_hwid,
    vek_product_name,
    vek_spl,
)
from .claims import claims, manifest_claims
from .kds import fetch_chain, fetch_crl


@dataclass(frozen=True)
class Chain:
    ark: x509.Certificate
    intermediate: x509.Certificate  # ASK or ASVK
    vek: x509.Certificate


def _product_of(cn: str, prefix: str) -> str | None:
    if cn.startswith(prefix) and cn[len(prefix):] in PRODUCTS:
        return cn[len(prefix):]
    return None


def _candidates(table: list[tuple[uuid.UUID, bytes]], context: Context) -> list[x509.Certificate]:
    """Certificates from the host's certificate table (auxblob), then the operator's folders and anchors.

    The table's CRL entry (AMD's revocation list) is no certificate, nor need an entry of a GUID
    keybroker does not know be one (go-sev-guest keeps them as extras, Trustee passes them over)."""
    certs = []
    for guid, der in table:
        if ghcb.KINDS.get(guid) == "CRL":
            continue
        try:
            certs += load_certs(der, most=1)
        except EvidenceError:
            if guid in ghcb.KINDS:
                raise
    for folder in context.certs:
        certs.extend(load_cert_dir(folder))
    certs.extend(context.trust.anchors())
    return certs


def _host_crls(table: list[tuple[uuid.UUID, bytes]]) -> list[x509.CertificateRevocationList]:
    """The CRL entry of the host's table. One that does not parse is passed over, as a host could as
    well leave it out (an operator's ``.crl`` file that does not parse is an error: it must not
    quietly turn the check off)."""
    crls = []
    for guid, der in table:
        if ghcb.KINDS.get(guid) == "CRL":
            with contextlib.suppress(EvidenceError):
                crls.append(load_crl(der))
    return crls


def _check_revocation(chain: Chain, kind: str, table: list[tuple[uuid.UUID, bytes]], context: Context,
                      checks: Checks) -> None:
    """No CRL of the ARK may revoke the ASK or ASVK (the certificates the ARK issues). The CRLs are
    the host's and the operator's folders'; unless the operator keeps one of the ARK's, AMD's KDS's
    too (with ``kds_url``): the host could send an old CRL from before a revocation."""
    ark, inter = subject_cn(chain.ark), chain.intermediate
    hosts = _host_crls(table)
    operators = [crl for folder in context.certs for crl in load_crl_dir(folder)]
    kept = [crl for crl in operators if crl_signed_by_rsa_pss_sha384(crl, chain.ark)]
    signed = kept + [crl for crl in hosts if crl_signed_by_rsa_pss_sha384(crl, chain.ark)]
    offered = f"{len(hosts + operators)} offered, none signed by it" if hosts or operators else \
        "none from the host or the --certs folders"
    product = _product_of(ark, "ARK-")
    if context.kds_url is not None and product is not None and not kept:
        try:
            signed += [crl for crl in [fetch_crl(kind, product, chain.ark, context)] if crl is not None]
            offered += ", none from AMD KDS"
        except EvidenceError as exc:
            offered += f"; {exc}"
    if not signed:
        checks.skipped("crl", f"no CRL of {ark} ({offered}): revocation not checked")
        return
    named = f"{subject_cn(inter)} (serial {inter.serial_number})"
    for crl in signed:
        if crl.get_revoked_certificate_by_serial_number(inter.serial_number) is not None:
            checks.failed("crl", f"{named} is revoked: it is on the CRL {ark} issued {crl.last_update_utc:%Y-%m-%d}")
    newest = max(signed, key=lambda crl: crl.last_update_utc)
    due = newest.next_update_utc
    late = f" (its next update was due {due:%Y-%m-%d})" if due is not None and due < context.at else ""
    checks.passed("crl", f"{named} is not on the CRL {ark} issued {newest.last_update_utc:%Y-%m-%d}{late}")


def _mismatch(vek: x509.Certificate, report: Report, kind: str) -> tuple[bool, bool]:
    """How ``vek`` fails to be the one that signed ``report``: another chip, another TCB (the chosen
    VEK's extensions are checked in full later; one that cannot be read matches nothing)."""
    try:
        other_chip = kind == "vcek" and vek_hwid(vek) != report.significant_chip_id
        tcb = report.reported_tcb.as_dict()
        return other_chip, any(vek_spl(vek, part) != value for part, value in tcb.items())
    except EvidenceError:
        return True, True


def _signs(vek: x509.Certificate, report: Report) -> bool:
    """``vek``'s key verifies the report's signature."""
    key = vek.public_key()
    if not is_ec_key(vek, ec.SECP384R1):
        return False
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(encode_dss_signature(report.signature_r, report.signature_s), report.raw[:SIGNED_SIZE],
                   ec.ECDSA(hashes.SHA384()))
        return True
    except InvalidSignature:
        return False


def find_chain(report: Report, certs: list[x509.Certificate], kind: str, trust: TrustStore) -> Chain | str:
    """Pick VEK, intermediate and ARK among ``certs``; a string says what is missing."""
    vek_cn = "SEV-VCEK" if kind == "vcek" else "SEV-VLEK"
    # Prefer the VEK of this chip and this TCB, all of it (a folder may hold many, and a firmware
    # update raises the SNP SPL and leaves the microcode's), then the one that signed the report
    # (VLEKs of a CSP's regions share a TCB).
    veks = [c for c in certs if subject_cn(c) == vek_cn]
    if len(veks) > 1:
        veks.sort(key=lambda c: (*_mismatch(c, report, kind), not _signs(c, report)))
    if not veks:
        return (f"no {kind.upper()} certificate: the host supplied none in auxblob and none was found "
                "in the certificate folders or AMD's KDS")
    vek = veks[0]
    # The VEK's own issuer, the one that signs it first (a host's table or a folder may hold a
    # look-alike, or an ASK AMD reissued); failing that, any AMD intermediate offered, so that
    # the signature check can say which certificate does not sign the VEK.
    intermediates = sorted((c for c in certs if names_issuer(vek, c)),
                           key=lambda c: not signed_by_rsa_pss_sha384(vek, c)) or \
        [c for c in certs if _product_of(subject_cn(c), "SEV-") or
         _product_of(subject_cn(c), "SEV-VLEK-")]
    if not intermediates:
        return f"no certificate for the VEK's issuer {issuer_cn(vek)!r}"
    intermediate = intermediates[0]
    # Among look-alike ARKs (the host fills auxblob), prefer a trusted one, and of those the one that
    # signs the intermediate (a --trust-roots anchor, such as the emulator's, may bear AMD's name).
    arks = sorted((c for c in certs if names_issuer(intermediate, c)),
                  key=lambda c: (not trust.is_trusted(c), not signed_by_rsa_pss_sha384(intermediate, c)))
    if not arks:
        return f"no ARK certificate {issuer_cn(intermediate)!r}"
    return Chain(arks[0], intermediate, vek)


def verify(evidence: Evidence, context: Context, checks: Checks, claims_out: dict[str, Any]) -> None:
    report = parse_report(evidence.outblob)
    claims_out.update(claims(report, report.cpuid_product))
    if evidence.manifestblob:
        claims_out.update(manifest_claims(evidence.manifestblob))
    checks.passed("format", f"SEV-SNP report version {report.version}, {REPORT_SIZE} bytes, reserved fields zero")
    # Before any certificate is looked for, let alone fetched: an unbound report stops here.
    if evidence.manifestblob:
        manifest = evidence.manifestblob
        check_freshness(report.report_data, evidence, context, checks, what="REPORT_DATA",
                        derive=lambda nonce: hashlib.sha512(nonce + manifest).digest(),
                        rule="SHA-512(nonce || manifest)", name="svsm_manifest_binding")
        if context.report_data is not None:
            checks.skipped("svsm_manifest_binding", "REPORT_DATA was given exactly, not the nonce: whether it "
                                                    "binds the manifest is unknown, so the manifest is no claim")
        if checks.items[-1].name == "svsm_manifest_binding" and not checks.items[-1].ok:
            for claim in [claim for claim in claims_out if claim.startswith("snp.svsm.")]:
                del claims_out[claim]  # unsigned bytes that nothing bound
    else:
        check_freshness(report.report_data, evidence, context, checks, what="REPORT_DATA")

    kind = {0: "vcek", 1: "vlek"}.get(report.signing_key)
    if kind is None:
        checks.failed("signer_consistent", f"SIGNING_KEY is {report.signing_key}: the report is not signed "
                                           "by a VCEK or VLEK")
    table = ghcb.parse(evidence.auxblob)
    certs = _candidates(table, context)
    chain = find_chain(report, certs, kind, context.trust)
    # A VCEK that cannot have signed the report (a host's table not refreshed after a TCB update)
    # is as good as none: KDS has the one that did. (A VLEK cannot be fetched.)
    stale = isinstance(chain, Chain) and kind == "vcek" and any(_mismatch(chain.vek, report, kind))
    unfetched = ""  # why KDS could not replace a stale VCEK, for the check it then fails
    if (isinstance(chain, str) or stale) and context.kds_url is not None:
        try:
            certs += fetch_chain(report, kind, context)
        except EvidenceError as exc:
            if isinstance(chain, str):
                checks.failed("certificates", f"{chain}; {exc}")
            unfetched = f"; the current one could not be fetched: {exc}"
        chain = find_chain(report, certs, kind, context.trust)
    if isinstance(chain, str):
        checks.failed("certificates", chain)
    assert isinstance(chain, Chain)
    ark, inter, vek = chain.ark, chain.intermediate, chain.vek
    ark_fp = fingerprint(ark)
    checks.require(ark_fp in context.trust.roots, "ark_pinned",
                   f"sha256 {ark_fp[:16]}... of {subject_cn(ark)} is a trusted root",
                   f"ARK {subject_cn(ark)!r} (sha256 {ark_fp}) is not a trusted AMD root")
    checks.require(signed_by_rsa_pss_sha384(ark, ark), "ark_self_signed",
                   "RSA-PSS SHA-384 salt 48", "the ARK's self-signature does not verify")
    checks.require(signed_by_rsa_pss_sha384(inter, ark), "ask_signed_by_ark",
                   f"{subject_cn(inter)} by {subject_cn(ark)} (RSA-PSS SHA-384 salt 48)",
                   f"{subject_cn(inter)} is not signed by {subject_cn(ark)}")
    checks.require(signed_by_rsa_pss_sha384(vek, inter), "vek_signed_by_ask",
                   f"{subject_cn(vek)} by {subject_cn(inter)}",
                   f"{subject_cn(vek)} is not signed by {subject_cn(inter)}")
    _check_revocation(chain, kind, table, context, checks)

    inter_cn = subject_cn(inter)
    want_prefix = "SEV-" if kind == "vcek" else "SEV-VLEK-"
    product = _product_of(inter_cn, want_prefix)
    checks.require(product is not None, "signer_consistent",
                   f"SIGNING_KEY={report.signing_key} ({kind.upper()}), intermediate {inter_cn}",
                   f"SIGNING_KEY={report.signing_key} ({kind.upper()}) needs an intermediate {want_prefix}<product>, "
                   f"got {inter_cn!r}")
    ark_product = _product_of(subject_cn(ark), "ARK-")
    name = vek_product_name(vek)
    vek_product = name.split("-")[0] if name else None
    cpuid_product = report.cpuid_product
    consistent = (ark_product == product and vek_product in (None, product)
                  and (report.cpuid is None or cpuid_product == product))
    checks.require(consistent, "product_consistent",
                   f"{product}: ARK, intermediate, VEK productName {name!r}"
                   + (f", CPUID {claims_out['snp.cpuid']}" if report.cpuid else " (v2 report: no CPUID)"),
                   f"products disagree: ARK {ark_product}, intermediate {product}, VEK productName {name!r}, "
                   f"report CPUID {cpuid_product or claims_out.get('snp.cpuid', 'n/a')}")
    claims_out["snp.product"] = product

    checks.require(is_ec_key(vek, ec.SECP384R1), "vek_key", "EC P-384", "the VEK key is not EC P-384")
    expired = [f"{subject_cn(c)} ({validity(c)})" for c in (ark, inter, vek) if not valid_at(c, context.at)]
    checks.require(not expired, "certificates_valid", f"at {context.at:%Y-%m-%dT%H:%M:%SZ}",
                   f"not valid at {context.at:%Y-%m-%dT%H:%M:%SZ}: {', '.join(expired)}")

    cert_tcb = {part: vek_spl(vek, part) for part in report.reported_tcb.as_dict()}
    checks.require(cert_tcb == report.reported_tcb.as_dict(), "tcb_matches_vek",
                   f"{kind.upper()} SPLs equal REPORTED_TCB {report.reported_tcb.as_dict()}",
                   f"{kind.upper()} SPLs {cert_tcb} differ from REPORTED_TCB {report.reported_tcb.as_dict()}"
                   f"{unfetched}")
    if kind == "vcek":
        hwid = vek_hwid(vek)
        checks.require(any(report.chip_id) and hwid == report.significant_chip_id, "chip_id_matches",
                       f"hwID {report.significant_chip_id.hex()[:16]}... equals CHIP_ID",
                       f"VCEK hwID {(hwid or b'').hex()[:16]}... does not match CHIP_ID "
                       f"{report.significant_chip_id.hex()[:16]}...{unfetched}")
    else:
        checks.require(vek_hwid(vek) is None, "chip_id_matches", "VLEK: not bound to a chip",
                       "a VLEK must not carry a hwID")

    if _signs(vek, report):
        checks.passed("report_signature", "ECDSA P-384 SHA-384 over 0x000-0x29F")
    else:
        checks.failed("report_signature", f"the report signature does not verify under the {kind.upper()}")
    checks.genuine_and_bound()  # REPORT_DATA's binding was checked first
    check_init_data(report.host_data, context, checks, what="HOST_DATA")  # a genuine guest's, on the record

"""AMD SEV / SEV-ES (pre-SNP), verified: the AEB's evidence against AMD's ARK and ASK.

Two chains meet at the PEK, which signs the report: ARK (pinned by the SHA-256 of its
certificate, self-signed) -> ASK -> CEK -> PEK, the chip's endorsement by AMD; and OCA
(self-signed) -> PEK, the platform owner's. The CA links are RSASSA-PSS (SHA-256 for
Naples' RSA-2048, SHA-384 for RSA-4096; salt = hash length), the platform links ECDSA with
the hash each signature's algorithm names. The ASK and ARK come from ``auxblob`` (AMD's
ask_ark_<product>.cert: ASK then ARK), the operator's certificate folders (``*.cert``) or
the trust-roots folders. Freshness: the report's MNONCE must be the first 16 bytes of the
nonce the guest asked the broker to use.

There is no firmware build number in the evidence, no guest data, and the host chose which
guest the firmware attested: the claims say so (``unbound``) rather than invent a binding.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ...errors import EvidenceError
from ..certs import load_files
from ..core import Checks, Context, Evidence, check_freshness
from ..trust import TrustStore
from .abi import (
    ARK,
    ASK,
    CEK,
    ECDSA_ALGOS,
    EVIDENCE_SIZE,
    OCA,
    PEK,
    PLATFORM_CERT_SIZE,
    RSA_SHA256,
    RSA_SHA384,
    CaCert,
    PlatformCert,
    SigSlot,
    algo_hash,
    parse_ca_certs,
    parse_evidence,
    usage_name,
)
from .claims import claims

CA_FILE_SUFFIX = ".cert"
#: CA certificates a guest may send in auxblob: AMD's ask_ark file holds two. Each ASK sent costs an RSA
#: verification of the CEK, with an exponent the sender chooses (up to 2048 bits: 1.3 ms each, so that a
#: megabyte of them held a worker for over a second).
SENT_MAX = 2
WHERE = "give AMD's ask_ark_<product>.cert in auxblob, in a --certs folder or in --trust-roots"


def ark_fingerprint(ark: CaCert) -> str:
    return hashlib.sha256(ark.raw).hexdigest()


def rsa_signs(signer: CaCert, body: bytes, signature: bytes) -> bool:
    """RSASSA-PSS with the signer's hash (SHA-256 for 2048-bit, SHA-384 for 4096-bit), salt = hash length."""
    h = signer.hash
    try:
        signer.public_key().verify(signature, body, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
        return True
    except (InvalidSignature, ValueError):
        return False


def ca_signs_platform(signer: CaCert, cert: PlatformCert) -> bool:
    """The ASK's signature on a CEK: the slot of usage ASK, RSA with the ASK's hash, little-endian."""
    slot = cert.signed_by(signer.usage)
    size = signer.modulus_bits // 8
    algo = RSA_SHA256 if signer.modulus_bits == 2048 else RSA_SHA384
    if slot is None or slot.algo != algo or any(slot.raw[size:]):
        return False
    return rsa_signs(signer, cert.body, slot.raw[:size][::-1])


def ecdsa_signs(signer: PlatformCert, slot: SigSlot | None, message: bytes) -> bool:
    if slot is None or slot.algo not in ECDSA_ALGOS:
        return False
    r, s = slot.ecdsa_rs()
    try:
        signer.public_key().verify(encode_dss_signature(r, s), message, ec.ECDSA(algo_hash(slot.algo)))
        return True
    except (InvalidSignature, ValueError):
        return False


def load_ca_dir(folder: Path) -> list[CaCert]:
    """The legacy CA certificates in the ``*.cert`` files of ``folder`` (platform certificates skipped)."""
    if not folder.is_dir():
        raise EvidenceError(f"certificate folder {folder} does not exist")
    # A CEK, PEK, OCA or PDH (a platform certificate's size) is skipped: the evidence carries its own.
    return load_files(folder, (CA_FILE_SUFFIX,),
                      lambda data: [] if len(data) == PLATFORM_CERT_SIZE else parse_ca_certs(data))


def parse_auxblob(auxblob: bytes) -> list[CaCert]:
    """The ASK and ARK a guest sent along (AMD's ask_ark file), if any."""
    try:
        return parse_ca_certs(auxblob, most=SENT_MAX) if auxblob else []
    except EvidenceError as exc:
        raise EvidenceError(f"auxblob is not AMD's ASK/ARK certificates: {exc}") from None


def candidates(sent: list[CaCert], context: Context) -> list[CaCert]:
    """ARKs and ASKs the guest sent, from the operator's folders and the trust-roots folders, each once."""
    certs = list(sent)
    for folder in context.certs:
        certs.extend(load_ca_dir(folder))
    for raw in context.trust.sev_certs:
        certs.extend(parse_ca_certs(raw))
    unique: dict[bytes, CaCert] = {}
    for cert in certs:
        unique.setdefault(cert.raw, cert)
    return list(unique.values())


def find_chain(cek: PlatformCert, certs: list[CaCert], trust: TrustStore) -> tuple[CaCert, CaCert] | str:
    """The ARK and ASK for this CEK among ``certs``: the ASK that signs it (or, to name in the
    failure, any ASK), and its issuer, a pinned ARK first. A string says what is missing."""
    asks = sorted((c for c in certs if c.usage == ASK), key=lambda a: not ca_signs_platform(a, cek))
    if not asks:
        return f"no AMD ASK certificate: {WHERE}"
    ask = asks[0]
    arks = sorted((c for c in certs if c.usage == ARK and c.key_id == ask.certifying_id),
                  key=lambda a: ark_fingerprint(a) not in trust.sev_arks)
    if not arks:
        return f"no AMD ARK with key id {ask.certifying_id.hex()} (the ASK's issuer): {WHERE}"
    return arks[0], ask


def verify(evidence: Evidence, context: Context, checks: Checks, claims_out: dict[str, Any]) -> None:
    parsed = parse_evidence(evidence.outblob)
    claims_out.update(claims(parsed))
    report, cek, pek, oca = parsed.report, parsed.cek, parsed.pek, parsed.oca
    sent = parse_auxblob(evidence.auxblob)
    checks.passed("format", f"SEV AEB evidence, {EVIDENCE_SIZE} bytes: report, CEK, PEK, OCA"
                            + (f"; auxblob: {', '.join(c.name for c in sent)}" if sent else ""))

    chain = find_chain(cek, candidates(sent, context), context.trust)
    if isinstance(chain, str):
        checks.failed("ark", chain)
    ark, ask = chain
    fp = ark_fingerprint(ark)
    if fp not in context.trust.sev_arks:
        checks.failed("ark", f"ARK {ark.key_id.hex()} (sha256 {fp}) is not a pinned AMD ARK; an operator's own "
                             "root must be given with --trust-roots")
    product = context.trust.sev_arks[fp]
    claims_out["sev.product"] = product
    checks.require(ark.self_issued and rsa_signs(ark, ark.body, ark.signature), "ark",
                   f"{product or 'operator root'} ARK {ark.key_id.hex()[:8]}, pinned (sha256 {fp[:16]}...), "
                   f"self-signed (RSA-{ark.modulus_bits} PSS {ark.hash.name.upper()})",
                   f"the ARK {ark.key_id.hex()}'s self-signature does not verify")
    checks.require(rsa_signs(ark, ask.body, ask.signature), "ask",
                   f"ASK {ask.key_id.hex()[:8]} signed by the ARK",
                   f"the ASK {ask.key_id.hex()} is not signed by the ARK {ark.key_id.hex()}")
    checks.require(ca_signs_platform(ask, cek), "cek", f"signed by the ASK {ask.key_id.hex()[:8]}",
                   f"the CEK is not signed by the ASK {ask.key_id.hex()}"
                   + (f" ({product})" if product else "") + ": the chip is not endorsed by that AMD root")
    checks.require(ecdsa_signs(oca, oca.signed_by(OCA), oca.body), "oca", "self-signed",
                   "the OCA's self-signature does not verify")
    by_oca = ecdsa_signs(oca, pek.signed_by(OCA), pek.body)
    by_cek = ecdsa_signs(cek, pek.signed_by(CEK), pek.body)
    missing = [name for name, ok in (("OCA", by_oca), ("CEK", by_cek)) if not ok]
    checks.require(not missing, "pek", "signed by the OCA and by the CEK",
                   f"the PEK is not signed by the {' nor the '.join(missing)} of this evidence")
    if report.sig_usage != PEK:
        checks.failed("report_signature", f"SIG_USAGE is {usage_name(report.sig_usage)}, expected PEK (0x{PEK:x})")
    if report.sig_algo != pek.algo:
        checks.failed("report_signature", f"SIG_ALGO 0x{report.sig_algo:x} is not the PEK's algorithm "
                                          f"0x{pek.algo:x}")
    sig = SigSlot(PEK, report.sig_algo, report.raw[0x40:0x40 + 144])
    checks.require(ecdsa_signs(pek, sig, report.signed), "report_signature",
                   f"by the PEK, ECDSA {algo_hash(report.sig_algo).name.upper()} over 0x00-0x33",
                   "the report signature does not verify under the PEK")
    check_freshness(report.mnonce, evidence, context, checks, what="MNONCE", derive=lambda nonce: nonce[:16],
                    rule="the first 16 bytes of the nonce", name="mnonce",
                    consequence="the broker did not use the requested MNONCE: freshness not shown")
    checks.genuine_and_bound()
    if context.init_data is not None:  # else its claims would be the requester's word alone
        checks.failed("init_data", "SEV/SEV-ES evidence has no field the host binds at launch: the init-data the "
                                   "guest presented cannot be verified")

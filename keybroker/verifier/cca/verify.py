"""Arm CCA, verified: the platform token under a trusted CPAK, the RAK binding, the realm token, the nonce.

The platform token is signed by the CCA Platform Attestation Key (CPAK), which the verifier
must already trust (none is trusted by default); the realm token by the RAK. The platform
vouches for the RAK: its challenge is the hash (realm claim 44240) of the RAK claim's bytes.
The realm challenge carries the relying party's nonce (the 32-64 inblob bytes, zero-padded
to 64).
"""

from __future__ import annotations

from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..core import Checks, Context, Evidence, check_freshness, check_init_data
from ..trust import Cpak
from .abi import COSE_ALGS, HASHES, PlatformClaims, Sign1, parse_token
from .claims import claims


def sign1_verifies(sign1: Sign1, key: ec.EllipticCurvePublicKey) -> bool:
    """COSE_Sign1 (RFC 9052) with its algorithm's curve and hash; the signature is raw r || s."""
    curve, digest, size, _ = COSE_ALGS[sign1.alg]
    if not isinstance(key.curve, curve):
        return False
    to_be_signed = cbor2.dumps(["Signature1", sign1.protected, b"", sign1.payload])
    der = encode_dss_signature(int.from_bytes(sign1.signature[:size], "big"),
                               int.from_bytes(sign1.signature[size:], "big"))
    try:
        key.verify(der, to_be_signed, ec.ECDSA(digest()))
        return True
    except InvalidSignature:
        return False


def _applicable(cpak: Cpak, platform: PlatformClaims) -> bool:
    return (cpak.implementation_id in (None, platform.implementation_id)
            and cpak.instance_id in (None, platform.instance_id))


def verify(evidence: Evidence, context: Context, checks: Checks, claims_out: dict[str, Any]) -> None:
    token = parse_token(evidence.outblob)
    claims_out.update(claims(token))
    p, r = token.platform_claims, token.realm_claims
    rak_form = "a raw point" if r.rak_claim[:1] == b"\x04" else "a COSE_Key"
    checks.passed("format", f"tag-{token.collection} collection, platform profile {p.profile}, realm profile "
                            f"{r.profile or '(none: legacy)'}, RAK as {rak_form}")

    trusted = context.trust.cpaks
    candidates = [cpak for cpak in trusted if _applicable(cpak, p)]
    if not trusted:
        checks.failed("cpak_trusted", "no CCA platform key (CPAK) is trusted: none is by default; give the "
                                      "platform's CPAK with --trust-cpak FILE or in a --trust-roots folder")
    checks.require(bool(candidates), "cpak_trusted",
                   f"{len(candidates)} trusted CPAK(s) for implementation-id {p.implementation_id.hex()[:16]}...",
                   f"none of the {len(trusted)} trusted CPAK(s) is for implementation-id "
                   f"{p.implementation_id.hex()} and instance-id {p.instance_id.hex()}")
    signer = next((cpak for cpak in candidates if sign1_verifies(token.platform, cpak.key)), None)
    source = signer.source if signer else ""
    checks.require(signer is not None, "platform_signature",
                   f"COSE_Sign1 {token.platform.alg_name} verified with the CPAK from {source}",
                   f"the platform token is not signed by any trusted CPAK ({len(candidates)} tried): "
                   "an unknown platform, or the platform claims were changed")
    binder = HASHES[r.rak_hash_algorithm](r.rak_claim).digest()
    checks.require(p.challenge == binder, "rak_binding",
                   f"platform challenge = {r.rak_hash_algorithm}(RAK claim)",
                   f"the platform challenge is not {r.rak_hash_algorithm} of the realm token's RAK: the realm "
                   "token is not the one this platform vouched for")
    checks.require(sign1_verifies(token.realm, token.rak), "realm_signature",
                   f"COSE_Sign1 {token.realm.alg_name} verified with the RAK",
                   "the realm token's signature does not verify under its RAK: the realm claims were changed")
    # The driver zero-pads a 32-63 byte inblob to the 64-byte challenge.
    check_freshness(r.challenge, evidence, context, checks, what="the realm challenge",
                    derive=lambda nonce: nonce.ljust(64, b"\0"), rule="the nonce (inblob) zero-padded to 64 bytes")
    checks.genuine_and_bound()
    check_init_data(r.personalization, context, checks, what="the realm personalization value")

"""AMD SEV / SEV-ES, appraised: parsed AEB evidence as flat claims for the release policy.

What the evidence does not say is not claimed: the ATTESTATION report carries no firmware
build number (only the PEK certificate's API major.minor), no guest data and no chip ID. The
chip is known by its CEK's key (``sev.chip_key``), the platform owner by its OCA's key.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization

from .abi import POLICY_BITS, PlatformCert, SevEvidence


def key_digest(cert: PlatformCert) -> str:
    """SHA-256 of the certificate's public key as an uncompressed SEC1 point (0x04 || X || Y)."""
    point = cert.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    return hashlib.sha256(point).hexdigest()


def claims(evidence: SevEvidence) -> dict[str, Any]:
    """The evidence as flat claims. ``unbound``: SEV evidence carries no guest data, and the host
    chose which guest handle the firmware attested, so nothing ties it to the requesting guest."""
    report, pek = evidence.report, evidence.pek
    c: dict[str, Any] = {
        "tee": "sev-es" if report.policy_bit("es") else "sev",
        "provider": "sev_aeb",
        "debug": not report.policy_bit("nodbg"),
        "measurement": report.launch_digest.hex(),
        "unbound": True,
        "sev.launch_digest": report.launch_digest.hex(),
        "sev.mnonce": report.mnonce.hex(),
        "sev.policy": report.policy,
        "sev.policy.api_major": report.policy >> 16 & 0xFF,
        "sev.policy.api_minor": report.policy >> 24 & 0xFF,
        "sev.api_major": pek.api_major,
        "sev.api_minor": pek.api_minor,
        "sev.product": None,  # set once the ARK is known
        "sev.chip_key": key_digest(evidence.cek),
        "sev.oca_key": key_digest(evidence.oca),
    }
    for name in POLICY_BITS:
        c[f"sev.policy.{name}"] = report.policy_bit(name)
    return c

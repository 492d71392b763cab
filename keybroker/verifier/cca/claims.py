"""Arm CCA, appraised: a parsed token as flat claims for the release policy.

``debug`` is true when the platform's security lifecycle is outside the secured range.
"""

from __future__ import annotations

from typing import Any

from .abi import Token

LIFECYCLE_STATES = {0x0: "unknown", 0x1: "assembly_and_test", 0x2: "psa_rot_provisioning", 0x3: "secured",
                    0x4: "non_psa_rot_debug", 0x5: "recoverable_psa_rot_debug", 0x6: "decommissioned"}
SECURED = range(0x3000, 0x3100)


def claims(token: Token) -> dict[str, Any]:
    p, r = token.platform_claims, token.realm_claims
    c: dict[str, Any] = {
        "tee": "cca", "provider": "arm_cca_guest",
        "debug": p.lifecycle not in SECURED,
        "measurement": r.rim.hex(),
        "cca.profile": p.profile,
        "cca.realm_challenge": r.challenge.hex(),
        "cca.rim": r.rim.hex(),
        "cca.personalization": r.personalization.hex(),
        "cca.hash_algorithm": r.hash_algorithm,
        "cca.rak_hash_algorithm": r.rak_hash_algorithm,
        "cca.platform.challenge": p.challenge.hex(),
        "cca.platform.lifecycle": p.lifecycle,
        "cca.platform.lifecycle_state": LIFECYCLE_STATES.get(p.lifecycle >> 12, "invalid"),
        "cca.platform.implementation_id": p.implementation_id.hex(),
        "cca.platform.instance_id": p.instance_id.hex(),
        "cca.platform.config": p.config.hex(),
        "cca.platform.sw_components": [sw.as_dict() for sw in p.sw_components],
        "cca.platform.hash_algorithm": p.hash_algorithm,
    }
    for i, rem in enumerate(r.rems):
        c[f"cca.rem{i}"] = rem.hex()
    if r.profile is not None:
        c["cca.realm_profile"] = r.profile
    if p.verification_service is not None:
        c["cca.platform.verification_service"] = p.verification_service
    return c

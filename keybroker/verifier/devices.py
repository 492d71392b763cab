"""Device evidence (Trustee's ``additional_evidence``): appraised where keybroker can, named where not.

A guest-components guest with an attached device (a GPU, Trustee's ``sampledevice``) sends
the device's evidence as a JSON map from TEE name to evidence, and binds that map into its
primary evidence's REPORT_DATA, so a verified primary evidence vouches that the guest sent
exactly this map. Each device's own evidence binds ``SHA-384(JCS({"nonce", "tee-pubkey"}))``.

Claims, for the release policy:

* ``devices``: the names present;
* ``device.<name>.verified``: keybroker checked this device's evidence and its binding
  (False: keybroker has no verifier for it; the policy decides what that is worth);
* for Trustee's sample device, ``device.sampledevice.svn`` and ``device.sampledevice.sample``
  (always true): no hardware vouches for a sample device; anyone can make one, so a policy
  that must not rely on it requires ``{"claim": "device.sampledevice.sample", "exists": false}``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ..errors import EvidenceError
from ..wire.rcar import device_report_data

SVN_MAX = 64


def appraise(devices: dict[str, Any], nonce: str, tee_pubkey: dict[str, str]) -> dict[str, Any]:
    """The claims of the device evidence ``devices`` of the session of ``nonce`` and ``tee_pubkey``;
    EvidenceError when one we can check is not bound to them."""
    claims: dict[str, Any] = {"devices": sorted(devices)}
    for name, evidence in devices.items():
        if name == "sampledevice":
            claims |= _sample_device(evidence, device_report_data(nonce, tee_pubkey))
        else:
            claims[f"device.{name}.verified"] = False
    return claims


def _sample_device(evidence: Any, binding: bytes) -> dict[str, Any]:
    """Trustee's sample device: ``{"svn": str, "report_data": base64}``, bound as Trustee checks it."""
    if not isinstance(evidence, dict) or not isinstance(evidence.get("svn"), str) \
            or not isinstance(evidence.get("report_data", ""), str) or len(evidence["svn"]) > SVN_MAX:
        raise EvidenceError(f"sampledevice evidence must be {{\"svn\": string of at most {SVN_MAX} characters, "
                            "\"report_data\": base64}")
    try:
        report_data = base64.b64decode(evidence.get("report_data", ""), validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError("sampledevice report_data is not base64") from None
    if report_data != binding:
        raise EvidenceError("sampledevice report_data is not SHA-384 of this session's nonce and tee-pubkey")
    return {"device.sampledevice.verified": True, "device.sampledevice.sample": True,
            "device.sampledevice.svn": evidence["svn"]}

"""KBS RCAR protocol 0.4.0 (Trustee): wire records, the REPORT_DATA binding, errors.

The contract shared by the guest client and the key server::

    POST /kbs/v0/auth      {"version": "0.4.0", "tee": "snp", "extra-params": {}}
                           -> {"nonce": "<base64>", "extra-params": ""} + cookie kbs-session-id
    POST /kbs/v0/attest    {"runtime-data": {"nonce": N, "tee-pubkey": JWK},
                            "tee-evidence": {"primary_evidence": <envelope>, "additional_evidence": ""}}
                           -> {"token": "<JWT>"}
    GET  /kbs/v0/resource/<repo>/<type>/<tag>
                           -> JWE (flattened JSON; ECDH-ES+A256KW / A256GCM) to the tee-pubkey

REPORT_DATA binds the challenge nonce and the tee-pubkey: the first 48 bytes of the
64-byte inblob are SHA-384 of the RFC 8785 canonical JSON of
``{"additional-evidence": "", "nonce": N, "tee-pubkey": JWK}``, the rest are zero.
keybroker's primary evidence is the Linux evidence envelope (``keybroker.wire.envelope``).
Errors are RFC 7807 bodies ``{"type": …, "detail": …}`` whose type names the problem.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import rfc8785

from ..errors import ProtocolError
from . import shown_names

VERSION = "0.4.0"
SESSION_COOKIE = "kbs-session-id"
#: keybroker's answer headers on a released resource: the lease in seconds (the key's expiry
#: in the guest's keyring) and the hash of the release's audit record.
LEASE_HEADER = "Keybroker-Lease"
AUDIT_HEADER = "Keybroker-Audit"
PREFIX = "/kbs/v0"
TEE_BY_PROVIDER = {"sev_guest": "snp", "tdx_guest": "tdx", "arm_cca_guest": "cca"}
PROVIDER_BY_TEE = {tee: provider for provider, tee in TEE_BY_PROVIDER.items()}
KEY_ALGORITHM = "ECDH-ES+A256KW"
CONTENT_ENCRYPTION = "A256GCM"
INBLOB_SIZE = 64
NONCE_MAX = 128
#: Request bodies a key server reads at most (real evidence is a few KiB; TDX quotes
#: with large certification data and SNP certificate tables stay far below this).
BODY_MAX = 1024 * 1024

# RFC 7807 problem types.
ERROR_TYPE = "urn:keybroker:error:"
BAD_REQUEST = "BadRequest"
PROTOCOL_VERSION = "ProtocolVersion"
UNKNOWN_SESSION = "UnknownSession"
NOT_ATTESTED = "NotAttested"
ATTESTATION_DENIED = "AttestationDenied"
POLICY_DENIED = "PolicyDenied"
RESOURCE_NOT_FOUND = "ResourceNotFound"
PAYLOAD_TOO_LARGE = "PayloadTooLarge"
TOO_MANY_REQUESTS = "TooManyRequests"
UNAUTHORIZED = "Unauthorized"
INTERNAL = "InternalError"
STATUS = {BAD_REQUEST: 400, PROTOCOL_VERSION: 400, UNKNOWN_SESSION: 401, NOT_ATTESTED: 401,
          UNAUTHORIZED: 401, ATTESTATION_DENIED: 403, POLICY_DENIED: 403, RESOURCE_NOT_FOUND: 404,
          PAYLOAD_TOO_LARGE: 413, TOO_MANY_REQUESTS: 429, INTERNAL: 500}

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_EC_SIZES = {"P-256": 32, "P-384": 48, "P-521": 66}


def problem(name: str, detail: str) -> dict[str, str]:
    return {"type": ERROR_TYPE + name, "detail": detail}


def problem_name(body: Any) -> str | None:
    """The problem name of an RFC 7807 body, or None when it is not one of ours."""
    kind = body.get("type") if isinstance(body, dict) else None
    if isinstance(kind, str) and kind.startswith(ERROR_TYPE):
        return kind[len(ERROR_TYPE):]
    return None


@dataclass(frozen=True)
class AuthRequest:
    tee: str
    version: str = VERSION

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "tee": self.tee, "extra-params": {}}

    @classmethod
    def from_json(cls, obj: Any) -> AuthRequest:
        _object(obj, "auth request", required=("version", "tee"), optional=("extra-params",))
        version, tee = obj["version"], obj["tee"]
        if not isinstance(version, str) or not isinstance(tee, str):
            raise ProtocolError("'version' and 'tee' must be strings")
        return cls(tee=tee, version=version)


@dataclass(frozen=True)
class Challenge:
    nonce: str

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "extra-params": ""}

    @classmethod
    def from_json(cls, obj: Any) -> Challenge:
        _object(obj, "challenge", required=("nonce",), optional=("extra-params",))
        nonce = obj["nonce"]
        if not isinstance(nonce, str) or not 1 <= len(nonce) <= NONCE_MAX:
            raise ProtocolError(f"challenge nonce must be a string of 1-{NONCE_MAX} characters")
        return cls(nonce)


@dataclass(frozen=True)
class Attestation:
    nonce: str
    tee_pubkey: dict[str, str]
    primary_evidence: Any
    additional_evidence: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"runtime-data": {"nonce": self.nonce, "tee-pubkey": self.tee_pubkey},
                "tee-evidence": {"primary_evidence": self.primary_evidence,
                                 "additional_evidence": self.additional_evidence}}

    @classmethod
    def from_json(cls, obj: Any) -> Attestation:
        _object(obj, "attestation", required=("runtime-data", "tee-evidence"), optional=("init-data",))
        runtime, evidence = obj["runtime-data"], obj["tee-evidence"]
        _object(runtime, "runtime-data", required=("nonce", "tee-pubkey"))
        _object(evidence, "tee-evidence", required=("primary_evidence",), optional=("additional_evidence",))
        nonce = runtime["nonce"]
        if not isinstance(nonce, str) or not 1 <= len(nonce) <= NONCE_MAX:
            raise ProtocolError(f"runtime-data nonce must be a string of 1-{NONCE_MAX} characters")
        additional = evidence.get("additional_evidence", "")
        if additional != "":
            raise ProtocolError("additional_evidence (device evidence) is not supported; send \"\"")
        return cls(nonce, check_tee_pubkey(runtime["tee-pubkey"]), evidence["primary_evidence"])


def check_tee_pubkey(jwk: Any) -> dict[str, str]:
    """An EC public JWK for ECDH-ES+A256KW (P-256, P-384 or P-521): its shape, and a point on its curve.

    Checked when the key arrives, so that nothing later (the JWE to it) meets a key it cannot use.
    """
    _object(jwk, "tee-pubkey", required=("kty", "crv", "x", "y"), optional=("alg", "kid", "use"))
    if not all(isinstance(v, str) for v in jwk.values()):
        raise ProtocolError("tee-pubkey members must be strings")
    if jwk["kty"] != "EC" or jwk["crv"] not in _EC_SIZES:
        raise ProtocolError("tee-pubkey must be an EC key on P-256, P-384 or P-521")
    if jwk.get("alg", KEY_ALGORITHM) != KEY_ALGORITHM:
        raise ProtocolError(f"tee-pubkey algorithm must be {KEY_ALGORITHM}")
    for coord in ("x", "y"):
        value = _b64url_decode(jwk[coord])
        if value is None or len(value) != _EC_SIZES[jwk["crv"]]:
            raise ProtocolError(f"tee-pubkey '{coord}' is not a base64url {jwk['crv']} coordinate")
    from .jwe import public_key  # here: the guest's start need not load the X.509 and EC stack

    try:
        public_key(jwk)
    except ProtocolError as exc:
        raise ProtocolError(f"tee-pubkey: {exc}") from None
    return dict(jwk)


def report_data(nonce: str, tee_pubkey: dict[str, str], additional_evidence: str = "") -> bytes:
    """The 64-byte inblob that binds ``nonce`` and ``tee_pubkey``: SHA-384(JCS(...)) || zeros."""
    material = rfc8785.dumps({"additional-evidence": additional_evidence, "nonce": nonce,
                              "tee-pubkey": tee_pubkey})
    return hashlib.sha384(material).digest().ljust(INBLOB_SIZE, b"\0")


def _b64url_decode(text: str) -> bytes | None:
    """Unpadded base64url, strictly; None when ``text`` is not that."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _object(obj: Any, what: str, *, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ProtocolError(f"{what} is missing {', '.join(repr(k) for k in missing)}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise ProtocolError(f"{what} has unknown member(s) {shown_names(unknown)}")

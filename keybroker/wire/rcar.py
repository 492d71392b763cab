"""KBS RCAR protocol 0.4.0 (Trustee): wire records, the REPORT_DATA binding, errors.

The contract shared by the guest client and the key server, and with Trustee's KBS and
guest-components' ``kbs_protocol``::

    POST /kbs/v0/auth      {"version": "0.4.0", "tee": "snp", "extra-params": {...}}
                           -> {"nonce": "<base64>", "extra-params": ...} + cookie kbs-session-id
    POST /kbs/v0/attest    {"runtime-data": {"nonce": N, "tee-pubkey": JWK},
                            "tee-evidence": {"primary_evidence": E, "additional_evidence": A},
                            "init-data": null | {"format": "toml", "body": "..."}}
                           -> {"token": "<JWT>"}
    GET  /kbs/v0/resource/<repo>/<type>/<tag>
                           -> JWE (flattened JSON) to the tee-pubkey

REPORT_DATA binds the challenge nonce, the tee-pubkey and the device evidence: the 64-byte
inblob is a hash of the RFC 8785 canonical JSON of ``{"additional-evidence": A, "nonce": N,
"tee-pubkey": JWK}``, zero-padded. The hash is SHA-384 unless the Challenge's ``extra-params``
names another with ``"selected-hash-algorithm"`` (Trustee does for IBM SE, and for TDX when it
appraises through Intel Trust Authority: SHA-512), from the ``"supported-hash-algorithms"`` the
Request offered, as guest-components negotiates it. Device evidence binds ``{"nonce": N,
"tee-pubkey": JWK}`` with SHA-384, unpadded.

The evidence ``E`` is keybroker's Linux evidence envelope when both sides are keybroker's:
the client asks for it with ``"keybroker-evidence": "envelope"`` in the Request's
``extra-params`` and a keybroker server says yes with the same member in the Challenge's.
Any other server (Trustee's) gets Trustee's per-TEE form (``keybroker.wire.trustee``).
Records are read as Trustee's serde types read them: unknown members are ignored, missing
or mistyped ones refused. Errors are RFC 7807 bodies ``{"type": …, "detail": …}`` (the
``ErrorInformation`` guest-components reads) whose type names the problem.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import rfc8785

from ..errors import ProtocolError
from . import b64url_decode, shown

VERSION = "0.4.0"
#: What Trustee's ``=0.4.0`` semver requirement accepts: 0.4.0, with build metadata or not.
_VERSION_ACCEPTED = re.compile(r"0\.4\.0(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?")
#: The extra-params member by which a keybroker client and server agree on the envelope.
EVIDENCE_PARAM = "keybroker-evidence"
ENVELOPE = "envelope"
#: The binding's hash: what the Request offers (kbs-types' names), what the Challenge may select.
HASHES_PARAM = "supported-hash-algorithms"
SELECTED_HASH_PARAM = "selected-hash-algorithm"
HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
DEFAULT_HASH = "sha384"
SESSION_COOKIE = "kbs-session-id"
#: keybroker's answer headers on a released resource: the lease in seconds (the key's expiry
#: in the guest's keyring) and the hash of the release's audit record.
LEASE_HEADER = "Keybroker-Lease"
AUDIT_HEADER = "Keybroker-Audit"
PREFIX = "/kbs/v0"
TEE_BY_PROVIDER = {"sev_guest": "snp", "tdx_guest": "tdx", "arm_cca_guest": "cca", "sev_aeb": "sev"}
PROVIDER_BY_TEE = {tee: provider for provider, tee in TEE_BY_PROVIDER.items()}
KEY_ALGORITHM = "ECDH-ES+A256KW"
RSA_ALGORITHM = "RSA-OAEP-256"
RSA_BITS = (2048, 8192)
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
HEADERS_TOO_LARGE = "HeadersTooLarge"
TOO_MANY_REQUESTS = "TooManyRequests"
UNAUTHORIZED = "Unauthorized"
INTERNAL = "InternalError"
UNAVAILABLE = "Unavailable"
NOT_FOUND = "NotFound"  # no such endpoint
METHOD_NOT_ALLOWED = "MethodNotAllowed"
#: Refusals of attestation and release are 401, as guest-components reads an error body only then.
STATUS = {BAD_REQUEST: 400, PROTOCOL_VERSION: 400, UNKNOWN_SESSION: 401, NOT_ATTESTED: 401,
          UNAUTHORIZED: 401, ATTESTATION_DENIED: 401, POLICY_DENIED: 401, RESOURCE_NOT_FOUND: 404,
          PAYLOAD_TOO_LARGE: 413, TOO_MANY_REQUESTS: 429, HEADERS_TOO_LARGE: 431, INTERNAL: 500,
          UNAVAILABLE: 503, NOT_FOUND: 404, METHOD_NOT_ALLOWED: 405}
#: Trustee's error types (``…/kbs/errors/<Variant>``) and what they mean in keybroker's terms.
TRUSTEE_ERROR_TYPE = "https://github.com/confidential-containers/kbs/errors/"
_TRUSTEE_ERRORS = {"AttestationError": ATTESTATION_DENIED, "PolicyDeny": POLICY_DENIED,
                   "TokenNotFound": NOT_ATTESTED, "TokenVerifierError": NOT_ATTESTED,
                   "InvalidRequestPath": BAD_REQUEST, "PluginNotFound": RESOURCE_NOT_FOUND}

_TEE_KEY_MEMBERS = {"EC": ("crv", "alg", "x", "y"), "RSA": ("alg", "n", "e")}
_EC_SIZES = {"P-256": 32, "P-384": 48, "P-521": 66}


def problem(name: str, detail: str) -> dict[str, str]:
    return {"type": ERROR_TYPE + name, "detail": detail}


def problem_name(body: Any) -> str | None:
    """The problem name of an error body (keybroker's, or Trustee's in keybroker's terms), else None."""
    kind = body.get("type") if isinstance(body, dict) else None
    if isinstance(kind, str) and kind.startswith(ERROR_TYPE):
        return kind[len(ERROR_TYPE):]
    if isinstance(kind, str) and kind.startswith(TRUSTEE_ERROR_TYPE):
        return _TRUSTEE_ERRORS.get(kind[len(TRUSTEE_ERROR_TYPE):])
    return None


def version_accepted(version: str) -> bool:
    return bool(_VERSION_ACCEPTED.fullmatch(version))


@dataclass(frozen=True)
class AuthRequest:
    tee: str
    version: str = VERSION
    envelope: bool = True  # the client reads keybroker's envelope form

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {HASHES_PARAM: list(HASHES)}
        if self.envelope:
            extra[EVIDENCE_PARAM] = ENVELOPE
        return {"version": self.version, "tee": self.tee, "extra-params": extra}

    @classmethod
    def from_json(cls, obj: Any) -> AuthRequest:
        _object(obj, "auth request", required=("version", "tee", "extra-params"))
        version, tee = obj["version"], obj["tee"]
        if not isinstance(version, str) or not isinstance(tee, str):
            raise ProtocolError("'version' and 'tee' must be strings")
        return cls(tee=tee, version=version, envelope=_asks_envelope(obj["extra-params"]))


@dataclass(frozen=True)
class Challenge:
    nonce: str
    envelope: bool = False  # the server reads keybroker's envelope (else: Trustee's evidence forms)
    hash_algorithm: str = DEFAULT_HASH  # the binding's hash, one of HASHES

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "extra-params": {EVIDENCE_PARAM: ENVELOPE} if self.envelope else ""}

    @classmethod
    def from_json(cls, obj: Any) -> Challenge:
        _object(obj, "challenge", required=("nonce",))
        nonce, extra = obj["nonce"], obj.get("extra-params")
        if not isinstance(nonce, str) or not 1 <= len(nonce) <= NONCE_MAX:
            raise ProtocolError(f"challenge nonce must be a string of 1-{NONCE_MAX} characters")
        selected = extra.get(SELECTED_HASH_PARAM, DEFAULT_HASH) if isinstance(extra, dict) else DEFAULT_HASH
        if not isinstance(selected, str) or selected.lower() not in HASHES:
            raise ProtocolError(f"the challenge selects the hash algorithm {shown(selected)}, not one of "
                                f"{', '.join(HASHES)} (what the request offered)")
        return cls(nonce, _asks_envelope(extra), selected.lower())


def _asks_envelope(extra_params: Any) -> bool:
    return isinstance(extra_params, dict) and extra_params.get(EVIDENCE_PARAM) == ENVELOPE


@dataclass(frozen=True)
class Attestation:
    nonce: str
    tee_pubkey: dict[str, str]  # as Trustee's TeePubKey reads it (the form the binding hashes)
    primary_evidence: Any
    additional_evidence: str = ""
    init_data: Any = None  # {"format": "toml", "body": ...} when the guest sent init-data

    def to_json(self) -> dict[str, Any]:
        return {"runtime-data": {"nonce": self.nonce, "tee-pubkey": self.tee_pubkey},
                "tee-evidence": {"primary_evidence": self.primary_evidence,
                                 "additional_evidence": self.additional_evidence},
                "init-data": self.init_data}

    @classmethod
    def from_json(cls, obj: Any) -> Attestation:
        _object(obj, "attestation", required=("runtime-data", "tee-evidence"))
        runtime, evidence = obj["runtime-data"], obj["tee-evidence"]
        _object(runtime, "runtime-data", required=("nonce", "tee-pubkey"))
        _object(evidence, "tee-evidence", required=("primary_evidence", "additional_evidence"))
        nonce, additional = runtime["nonce"], evidence["additional_evidence"]
        if not isinstance(nonce, str) or not 1 <= len(nonce) <= NONCE_MAX:
            raise ProtocolError(f"runtime-data nonce must be a string of 1-{NONCE_MAX} characters")
        if not isinstance(additional, str):
            raise ProtocolError("additional_evidence must be a string (\"\" or a JSON object of device evidence)")
        return cls(nonce, check_tee_pubkey(runtime["tee-pubkey"]), evidence["primary_evidence"], additional,
                   obj.get("init-data"))


def check_tee_pubkey(jwk: Any) -> dict[str, str]:
    """The tee-pubkey as Trustee's ``TeePubKey`` reads it, checked usable for the JWE to it.

    EC: ``{"kty": "EC", "crv", "alg": "ECDH-ES+A256KW", "x", "y"}`` on P-256, P-384 or P-521,
    a point on its curve. RSA: ``{"kty": "RSA", "alg": "RSA-OAEP-256", "n", "e"}``, 2048 to
    8192 bits. Returns exactly those members: what the binding hashes, as Trustee does.
    """
    if not isinstance(jwk, dict):
        raise ProtocolError("tee-pubkey must be a JSON object")
    kty = jwk.get("kty")
    members = _TEE_KEY_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ProtocolError(f"tee-pubkey kty must be \"EC\" or \"RSA\", not {shown(kty)}")
    _object(jwk, "tee-pubkey", required=members)
    key = {"kty": kty, **{name: jwk[name] for name in members}}
    if not all(isinstance(value, str) for value in key.values()):
        raise ProtocolError("tee-pubkey members must be strings")
    if kty == "EC":
        if key["alg"] != KEY_ALGORITHM or key["crv"] not in _EC_SIZES:
            raise ProtocolError(f"an EC tee-pubkey must be {KEY_ALGORITHM} on P-256, P-384 or P-521")
        for coord in ("x", "y"):
            value = _b64url_decode(key[coord])
            if value is None or len(value) != _EC_SIZES[key["crv"]]:
                raise ProtocolError(f"tee-pubkey '{coord}' is not a base64url {key['crv']} coordinate")
    else:
        if key["alg"] != RSA_ALGORITHM:
            raise ProtocolError(f"an RSA tee-pubkey must be {RSA_ALGORITHM} (RSA1_5, PKCS#1 v1.5, is refused: "
                                "it invites padding-oracle attacks)")
        n, e = _b64url_decode(key["n"]), _b64url_decode(key["e"])
        if n is None or e is None or not RSA_BITS[0] <= int.from_bytes(n, "big").bit_length() <= RSA_BITS[1] \
                or len(e) > 8:
            raise ProtocolError(f"tee-pubkey 'n' and 'e' must be a base64url RSA modulus of {RSA_BITS[0]}-"
                                f"{RSA_BITS[1]} bits and a public exponent")
    from .jwe import recipient_key  # here: the guest's start need not load the X.509 and EC stack

    try:
        recipient_key(key)
    except ProtocolError as exc:
        raise ProtocolError(f"tee-pubkey: {exc}") from None
    return key


def report_data(nonce: str, tee_pubkey: dict[str, str], additional_evidence: str = "",
                hash_algorithm: str = DEFAULT_HASH) -> bytes:
    """The 64-byte inblob that binds ``nonce``, ``tee_pubkey`` and the device evidence: HASH(JCS(...)) || zeros."""
    material = rfc8785.dumps({"additional-evidence": additional_evidence, "nonce": nonce,
                              "tee-pubkey": tee_pubkey})
    return HASHES[hash_algorithm](material).digest().ljust(INBLOB_SIZE, b"\0")


def device_report_data(nonce: str, tee_pubkey: dict[str, str]) -> bytes:
    """What device evidence binds: SHA-384(JCS({"nonce", "tee-pubkey"})), 48 bytes."""
    return hashlib.sha384(rfc8785.dumps({"nonce": nonce, "tee-pubkey": tee_pubkey})).digest()


def _b64url_decode(text: str) -> bytes | None:
    """Unpadded canonical base64url of at least one byte; None when ``text`` is not that."""
    return b64url_decode(text) or None


def _object(obj: Any, what: str, *, required: tuple[str, ...]) -> None:
    """A JSON object with the ``required`` members (others are ignored, as serde does)."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ProtocolError(f"{what} is missing {', '.join(repr(k) for k in missing)}")

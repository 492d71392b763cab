"""Build Arm CCA attestation tokens to the spec (tdx.md section 10) for tests.

Independent of keybroker's emulator: both collection forms (tag 399, tag 907), both
profiles, the RAK as a raw SEC1 point or a COSE_Key, ES256/ES384/ES512 signatures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

LEGACY_PLATFORM = "http://arm.com/CCA-SSD/1.0.0"
PLATFORM = "tag:arm.com,2023:cca_platform#1.0.0"
REALM = "tag:arm.com,2023:realm#1.0.0"
ALGS = {ec.SECP256R1: (-7, hashes.SHA256, 32), ec.SECP384R1: (-35, hashes.SHA384, 48),
        ec.SECP521R1: (-36, hashes.SHA512, 66)}
COSE_CRV = {ec.SECP256R1: 1, ec.SECP384R1: 2, ec.SECP521R1: 3}
IMPLEMENTATION_ID = bytes(range(32))
INSTANCE_ID = b"\x01" + bytes(range(32, 64))


def sign1(key: ec.EllipticCurvePrivateKey, payload: bytes, header: dict | None = None) -> bytes:
    alg, digest, size = ALGS[type(key.curve)]
    protected = cbor2.dumps({1: alg, **(header or {})})
    r, s = decode_dss_signature(key.sign(cbor2.dumps(["Signature1", protected, b"", payload]), ec.ECDSA(digest())))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, r.to_bytes(size, "big") + s.to_bytes(size, "big")]))


def rak_claim(key: ec.EllipticCurvePrivateKey, form: str) -> bytes:
    numbers = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    x, y = numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
    if form == "raw":
        return b"\x04" + x + y
    return cbor2.dumps({1: 2, -1: COSE_CRV[type(key.curve)], -2: x, -3: y})


@dataclass
class Cca:
    """A platform and a realm; ``token()`` signs what the fields say."""

    cpak: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    rak: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    challenge: bytes = bytes(range(64))
    platform_profile: str = PLATFORM
    realm_profile: str | None = REALM
    rak_form: str = "cose"
    rak_hash: str = "sha-256"
    lifecycle: int = 0x3000
    rim: bytes = field(default_factory=lambda: hashlib.sha256(b"rim").digest())
    measurement: bytes = field(default_factory=lambda: hashlib.sha256(b"rmm").digest())
    personalization: bytes = bytes(64)  # what the host set at the realm's creation: its init-data digest
    collection: int = 399
    binder: bytes | None = None  # the platform challenge; default: the hash of the RAK claim
    realm_header: dict = field(default_factory=dict)  # more protected header parameters of the realm token

    def realm_claims(self) -> dict:
        claims = {10: self.challenge, 44235: self.personalization, 44236: "sha-256", 44238: self.rim,
                  44239: [hashlib.sha256(b"rem%d" % i).digest() for i in range(4)],
                  44237: rak_claim(self.rak, self.rak_form), 44240: self.rak_hash}
        if self.realm_profile:
            claims[265] = self.realm_profile
        return claims

    def platform_claims(self, rak: bytes) -> dict:
        binder = self.binder or hashlib.new(self.rak_hash.replace("-", ""), rak).digest()
        return {265: self.platform_profile, 10: binder,
                2396: IMPLEMENTATION_ID, 256: INSTANCE_ID, 2401: b"\xcf" * 4, 2395: self.lifecycle,
                2399: [{1: "RMM", 2: self.measurement, 4: "1.0.0", 5: bytes(32), 6: "sha-256"}], 2402: "sha-256",
                2400: "https://veraison.example/verification"}

    def token(self) -> bytes:
        realm = self.realm_claims()
        platform = sign1(self.cpak, cbor2.dumps(self.platform_claims(realm[44237])))
        realm_token = sign1(self.rak, cbor2.dumps(realm), self.realm_header)
        if self.collection == 907:
            return cbor2.dumps(cbor2.CBORTag(907, {44234: [263, platform], 44241: [263, realm_token]}))
        return cbor2.dumps(cbor2.CBORTag(399, {44234: platform, 44241: realm_token}))

"""Arm CCA, parsed: the attestation token's collection, its two COSE_Sign1 messages and their claims.

Structure (RMM spec DEN0137 A7, draft-ffm-rats-cca-token, tdx.md section 10): a collection,
either the legacy EAT collection ``#6.399({44234: platform, 44241: realm})`` or the CMW
collection ``#6.907({44234: [content-format, platform], 44241: [..., realm]})``, of two
COSE_Sign1 messages: the platform token (signed by the CCA Platform Attestation Key) and the
realm token (signed by the Realm Attestation Key, whose public part is realm claim 44237: a
raw SEC1 point in legacy tokens, a COSE_Key in RMM 1.0 tokens). Every claim the appraisal
uses is checked for its type and size here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ...errors import EvidenceError

TOKEN_MAX = 256 * 1024
TAG_EAT_COLLECTION, TAG_CMW_COLLECTION, TAG_COSE_SIGN1 = 399, 907, 18
PLATFORM_TOKEN, REALM_TOKEN = 44234, 44241
NESTING_MAX = 64  # a CCA token nests 5 deep
COSE_CRIT = 2  # the protected header parameter listing those a verifier must understand (RFC 9052)
PLATFORM_PROFILES = ("http://arm.com/CCA-SSD/1.0.0", "tag:arm.com,2023:cca_platform#1.0.0",
                     "tag:arm.com,2024:cca_platform#2.0.0")
REALM_PROFILES = ("tag:arm.com,2023:realm#1.0.0", "tag:arm.com,2024:realm#2.0.0")
HASHES = {"sha-256": hashlib.sha256, "sha-384": hashlib.sha384, "sha-512": hashlib.sha512}


#: COSE algorithm -> (curve, hash, coordinate size)
COSE_ALGS: dict[int, tuple[type[ec.EllipticCurve], type[hashes.HashAlgorithm], int, str]] = {
    -7: (ec.SECP256R1, hashes.SHA256, 32, "ES256"), -35: (ec.SECP384R1, hashes.SHA384, 48, "ES384"),
    -36: (ec.SECP521R1, hashes.SHA512, 66, "ES512")}


#: COSE EC2 curve -> (curve, coordinate size)
COSE_CURVES: dict[int, tuple[Callable[[], ec.EllipticCurve], int]] = {
    1: (ec.SECP256R1, 32), 2: (ec.SECP384R1, 48), 3: (ec.SECP521R1, 66)}


SEC1_SIZES: dict[int, Callable[[], ec.EllipticCurve]] = {65: ec.SECP256R1, 97: ec.SECP384R1, 133: ec.SECP521R1}


@dataclass(frozen=True)
class Sign1:
    protected: bytes
    alg: int
    payload: bytes
    signature: bytes

    @property
    def alg_name(self) -> str:
        return COSE_ALGS[self.alg][3]


@dataclass(frozen=True)
class SwComponent:
    measurement: bytes
    type: str | None
    version: str | None
    signer_id: bytes | None
    hash_algorithm: str | None

    def as_dict(self) -> dict[str, str]:
        out = {"type": self.type, "measurement": self.measurement.hex(), "version": self.version,
               "signer_id": self.signer_id.hex() if self.signer_id is not None else None,
               "hash_algorithm": self.hash_algorithm}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class PlatformClaims:
    profile: str
    challenge: bytes
    implementation_id: bytes
    instance_id: bytes
    config: bytes
    lifecycle: int
    sw_components: tuple[SwComponent, ...]
    verification_service: str | None
    hash_algorithm: str


@dataclass(frozen=True)
class RealmClaims:
    profile: str | None
    challenge: bytes
    personalization: bytes
    hash_algorithm: str
    rim: bytes
    rems: tuple[bytes, ...]
    rak_claim: bytes  # the RAK as encoded in the token: what the platform challenge hashes
    rak_hash_algorithm: str


@dataclass(frozen=True)
class Token:
    collection: int  # the CBOR tag: 399 or 907
    platform: Sign1
    realm: Sign1
    platform_claims: PlatformClaims
    realm_claims: RealmClaims
    rak: ec.EllipticCurvePublicKey


class _Refused(Exception):
    """A tag cbor2 would interpret, refused while decoding."""


def _refuse_tag(decoder: cbor2.CBORDecoder, *_: Any) -> Any:
    raise _Refused("a CCA token uses no standard CBOR tag but bignums (2, 3), so none other is interpreted")


#: What cbor2 would make of these tags costs more than their bytes: a reference (25, 28, 29, 256)
#: makes one item stand for many, so that a few hundred bytes decode to a structure whose hash (as a map
#: key) or text (in an error message) costs 2**depth; a decimal fraction (4) or bigfloat (5) converts a
#: bignum to a Decimal in time quadratic in its size (5 s for 250 KB, holding the GIL); a rational (30)
#: takes a gcd. Every tag cbor2 6 interprets (tests/verifier/test_cca.py lists them) but the bignums.
REFUSED_TAGS = dict.fromkeys((0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
                              43000, 55799), _refuse_tag)


def _check_keys(data: bytes, what: str) -> None:
    """Every map key in ``data`` is an integer of at most 64 bits or a text string, as COSE labels and CCA claim
    keys are (RFC 9052 section 1.4), checked before cbor2 decodes it: Python hashes a key as it is put in its
    map, and bignums (or arrays, or floats) whose hashes collide made that quadratic, 2 s holding the GIL for
    the 19000 keys of a 245 KB token. Malformed CBOR is left for cbor2 to name."""

    def item(pos: int, depth: int) -> int:
        if depth > NESTING_MAX:
            raise EvidenceError(f"{what} is CBOR nested more than {NESTING_MAX} deep")
        major, info = data[pos] >> 5, data[pos] & 0x1F
        size = 1 << (info - 24) if 24 <= info < 28 else 0
        count, pos = (info if info < 24 else int.from_bytes(data[pos + 1:pos + 1 + size], "big")), pos + 1 + size
        indefinite = info == 31 and major in (2, 3, 4, 5)
        if major in (2, 3) and not indefinite:
            return pos + count
        if major == 6:
            return item(pos, depth + 1)
        if major not in (2, 3, 4, 5):
            return pos
        done = 0
        while data[pos] != 0xFF if indefinite else done < count * (2 if major == 5 else 1):
            if major == 5 and done % 2 == 0 and data[pos] >> 5 not in (0, 1, 3):
                raise EvidenceError(f"{what} has a map key that is neither an integer nor a text string")
            pos, done = item(pos, depth + 1), done + 1
        return pos + indefinite

    with contextlib.suppress(IndexError):
        item(0, 0)


def _decode(data: bytes, what: str) -> Any:
    """One CBOR item filling ``data`` exactly, no tag interpreted but bignums, every map key an integer or text."""
    _check_keys(data, what)
    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(fp, semantic_decoders=REFUSED_TAGS).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        cause = f": {exc.__cause__}" if isinstance(exc.__cause__, _Refused) else ""
        raise EvidenceError(f"{what} is not valid CBOR: {exc}{cause}") from None
    if fp.tell() != len(data):
        raise EvidenceError(f"{what} has {len(data) - fp.tell()} bytes after its CBOR item")
    return item


def _shown(value: Any) -> str:
    """A value from a token, for a failure: an integer too long to print (Python refuses over 4300 digits)
    by its size, a container by its type."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if value.bit_length() <= 64 else f"a {value.bit_length()}-bit integer"
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return repr(value)
    return f"a {type(value).__name__}"


def _get(claims: Mapping[Any, Any], key: int, kind: type[Any] | tuple[type[Any], ...], what: str, *,
         sizes: tuple[int, ...] = (), optional: bool = False) -> Any:
    if key not in claims:
        if optional:
            return None
        raise EvidenceError(f"{what} claim {key} is missing")
    value: Any = claims[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EvidenceError(f"{what} claim {key} has the wrong type ({type(value).__name__})")
    if sizes and len(value) not in sizes:
        raise EvidenceError(f"{what} claim {key} is {len(value)} bytes, expected {' or '.join(map(str, sizes))}")
    return value


def _hash_alg(claims: Mapping, key: int, what: str) -> str:
    name = _get(claims, key, str, what)
    if name not in HASHES:
        raise EvidenceError(f"{what} claim {key}: unknown hash algorithm {name!r} (known: {', '.join(HASHES)})")
    return name


def _sign1(item: Any, what: str) -> Sign1:
    if isinstance(item, cbor2.CBORTag):
        if item.tag != TAG_COSE_SIGN1:
            raise EvidenceError(f"the {what} is tagged {item.tag}, not COSE_Sign1 (18)")
        item = item.value
    if not isinstance(item, (list, tuple)) or len(item) != 4:
        raise EvidenceError(f"the {what} is not a COSE_Sign1 array of 4")
    protected, unprotected, payload, signature = item
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)) or not isinstance(unprotected, Mapping):
        raise EvidenceError(f"the {what}'s COSE_Sign1 members have the wrong types (a detached payload is refused)")
    header = _decode(protected, f"the {what}'s protected header") if protected else {}
    alg = header.get(1) if isinstance(header, Mapping) else None
    if not isinstance(alg, int) or alg not in COSE_ALGS:
        raise EvidenceError(f"the {what}'s protected header has algorithm {_shown(alg)}; known: ES256, ES384, "
                            "ES512")
    if COSE_CRIT in header:  # RFC 9052 3.1: each one listed must be understood, and none is
        raise EvidenceError(f"the {what}'s protected header has critical parameters (crit): not understood")
    if len(signature) != 2 * COSE_ALGS[alg][2]:
        raise EvidenceError(f"the {what}'s {COSE_ALGS[alg][3]} signature is {len(signature)} bytes, "
                            f"expected {2 * COSE_ALGS[alg][2]}")
    return Sign1(protected, alg, payload, signature)


def _payload(sign1: Sign1, what: str) -> Mapping:
    claims = _decode(sign1.payload, f"the {what} claims")
    if not isinstance(claims, Mapping):
        raise EvidenceError(f"the {what} claims are not a CBOR map")
    return claims


def _platform_claims(c: Mapping) -> PlatformClaims:
    w = "platform token"
    profile = _get(c, 265, str, w)
    if profile not in PLATFORM_PROFILES:
        raise EvidenceError(f"unknown CCA platform profile {profile!r} (known: {', '.join(PLATFORM_PROFILES)})")
    lifecycle = _get(c, 2395, int, w)
    if not 0 <= lifecycle <= 0xFFFF:
        raise EvidenceError(f"platform security lifecycle {_shown(lifecycle)} is not a 16-bit value")
    components = _get(c, 2399, (list, tuple), w)
    if not components:
        raise EvidenceError("the platform token has no software components")
    sw = []
    for i, item in enumerate(components):
        cw = f"platform software component {i}"
        if not isinstance(item, Mapping):
            raise EvidenceError(f"{cw} is not a map")
        sw.append(SwComponent(measurement=_get(item, 2, bytes, cw, sizes=(32, 48, 64)),
                              type=_get(item, 1, str, cw, optional=True), version=_get(item, 4, str, cw, optional=True),
                              signer_id=_get(item, 5, bytes, cw, optional=True),
                              hash_algorithm=_get(item, 6, str, cw, optional=True)))
    return PlatformClaims(profile=profile, challenge=_get(c, 10, bytes, w, sizes=(32, 48, 64)),
                          implementation_id=_get(c, 2396, bytes, w, sizes=(32,)),
                          instance_id=_get(c, 256, bytes, w, sizes=(33,)), config=_get(c, 2401, bytes, w),
                          lifecycle=lifecycle, sw_components=tuple(sw),
                          verification_service=_get(c, 2400, str, w, optional=True),
                          hash_algorithm=_get(c, 2402, str, w))


def _realm_claims(c: Mapping) -> RealmClaims:
    w = "realm token"
    profile = _get(c, 265, str, w, optional=True)
    if profile is not None and profile not in REALM_PROFILES:
        raise EvidenceError(f"unknown CCA realm profile {profile!r} (known: {', '.join(REALM_PROFILES)})")
    rems = _get(c, 44239, (list, tuple), w)
    if len(rems) != 4 or not all(isinstance(r, bytes) and len(r) in (32, 48, 64) for r in rems):
        raise EvidenceError("realm token claim 44239 must be 4 extensible measurements of 32, 48 or 64 bytes")
    return RealmClaims(profile=profile, challenge=_get(c, 10, bytes, w, sizes=(64,)),
                       personalization=_get(c, 44235, bytes, w, sizes=(64,)), hash_algorithm=_hash_alg(c, 44236, w),
                       rim=_get(c, 44238, bytes, w, sizes=(32, 48, 64)), rems=tuple(rems),
                       rak_claim=_get(c, 44237, bytes, w), rak_hash_algorithm=_hash_alg(c, 44240, w))


def rak_key(claim: bytes) -> ec.EllipticCurvePublicKey:
    """The RAK from realm claim 44237: a raw SEC1 uncompressed point or a COSE_Key (EC2)."""
    if claim[:1] == b"\x04":
        curve = SEC1_SIZES.get(len(claim))
        if curve is None:
            raise EvidenceError(f"the RAK is a {len(claim)}-byte point, not P-256/P-384/P-521 uncompressed")
        point = claim
    else:
        key = _decode(claim, "the RAK COSE_Key")
        crv = key.get(-1) if isinstance(key, Mapping) else None
        if not isinstance(key, Mapping) or key.get(1) != 2 or not isinstance(crv, int) or crv not in COSE_CURVES:
            raise EvidenceError("the RAK is neither a SEC1 point nor an EC2 COSE_Key on P-256/P-384/P-521")
        curve, size = COSE_CURVES[crv]
        x, y = key.get(-2), key.get(-3)
        if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == size):
            raise EvidenceError(f"the RAK COSE_Key coordinates must be {size}-byte strings")
        point = b"\x04" + x + y
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve(), point)
    except ValueError:
        raise EvidenceError("the RAK is not a point on its curve") from None


def parse_token(raw: bytes) -> Token:
    if len(raw) > TOKEN_MAX:
        raise EvidenceError(f"CCA token is {len(raw)} bytes, more than the {TOKEN_MAX} accepted")
    top = _decode(raw, "the CCA token")
    if not isinstance(top, cbor2.CBORTag) or top.tag not in (TAG_EAT_COLLECTION, TAG_CMW_COLLECTION):
        raise EvidenceError("the CCA token is not a tag-399 (EAT) or tag-907 (CMW) collection")
    if not isinstance(top.value, Mapping):
        raise EvidenceError(f"the tag-{top.tag} collection is not a map")
    tokens = []
    for key, what in ((PLATFORM_TOKEN, "platform token"), (REALM_TOKEN, "realm token")):
        entry = top.value.get(key)
        if top.tag == TAG_CMW_COLLECTION:
            if not (isinstance(entry, (list, tuple)) and len(entry) in (2, 3) and isinstance(entry[0], (int, str))):
                raise EvidenceError(f"the CMW collection's {what} ({key}) is not a [type, value] record")
            entry = entry[1]
        if not isinstance(entry, bytes):
            raise EvidenceError(f"the collection's {what} ({key}) is missing or not a byte string")
        tokens.append(_sign1(_decode(entry, f"the {what}"), what))
    platform, realm = tokens
    realm_claims = _realm_claims(_payload(realm, "realm token"))
    return Token(collection=top.tag, platform=platform, realm=realm,
                 platform_claims=_platform_claims(_payload(platform, "platform token")),
                 realm_claims=realm_claims, rak=rak_key(realm_claims.rak_claim))

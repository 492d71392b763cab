"""The released key's envelope: a flattened JWE with A256GCM (RFC 7516) to the attested tee-pubkey.

Both sides of the wire in one place, built from ``cryptography``'s primitives: the key
server wraps a resource to the tee-pubkey the guest attested, with ECDH-ES+A256KW (RFC 7518
4.6: ECDH, the Concat KDF, AES key wrap) for an EC key or RSA-OAEP-256 for an RSA key (as
guest-components may send); keybroker's guest unwraps it with its ephemeral EC key, straight
into a buffer it can wipe (no immutable copy of the key is made).

guest-components does not use the protected header as sent: it parses it and serializes it
again for the AAD (``alg``, ``enc``, then the other members in key order, compact). The header
is therefore written in exactly that form, with the ephemeral key's members sorted too.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ..errors import ProtocolError
from . import b64url_decode

ALGORITHM = "ECDH-ES+A256KW"
RSA_ALGORITHM = "RSA-OAEP-256"
ENCRYPTION = "A256GCM"
MEMBERS = ("protected", "encrypted_key", "iv", "ciphertext", "tag")
_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32), "P-384": (ec.SECP384R1(), 48), "P-521": (ec.SECP521R1(), 66)}
_NAMES = {type(curve).__name__: name for name, (curve, _) in _CURVES.items()}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Unpadded canonical base64url, as kbs-types reads a JWE's members (see wire.b64url_decode)."""
    data = b64url_decode(text)
    if data is None:
        raise ProtocolError("JWE member is not unpadded canonical base64url")
    return data


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """An EC public key as a JWK (kty, crv, x, y)."""
    name = _NAMES[type(key.curve).__name__]
    size = _CURVES[name][1]
    numbers = key.public_numbers()
    return {"kty": "EC", "crv": name, "x": b64url(numbers.x.to_bytes(size, "big")),
            "y": b64url(numbers.y.to_bytes(size, "big"))}


def public_key(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    """The EC public key of a JWK; ProtocolError unless it is a point on P-256, P-384 or P-521."""
    crv = jwk.get("crv")
    curve = _CURVES.get(crv) if jwk.get("kty") == "EC" and isinstance(crv, str) else None
    if curve is None:
        raise ProtocolError("the key is not an EC key on P-256, P-384 or P-521")
    x, y = (unb64url(jwk.get(c, "")) for c in ("x", "y"))
    if len(x) != curve[1] or len(y) != curve[1]:
        raise ProtocolError(f"the key's coordinates are not {curve[1]} bytes")
    try:  # SEC 1's uncompressed point: each coordinate below the field's prime, the point on the curve
        return ec.EllipticCurvePublicKey.from_encoded_point(curve[0], b"\x04" + x + y)
    except ValueError:
        raise ProtocolError(f"not a point on {jwk['crv']}") from None


def recipient_key(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of an EC or RSA JWK a resource can be wrapped to; ProtocolError if it is none."""
    if jwk.get("kty") != "RSA":
        return public_key(jwk)
    n, e = (int.from_bytes(unb64url(jwk.get(m, "")), "big") for m in ("n", "e"))
    if n % 2 == 0:  # the public key would load, and every encryption to it fail
        raise ProtocolError("not an RSA public key: its modulus is even")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise ProtocolError(f"not an RSA public key: {exc}") from None


_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _kek(secret: bytes) -> bytes:
    """RFC 7518 4.6.2: the Concat KDF over the ECDH secret, for the 256-bit AES key wrap key."""
    def counted(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    other = counted(ALGORITHM.encode()) + counted(b"") + counted(b"") + (256).to_bytes(4, "big")
    return ConcatKDFHash(hashes.SHA256(), 32, other).derive(secret)


def wrap(plaintext: bytes | bytearray, recipient: dict[str, Any]) -> dict[str, str]:
    """A flattened JWE of ``plaintext`` to the EC or RSA public JWK ``recipient``."""
    key = recipient_key(recipient)
    cek = AESGCM.generate_key(256)
    header: dict[str, Any]
    if isinstance(key, rsa.RSAPublicKey):
        header = {"alg": RSA_ALGORITHM, "enc": ENCRYPTION}
        encrypted_key = key.encrypt(cek, _OAEP)
    else:
        ephemeral = ec.generate_private_key(key.curve)
        header = {"alg": ALGORITHM, "enc": ENCRYPTION, "epk": dict(sorted(public_jwk(ephemeral.public_key()).items()))}
        encrypted_key = aes_key_wrap(_kek(ephemeral.exchange(ec.ECDH(), key)), cek)
    protected = b64url(json.dumps(header, separators=(",", ":")).encode())
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, bytes(plaintext), protected.encode("ascii"))
    return {"protected": protected, "encrypted_key": b64url(encrypted_key), "iv": b64url(iv),
            "ciphertext": b64url(sealed[:-16]), "tag": b64url(sealed[-16:])}


def unwrap(token: Any, private: ec.EllipticCurvePrivateKey) -> bytearray:
    """The plaintext of a flattened JWE to ``private``, in a bytearray to wipe after use."""
    if not isinstance(token, dict) or not set(MEMBERS) <= set(token):
        raise ProtocolError("the resource is not a flattened JWE")
    try:
        header = json.loads(unb64url(token["protected"]))
    except (ValueError, RecursionError):
        raise ProtocolError("the JWE's protected header is not JSON") from None
    if not isinstance(header, dict) or (header.get("alg"), header.get("enc")) != (ALGORITHM, ENCRYPTION):
        shown = (header.get("alg"), header.get("enc")) if isinstance(header, dict) else None
        raise ProtocolError(f"the JWE uses {shown}, expected {ALGORITHM}/{ENCRYPTION}")
    # RFC 7516: with zip the plaintext is not the key; an extension named in crit must be understood.
    unsupported = sorted({"zip", "crit"} & set(header))
    if unsupported:
        raise ProtocolError(f"the JWE's protected header has {', '.join(unsupported)}, which keybroker does "
                            "not support")
    epk = header.get("epk")
    sender = public_key(epk if isinstance(epk, dict) else {})
    if not isinstance(sender.curve, type(private.curve)):
        raise ProtocolError("the JWE's ephemeral key is on another curve than ours")
    iv, ciphertext, tag = unb64url(token["iv"]), unb64url(token["ciphertext"]), unb64url(token["tag"])
    if len(iv) != 12 or len(tag) != 16:
        raise ProtocolError("the JWE's IV or tag has the wrong size")
    plaintext = bytearray(len(ciphertext))
    try:
        cek = aes_key_unwrap(_kek(private.exchange(ec.ECDH(), sender)), unb64url(token["encrypted_key"]))
        if len(cek) != 32:  # A256GCM's key: AESGCM would take a 128- or 192-bit one as well
            raise ValueError("not a 256-bit content key")
        AESGCM(cek).decrypt_into(iv, ciphertext + tag, token["protected"].encode("ascii"), plaintext)
    except (InvalidUnwrap, InvalidTag, ValueError):
        plaintext[:] = bytes(len(plaintext))
        raise ProtocolError("the JWE does not decrypt with our key: it was not made for it, or was changed") from None
    return plaintext

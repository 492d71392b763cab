"""Attestation result tokens: ES256 JWTs the key server issues after a successful /attest.

The token names its RCAR session and when it ends; presented as a Bearer token it lets the
guest fetch resources without the session cookie. What the session proved (the appraised
claims, the attested tee-pubkey) stays in the session the server stored, which a release
reads back: a token stays a few hundred bytes however large the claims (a TDX event log
makes tens of kilobytes of them, more than a request head may carry). The released key is
still wrapped to the session's tee-pubkey, so only the holder of the matching private key
can use what it fetches.

Replicas accept each other's tokens when they share the signing key: an EC P-256 private
key in PEM (``openssl ecparam -name prime256v1 -genkey -noout -out token-key.pem``) from
``--token-key-file`` or the systemd credential ``token-key``. Without one, each server
signs with an ephemeral key (made before its workers are forked, so all of them share it)
and its tokens work only on itself.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ..errors import ConfigError
from ..wire import b64url_decode
from ..wire.jwe import b64url, public_jwk
from . import secretfile

ISSUER = "keybroker"
TOKEN_KEY_CREDENTIAL = "token-key"
TOKEN_MAX = 4096  # what this server issues is about 450 characters
#: The tokens' explicit type (RFC 8725 3.11): a token that names its session, not one that carries
#: claims (as tokens did before, typ JWT): a server of either kind refuses the other's (401: the
#: guest attests again) rather than misreading it, during a rolling upgrade of replicas too.
TOKEN_TYPE = "keybroker-session+jwt"
_ES256 = ec.ECDSA(hashes.SHA256())


class TokenSigner:
    """Issues and checks compact ES256 JWS tokens (RFC 7515/7519), with ``cryptography``'s primitives:
    the token is built once and checked once, with no general-purpose JOSE object in between."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None, lifetime: int = 300) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.public = self.key.public_key()
        self.shared = key is not None
        self.kid = _thumbprint(self.public)
        self.lifetime = lifetime
        self._header = b64url(json.dumps({"alg": "ES256", "typ": TOKEN_TYPE, "kid": self.kid},
                                         separators=(",", ":")).encode())

    @classmethod
    def load(cls, path: Path | None) -> TokenSigner:
        """The signer of ``--token-key-file`` (or the ``token-key`` credential); else ephemeral."""
        located = secretfile.locate(path, TOKEN_KEY_CREDENTIAL)
        if located is None:
            return cls()
        try:
            key = serialization.load_pem_private_key(secretfile.read(located, "token signing key"), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # the last: a key type it does not know
            raise ConfigError(f"token signing key {located} is not a PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError(f"token signing key {located} must be an EC P-256 private key (ES256)")
        return cls(key)

    def issue(self, tee: str, session: str, expires: float) -> str:
        """A token for the attested session ``session`` (its id); it expires with the session
        (``expires``), never later."""
        now = int(time.time())
        body = {"iss": ISSUER, "iat": now, "exp": min(now + self.lifetime, int(expires)),
                "jti": secrets.token_hex(16), "sid": session, "tee": tee}
        signing_input = f"{self._header}.{b64url(json.dumps(body, separators=(',', ':')).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode("ascii"), _ES256))
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify(self, token: str) -> dict[str, Any] | None:
        """The token's claims when it is ours, well signed and unexpired; else None."""
        if len(token) > TOKEN_MAX or token.count(".") != 2 or not token.isascii():
            return None
        header, body, signature = token.split(".")
        try:
            raw = _unb64url(signature)
            if len(raw) != 64 or json.loads(_unb64url(header)) != {"alg": "ES256", "typ": TOKEN_TYPE,
                                                                    "kid": self.kid}:
                return None
            self.public.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
                               f"{header}.{body}".encode("ascii"), _ES256)
            claims = json.loads(_unb64url(body))
        except (InvalidSignature, ValueError, RecursionError):
            return None
        if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
            return None
        exp = claims.get("exp")
        return claims if isinstance(exp, int) and exp > time.time() else None


def _unb64url(text: str) -> bytes:
    """Canonical unpadded base64url only: the lenient decoder dropped what is not of the alphabet,
    so that a token with characters added (or padding) verified as a second spelling of it."""
    data = b64url_decode(text)
    if data is None:
        raise ValueError("not canonical base64url")
    return data


def _thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256) of ``key``."""
    members = {k: v for k, v in public_jwk(key).items() if k in ("crv", "kty", "x", "y")}
    return b64url(hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest())

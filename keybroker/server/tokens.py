"""Attestation result tokens: ES256 JWTs the key server issues after a successful /attest.

The token carries the appraised claims, the attested tee-pubkey and a reference to its
RCAR session; presented as a Bearer token it lets the guest fetch resources without the
session cookie (Trustee's passport mode). The released key is still wrapped to the
tee-pubkey inside the token, so only the holder of the matching private key can use what
it fetches.

Replicas accept each other's tokens when they share the signing key: an EC P-256 private
key in PEM (``openssl ecparam -name prime256v1 -genkey -noout -out token-key.pem``) from
``--token-key-file`` or the systemd credential ``token-key``. Without one, each process
signs with an ephemeral key and its tokens work only on itself.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from jwcrypto import jwk, jws, jwt
from jwcrypto.common import JWException

from ..errors import ConfigError
from . import secretfile

ISSUER = "keybroker"
TOKEN_KEY_CREDENTIAL = "token-key"
TOKEN_MAX = 64 * 1024


class TokenSigner:
    def __init__(self, key: jwk.JWK | None = None, lifetime: int = 300) -> None:
        self.key = key or jwk.JWK.generate(kty="EC", crv="P-256")
        self.shared = key is not None
        self.kid = self.key.thumbprint()
        self.lifetime = lifetime

    @classmethod
    def load(cls, path: Path | None) -> TokenSigner:
        """The signer of ``--token-key-file`` (or the ``token-key`` credential); else ephemeral."""
        located = secretfile.locate(path, TOKEN_KEY_CREDENTIAL)
        if located is None:
            return cls()
        try:
            key = jwk.JWK.from_pem(secretfile.read(located, "token signing key"))
        except (ValueError, TypeError, JWException) as exc:
            raise ConfigError(f"token signing key {located} is not a PEM private key: {exc}") from None
        if key.get("kty") != "EC" or key.get("crv") != "P-256" or not key.has_private:
            raise ConfigError(f"token signing key {located} must be an EC P-256 private key (ES256)")
        return cls(key)

    def issue(self, tee: str, tee_pubkey: dict[str, str], claims: dict[str, Any], session: str,
              expires: float) -> str:
        """A token for an attested session; it expires with the session (``expires``), never later."""
        now = int(time.time())
        token = jwt.JWT(header={"alg": "ES256", "typ": "JWT", "kid": self.kid},
                        claims={"iss": ISSUER, "iat": now, "exp": min(now + self.lifetime, int(expires)),
                                "jti": secrets.token_hex(16), "sid": session, "tee": tee,
                                "tee-pubkey": tee_pubkey, "claims": claims})
        token.make_signed_token(self.key)
        return token.serialize()

    def verify(self, token: str) -> dict[str, Any] | None:
        """The token's claims when it is ours, well signed and unexpired; else None."""
        if len(token) > TOKEN_MAX:
            return None
        try:
            parsed = jwt.JWT(key=self.key, jwt=token, algs=["ES256"],
                             check_claims={"iss": ISSUER, "exp": None})
            return json.loads(parsed.claims)
        except (JWException, jws.InvalidJWSSignature, ValueError, TypeError):
            return None

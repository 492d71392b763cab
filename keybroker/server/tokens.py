"""Attestation result tokens: ES256 JWTs the key server issues after a successful /attest.

The token carries the appraised claims and the attested tee-pubkey; presented as a Bearer
token it lets the guest fetch resources without the session cookie (Trustee's passport
mode). The released key is still wrapped to the tee-pubkey inside the token, so only the
holder of the matching private key can use what it fetches.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from jwcrypto import jwk, jws, jwt
from jwcrypto.common import JWException

ISSUER = "keybroker"


class TokenSigner:
    def __init__(self, key: jwk.JWK | None = None, lifetime: int = 300) -> None:
        # Without a configured key, an ephemeral one: tokens then only work on this process.
        self.key = key or jwk.JWK.generate(kty="EC", crv="P-256")
        self.kid = self.key.thumbprint()
        self.lifetime = lifetime

    def issue(self, tee: str, tee_pubkey: dict[str, str], claims: dict[str, Any]) -> str:
        now = int(time.time())
        token = jwt.JWT(header={"alg": "ES256", "typ": "JWT", "kid": self.kid},
                        claims={"iss": ISSUER, "iat": now, "exp": now + self.lifetime,
                                "jti": secrets.token_hex(16), "tee": tee, "tee-pubkey": tee_pubkey,
                                "claims": claims})
        token.make_signed_token(self.key)
        return token.serialize()

    def verify(self, token: str) -> dict[str, Any] | None:
        """The token's claims when it is ours, well signed and unexpired; else None."""
        if len(token) > 64 * 1024:
            return None
        try:
            parsed = jwt.JWT(key=self.key, jwt=token, algs=["ES256"],
                             check_claims={"iss": ISSUER, "exp": None})
            return json.loads(parsed.claims)
        except (JWException, jws.InvalidJWSSignature, ValueError, TypeError):
            return None

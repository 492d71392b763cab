"""Attestation tokens: standard ES256 JWTs, refused when tampered, foreign, expired or malformed."""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwcrypto import jwk, jwt

from keybroker.errors import ConfigError
from keybroker.server.tokens import TokenSigner
from support.servers import write_secret


def issue(signer: TokenSigner, expires: float | None = None) -> str:
    return signer.issue("snp", "0123456789abcdef", expires or time.time() + 300)


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_round_trip_and_a_standard_jwt():
    signer = TokenSigner()
    token = issue(signer)
    claims = signer.verify(token)
    assert claims["sid"] == "0123456789abcdef" and claims["tee"] == "snp" and claims["exp"] > time.time()
    # Any JOSE library verifies it with the public key, and finds the kid as RFC 7638 thumbprint.
    public = jwk.JWK.from_pyca(signer.public)
    parsed = jwt.JWT(key=public, jwt=token, algs=["ES256"])
    assert json.loads(parsed.claims)["sid"] == "0123456789abcdef"
    assert json.loads(parsed.header)["kid"] == public.thumbprint()


def test_a_token_of_the_kind_that_carried_claims_is_refused_not_misread():
    """Tokens were JWTs (typ JWT) carrying the claims; a replica not yet upgraded took a newer token
    for one and failed on it (a 500): the type tells them apart, both ways."""
    signer = TokenSigner()
    header, body, _ = issue(signer).split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "=="))["typ"] == "keybroker-session+jwt"
    old_header = b64({"alg": "ES256", "typ": "JWT", "kid": signer.kid})
    r, s = decode_dss_signature(signer.key.sign(f"{old_header}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    signature = base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).rstrip(b"=").decode()
    assert signer.verify(f"{old_header}.{body}.{signature}") is None


def test_tampered_foreign_expired_and_malformed_tokens_are_refused():
    signer = TokenSigner()
    token = issue(signer)
    header, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    assert signer.verify(f"{header}.{b64(claims | {'tee': 'tdx'})}.{signature}") is None
    assert TokenSigner().verify(token) is None  # another server's key
    assert signer.verify(issue(signer, expires=time.time() - 1)) is None
    assert signer.verify(f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': signer.kid})}.{body}.") is None
    for junk in ("", "a.b", "a.b.c.d", token + "x", "é.é.é", "." * 2, token.replace(".", ".[", 1),
                 "x" * 5000):
        assert signer.verify(junk) is None


def signed(signer: TokenSigner, body: object, *, signature=None) -> str:
    """A token of ``body`` (any JSON) under ``signer``'s own key and header: only its claims are wrong."""
    header = issue(signer).split(".")[0]
    signing_input = f"{header}.{b64(body)}"
    r, s = decode_dss_signature(signer.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    raw = (signature or (lambda r, s: r.to_bytes(32, "big") + s.to_bytes(32, "big")))(r, s)
    return f"{signing_input}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"


def test_well_signed_tokens_with_claims_the_server_never_issues_are_refused():
    """What a holder of the signing key (another program sharing it) signs is ours only when it says so:
    the issuer, an integer expiry, an object of claims, a signature of two 32-byte halves, a length
    the server issues."""
    signer = TokenSigner()
    good = {"iss": "keybroker", "iat": int(time.time()), "exp": int(time.time()) + 300, "sid": "0123456789abcdef",
            "tee": "snp"}
    assert signer.verify(signed(signer, good)) is not None
    assert signer.verify(signed(signer, good | {"iss": "someone-else"})) is None
    assert signer.verify(signed(signer, good | {"exp": time.time() + 300.5})) is None  # a float, not NumericDate
    assert signer.verify(signed(signer, good | {"exp": str(int(time.time()) + 300)})) is None
    assert signer.verify(signed(signer, [good])) is None
    assert signer.verify(signed(signer, good | {"pad": "x" * 4096})) is None  # longer than TOKEN_MAX
    # The same (r, s) with a zero byte before s: a second spelling of the signature.
    padded = signed(signer, good, signature=lambda r, s: r.to_bytes(32, "big") + s.to_bytes(33, "big"))
    assert signer.verify(padded) is None


def test_a_token_is_read_only_in_its_one_spelling():
    """The lenient base64 decoder dropped what is not of the alphabet: a token with characters added to a
    part, or padded, verified as a second spelling of the one issued."""
    signer = TokenSigner()
    token = issue(signer)
    header, body, signature = token.split(".")
    assert signer.verify(token) is not None
    for spelling in (f"{token}!!~~", f"{token}====", f"{header}.{body}=.{signature}", f"{header}!.{body}.{signature}"):
        assert signer.verify(spelling) is None, spelling


def test_tokens_outlive_neither_their_session_nor_their_lifetime():
    signer = TokenSigner(lifetime=60)
    token = issue(signer, expires=time.time() + 10)
    exp = signer.verify(token)["exp"]
    assert exp <= time.time() + 10
    assert signer.verify(issue(signer, expires=time.time() + 3600))["exp"] <= time.time() + 60


def test_shared_key_file(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    a = TokenSigner.load(write_secret(tmp_path / "a.pem", pem))
    b = TokenSigner.load(write_secret(tmp_path / "b.pem", pem))
    assert a.shared and b.verify(issue(a)) is not None
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ConfigError, match="EC P-256"):
        TokenSigner.load(write_secret(tmp_path / "c.pem", p384))
    with pytest.raises(ConfigError, match="not a PEM private key"):
        TokenSigner.load(write_secret(tmp_path / "d.pem", b"nonsense"))
    # a PKCS #8 key of an algorithm the X.509 library does not know (UnsupportedAlgorithm, no ValueError)
    unknown = b"-----BEGIN PRIVATE KEY-----\nMBcCAQAwDAYKKwYBBAGCNwoDAQQEYWJjZA==\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ConfigError, match="not a PEM private key"):
        TokenSigner.load(write_secret(tmp_path / "e.pem", unknown))

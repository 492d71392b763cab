"""The RCAR wire contract: binding, records, JWE wrapping."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import rfc8785
from jwcrypto import jwe, jwk

from keybroker.errors import ProtocolError
from keybroker.wire import jwe as keybroker_jwe
from keybroker.wire import rcar as p


def test_canonical_json_matches_trustees_vector():
    # Trustee's parse_runtime_data unit test: {"b":1,"a":"test","c":{"d":"e"}} -> SHA-384
    digest = hashlib.sha384(rfc8785.dumps({"b": 1, "a": "test", "c": {"d": "e"}})).hexdigest()
    assert digest == ("e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c"
                      "4597480a186427c813ca941da78870c3")


def test_report_data_binds_nonce_and_key():
    key = {"alg": "ECDH-ES+A256KW", "crv": "P-256", "kty": "EC", "x": "A" * 43, "y": "B" * 43}
    data = p.report_data("bm9uY2U=", key)
    expected = hashlib.sha384(json.dumps({"additional-evidence": "", "nonce": "bm9uY2U=", "tee-pubkey": key},
                                         sort_keys=True, separators=(",", ":")).encode()).digest()
    assert data == expected + bytes(16)
    assert p.report_data("other", key) != data


def test_attestation_round_trip_and_strictness():
    key = json.loads(jwk.JWK.generate(kty="EC", crv="P-256").export_public()) | {"alg": "ECDH-ES+A256KW"}
    att = p.Attestation("n", key, {"version": 1})
    assert p.Attestation.from_json(att.to_json()) == att
    bad = att.to_json() | {"extra": 1}
    with pytest.raises(ProtocolError, match="unknown member"):
        p.Attestation.from_json(bad)
    with pytest.raises(ProtocolError, match="P-256, P-384 or P-521"):
        p.check_tee_pubkey(key | {"crv": "P-192"})
    with pytest.raises(ProtocolError, match="must be ECDH-ES"):
        p.check_tee_pubkey(key | {"alg": "RSA1_5"})
    with pytest.raises(ProtocolError, match="coordinate"):
        p.check_tee_pubkey(key | {"x": "AAAA"})
    with pytest.raises(ProtocolError, match="not a point on P-256"):
        p.check_tee_pubkey(key | {"x": "A" * 43})
    with pytest.raises(ProtocolError, match="additional_evidence"):
        p.Attestation.from_json({"runtime-data": {"nonce": "n", "tee-pubkey": key},
                                 "tee-evidence": {"primary_evidence": {}, "additional_evidence": "x"}})


@pytest.mark.parametrize("crv", ["P-256", "P-384", "P-521"])
def test_jwe_is_flattened_with_epk_protected_and_interoperates_with_jwcrypto(crv):
    private = jwk.JWK.generate(kty="EC", crv=crv)
    public = json.loads(private.export_public()) | {"alg": "ECDH-ES+A256KW"}
    body = keybroker_jwe.wrap(b"the key", public)
    assert set(body) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
    header = json.loads(base64.urlsafe_b64decode(body["protected"] + "=="))
    assert header["alg"] == "ECDH-ES+A256KW" and header["enc"] == "A256GCM" and header["epk"]["crv"] == crv
    token = jwe.JWE()  # jwcrypto opens what keybroker wraps...
    token.deserialize(json.dumps(body), key=private)
    assert token.payload == b"the key"
    theirs = jwe.JWE(b"their key", protected=json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}))
    theirs.add_recipient(jwk.JWK(**public))  # ...and keybroker opens what jwcrypto wraps, into a buffer
    opened = keybroker_jwe.unwrap(dict(zip(keybroker_jwe.MEMBERS, theirs.serialize(compact=True).split("."),
                                           strict=True)), private.get_op_key("unwrapKey"))
    assert isinstance(opened, bytearray) and opened == b"their key"


def test_a_changed_or_foreign_jwe_does_not_open():
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker.errors import ProtocolError

    mine, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    body = keybroker_jwe.wrap(b"k" * 32, keybroker_jwe.public_jwk(mine.public_key()))
    with pytest.raises(ProtocolError, match="does not decrypt"):
        keybroker_jwe.unwrap(body, other)
    for member in ("ciphertext", "tag", "iv", "encrypted_key"):
        raw = bytearray(keybroker_jwe.unb64url(body[member]))
        raw[0] ^= 1
        with pytest.raises(ProtocolError):
            keybroker_jwe.unwrap(body | {member: keybroker_jwe.b64url(bytes(raw))}, mine)
    for broken in ({}, body | {"protected": "x"}, body | {"protected": keybroker_jwe.b64url(b"[]")}):
        with pytest.raises(ProtocolError):
            keybroker_jwe.unwrap(broken, mine)

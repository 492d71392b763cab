"""The RCAR wire contract: binding, records, JWE wrapping."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwe, jwk

from keybroker.errors import ProtocolError
from keybroker.wire import jwe as keybroker_jwe
from keybroker.wire import rcar as p
from support import jose


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


def test_the_binding_hash_is_negotiated_as_guest_components_negotiates_it():
    """The Request offers sha256, sha384 and sha512; the Challenge may select one (Trustee: sha512 for IBM
    SE, and for TDX through Intel Trust Authority), read case-insensitively; none selected is SHA-384."""
    assert p.AuthRequest("tdx").to_json()["extra-params"]["supported-hash-algorithms"] == ["sha256", "sha384",
                                                                                          "sha512"]
    assert p.Challenge.from_json({"nonce": "n", "extra-params": ""}).hash_algorithm == "sha384"
    assert p.Challenge.from_json({"nonce": "n", "extra-params": {}}).hash_algorithm == "sha384"
    chosen = p.Challenge.from_json({"nonce": "n", "extra-params": {"selected-hash-algorithm": "SHA512"}})
    assert chosen.hash_algorithm == "sha512"
    key = {"alg": "ECDH-ES+A256KW", "crv": "P-256", "kty": "EC", "x": "A" * 43, "y": "B" * 43}
    material = rfc8785.dumps({"additional-evidence": "", "nonce": "n", "tee-pubkey": key})
    assert p.report_data("n", key, hash_algorithm="sha512") == hashlib.sha512(material).digest()
    assert p.report_data("n", key, hash_algorithm="sha256") == hashlib.sha256(material).digest() + bytes(32)
    for selected in ("sm3", "", 512, None, ["sha512"]):
        with pytest.raises(ProtocolError, match="hash algorithm"):
            p.Challenge.from_json({"nonce": "n", "extra-params": {"selected-hash-algorithm": selected}})


def test_attestation_is_read_as_serde_reads_it():
    key = json.loads(jwk.JWK.generate(kty="EC", crv="P-256").export_public()) | {"alg": "ECDH-ES+A256KW"}
    att = p.Attestation("n", key, {"version": 1})
    assert p.Attestation.from_json(att.to_json()) == att
    extra = att.to_json() | {"extra": 1}  # unknown members are ignored, as serde does
    extra["runtime-data"]["tee-pubkey"] = key | {"kid": "k1", "use": "enc"}
    assert p.Attestation.from_json(extra) == att  # the key as TeePubKey reads it: what the binding hashes
    assert p.Attestation.from_json(att.to_json() | {"init-data": {"format": "toml", "body": "x"}}).init_data == {
        "format": "toml", "body": "x"}
    for broken, reason in [({"runtime-data": {"nonce": "n", "tee-pubkey": key}}, "missing 'tee-evidence'"),
                           ({"runtime-data": {"nonce": 1, "tee-pubkey": key},
                             "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""}}, "nonce"),
                           ({"runtime-data": {"nonce": "n", "tee-pubkey": key},
                             "tee-evidence": {"primary_evidence": {}}}, "missing 'additional_evidence'"),
                           ({"runtime-data": {"nonce": "n", "tee-pubkey": key},
                             "tee-evidence": {"primary_evidence": {}, "additional_evidence": {}}}, "must be a string")]:
        with pytest.raises(ProtocolError, match=reason):
            p.Attestation.from_json(broken)


def test_tee_pubkey_ec_and_rsa_checked_and_normalized():
    key = json.loads(jwk.JWK.generate(kty="EC", crv="P-256").export_public()) | {"alg": "ECDH-ES+A256KW"}
    assert p.check_tee_pubkey(key) == {m: key[m] for m in ("kty", "crv", "alg", "x", "y")}
    rsa_key = json.loads(jwk.JWK.generate(kty="RSA", size=2048).export_public()) | {"alg": "RSA-OAEP-256"}
    assert p.check_tee_pubkey(rsa_key) == {m: rsa_key[m] for m in ("kty", "alg", "n", "e")}
    small = json.loads(jwk.JWK.generate(kty="RSA", size=1024).export_public()) | {"alg": "RSA-OAEP-256"}
    n = base64.urlsafe_b64decode(rsa_key["n"] + "==")
    even_modulus = base64.urlsafe_b64encode(n[:-1] + bytes([n[-1] & 0xFE])).decode().rstrip("=")
    for broken, reason in [(key | {"crv": "P-192"}, "P-256, P-384 or P-521"),
                           (key | {"alg": "RSA1_5"}, "must be ECDH-ES"),
                           ({k: v for k, v in key.items() if k != "alg"}, "missing 'alg'"),
                           (key | {"x": "AAAA"}, "coordinate"),
                           (key | {"x": "A" * 43}, "not a point on P-256"),
                           (key | {"kty": ["EC"]}, "kty must be"),
                           (key | {"kty": "OKP"}, "kty must be"),
                           (rsa_key | {"alg": "RSA1_5"}, "padding-oracle"),
                           (small, "2048-8192 bits"),
                           (rsa_key | {"e": "!"}, "2048-8192 bits"),
                           (rsa_key | {"e": "AAE"}, "not an RSA public key"),
                           (rsa_key | {"n": even_modulus}, "modulus is even")]:
        with pytest.raises(ProtocolError, match=reason):
            p.check_tee_pubkey(broken)


def _respelled(text: str) -> str:
    """``text`` (unpadded base64url) with its unused trailing bits set: the same bytes, spelled otherwise."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    unused = {2: 4, 3: 2}[len(text) % 4]  # bits of the last character that carry no data
    return text[:-1] + alphabet[alphabet.index(text[-1]) | ((1 << unused) - 1)]


def test_tee_pubkey_base64url_is_read_as_kbs_types_reads_it():
    """Trustee decodes the key's members with the base64 crate's URL_SAFE_NO_PAD, which refuses padding
    and unused bits that are set: a second spelling of the same key, which the binding would hash apart."""
    key = json.loads(jwk.JWK.generate(kty="EC", crv="P-256").export_public()) | {"alg": "ECDH-ES+A256KW"}
    rsa_key = json.loads(jwk.JWK.generate(kty="RSA", size=2048).export_public()) | {"alg": "RSA-OAEP-256"}
    assert base64.urlsafe_b64decode(_respelled(key["x"]) + "=") == base64.urlsafe_b64decode(key["x"] + "=")
    for broken in (key | {"x": _respelled(key["x"])}, key | {"y": key["y"] + "="},
                   rsa_key | {"e": _respelled(rsa_key["e"])} if len(rsa_key["e"]) % 4 else rsa_key | {"e": "AQAB="},
                   rsa_key | {"n": _respelled(rsa_key["n"])}):
        with pytest.raises(ProtocolError):
            p.check_tee_pubkey(broken)


def test_a_tee_key_coordinate_at_or_above_the_field_prime_is_refused():
    """A coordinate plus the prime names the same point (a second spelling of the key); SEC 1 allows
    coordinates below the prime only. P-521's 66 bytes leave room for x + p."""
    numbers = ec.generate_private_key(ec.SECP521R1()).public_key().public_numbers()
    key = keybroker_jwe.public_jwk(numbers.public_key()) | {"alg": "ECDH-ES+A256KW"}
    assert p.check_tee_pubkey(key)["x"] == key["x"]
    for x in (numbers.x + 2**521 - 1, 2**521 - 1):
        with pytest.raises(ProtocolError, match="not a point on P-521"):
            p.check_tee_pubkey(key | {"x": keybroker_jwe.b64url(x.to_bytes(66, "big"))})


def test_jwe_members_are_read_as_kbs_types_reads_them():
    """guest-components reads a JWE's members with URL_SAFE_NO_PAD: padding, the standard alphabet or
    set unused bits are refused, by keybroker's guest as well."""
    private = ec.generate_private_key(ec.SECP256R1())
    body = keybroker_jwe.wrap(b"k" * 32, keybroker_jwe.public_jwk(private.public_key()))
    assert keybroker_jwe.unwrap(body, private) == b"k" * 32
    standard = body["ciphertext"].replace("-", "+").replace("_", "/")
    variants = {"iv": [body["iv"] + "=="], "tag": [body["tag"] + "==", _respelled(body["tag"])],
                "encrypted_key": [_respelled(body["encrypted_key"])],
                "ciphertext": [standard] if standard != body["ciphertext"] else [body["ciphertext"] + "="]}
    for member, spellings in variants.items():
        for spelling in spellings:
            with pytest.raises(ProtocolError, match="not unpadded canonical base64url"):
                keybroker_jwe.unwrap(body | {member: spelling}, private)


def test_version_negotiation_and_trustee_errors():
    assert p.version_accepted("0.4.0") and p.version_accepted("0.4.0+build.7")
    for other in ("0.4.0-rc1", "0.4.1", "v0.4.0", " 0.4.0", "0.4", "0.4.0+"):
        assert not p.version_accepted(other)
    asking = p.AuthRequest("snp").to_json()
    assert p.AuthRequest.from_json(asking).envelope
    guest_components = {"version": "0.4.0", "tee": "snp", "extra-params": {"supported-hash-algorithms": ["sha384"]}}
    assert not p.AuthRequest.from_json(guest_components).envelope
    with pytest.raises(ProtocolError, match="extra-params"):
        p.AuthRequest.from_json({"version": "0.4.0", "tee": "snp"})
    assert p.Challenge.from_json(p.Challenge("n", envelope=True).to_json()).envelope
    assert not p.Challenge.from_json({"nonce": "n", "extra-params": ""}).envelope  # Trustee's challenge
    trustee = "https://github.com/confidential-containers/kbs/errors/"
    assert p.problem_name({"type": trustee + "PolicyDeny", "detail": "Access denied by policy"}) == p.POLICY_DENIED
    assert p.problem_name({"type": trustee + "AttestationError", "detail": "x"}) == p.ATTESTATION_DENIED
    assert p.problem_name({"type": trustee + "PluginInternalError", "detail": "x"}) is None
    assert p.problem_name(p.problem(p.NOT_ATTESTED, "x")) == p.NOT_ATTESTED


def test_device_evidence_binds_nonce_and_key_unpadded():
    key = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "A" * 43, "y": "B" * 43}
    expected = hashlib.sha384(json.dumps({"nonce": "n", "tee-pubkey": key}, sort_keys=True,
                                         separators=(",", ":")).encode()).digest()
    assert p.device_report_data("n", key) == expected
    assert p.report_data("n", key, '{"sampledevice":{}}') != p.report_data("n", key)


@pytest.mark.parametrize("kty", ["EC", "RSA"])
def test_protected_header_is_what_guest_components_writes_again(kty):
    private = jwk.JWK.generate(kty="EC", crv="P-256") if kty == "EC" else jwk.JWK.generate(kty="RSA", size=2048)
    public = json.loads(private.export_public())
    body = keybroker_jwe.wrap(b"the key", public)
    assert jose.protected(json.loads(keybroker_jwe.unb64url(body["protected"]))) == body["protected"]
    token = jwe.JWE()
    token.deserialize(json.dumps(body), key=private)
    assert token.payload == b"the key"
    header = json.loads(base64.urlsafe_b64decode(body["protected"] + "=="))
    assert header["alg"] == ("ECDH-ES+A256KW" if kty == "EC" else "RSA-OAEP-256")


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
    header = json.loads(keybroker_jwe.unb64url(body["protected"]))
    odd_keys = [keybroker_jwe.b64url(json.dumps(header | {"epk": header["epk"] | {"crv": odd}}).encode())
                for odd in (["P-256"], {"a": 1}, 256, None)]  # a hostile server's JWE: a refusal, not a TypeError
    for broken in ({}, body | {"protected": "x"}, body | {"protected": keybroker_jwe.b64url(b"[]")},
                   *(body | {"protected": protected} for protected in odd_keys)):
        with pytest.raises(ProtocolError):
            keybroker_jwe.unwrap(broken, mine)


@pytest.mark.parametrize("bits", [128, 192])
def test_a_content_key_shorter_than_a256gcm_is_refused(bits, monkeypatch):
    private = ec.generate_private_key(ec.SECP256R1())
    public = keybroker_jwe.public_jwk(private.public_key()) | {"alg": keybroker_jwe.ALGORITHM}
    monkeypatch.setattr(keybroker_jwe.AESGCM, "generate_key", staticmethod(lambda _: os.urandom(bits // 8)))
    body = keybroker_jwe.wrap(b"the key", public)  # says A256GCM, holds a shorter key
    with pytest.raises(ProtocolError, match="does not decrypt with our key"):
        keybroker_jwe.unwrap(body, private)


@pytest.mark.parametrize("extra", [{"zip": "DEF"}, {"crit": ["urn:example:must-understand"],
                                                    "urn:example:must-understand": True}])
def test_a_jwe_compressed_or_with_critical_extensions_is_refused_not_opened_into_another_key(extra):
    """RFC 7516: with zip the plaintext is compressed (opened as is, it would be the wrong key); a
    crit extension must be understood. Trustee sends neither; another server might."""
    private = jwk.JWK.generate(kty="EC", crv="P-256")
    public = json.loads(private.export_public()) | {"alg": "ECDH-ES+A256KW"}
    theirs = jwe.JWE(b"their key" * 8, protected=json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM"} | extra))
    theirs.add_recipient(jwk.JWK(**public))
    body = dict(zip(keybroker_jwe.MEMBERS, theirs.serialize(compact=True).split("."), strict=True))
    with pytest.raises(ProtocolError, match=f"protected header has {next(iter(extra))}"):
        keybroker_jwe.unwrap(body, private.get_op_key("unwrapKey"))


def test_a_jwe_with_another_iv_size_or_an_epk_on_another_curve_is_refused(monkeypatch):
    """A256GCM's IV is 96 bits (RFC 7518 5.3): AESGCM would open one of 16 bytes as well, so a JWE that
    decrypts with another IV size is refused by its size; an ephemeral key on another curve than ours is
    refused as such, not as a failed exchange."""
    private = ec.generate_private_key(ec.SECP256R1())
    public = keybroker_jwe.public_jwk(private.public_key())
    with monkeypatch.context() as patched:
        patched.setattr(keybroker_jwe.os, "urandom", lambda n: b"\x01" * (16 if n == 12 else n))
        long_iv = keybroker_jwe.wrap(b"k" * 32, public)
    assert len(keybroker_jwe.unb64url(long_iv["iv"])) == 16
    with pytest.raises(ProtocolError, match="IV or tag has the wrong size"):
        keybroker_jwe.unwrap(long_iv, private)
    p384 = keybroker_jwe.wrap(b"k" * 32, keybroker_jwe.public_jwk(ec.generate_private_key(ec.SECP384R1()).public_key()))
    with pytest.raises(ProtocolError, match="another curve"):
        keybroker_jwe.unwrap(p384, private)
    body = keybroker_jwe.wrap(b"k" * 32, public)
    header = json.loads(keybroker_jwe.unb64url(body["protected"]))
    for other in ({"alg": "ECDH-ES+A128KW"}, {"enc": "A128GCM"}, {"alg": "dir"}):
        relabelled = body | {"protected": keybroker_jwe.b64url(json.dumps(header | other).encode())}
        with pytest.raises(ProtocolError, match="the JWE uses"):
            keybroker_jwe.unwrap(relabelled, private)


def test_records_bound_their_nonce_and_type_their_version_and_tee():
    """A nonce is 1 to NONCE_MAX characters in the Challenge and in the Attestation's runtime-data (what a
    server hashes into the binding and keeps per session); an AuthRequest's version and tee are strings,
    refused as a protocol error rather than failing later in the version match."""
    key = json.loads(jwk.JWK.generate(kty="EC", crv="P-256").export_public()) | {"alg": "ECDH-ES+A256KW"}
    longest = "n" * p.NONCE_MAX
    assert p.Challenge.from_json({"nonce": longest}).nonce == longest
    assert p.Attestation.from_json(p.Attestation(longest, key, {}).to_json()).nonce == longest
    for nonce in ("", longest + "n"):
        with pytest.raises(ProtocolError, match="challenge nonce must be a string of 1-128"):
            p.Challenge.from_json({"nonce": nonce, "extra-params": ""})
        with pytest.raises(ProtocolError, match="runtime-data nonce must be a string of 1-128"):
            p.Attestation.from_json(p.Attestation(nonce, key, {}).to_json())
    for version, tee in ((4, "snp"), (["0.4.0"], "snp"), ("0.4.0", None), ("0.4.0", {"snp": 1})):
        with pytest.raises(ProtocolError, match="'version' and 'tee' must be strings"):
            p.AuthRequest.from_json({"version": version, "tee": tee, "extra-params": {}})


def test_tee_pubkey_rsa_bounds_and_member_types():
    """An RSA modulus of more than 8192 bits or an exponent of more than 8 bytes is refused (both load, and
    a hostile guest would have the server encrypt to them); a member that is no string is a protocol error,
    not a TypeError from the curve lookup."""
    rsa_key = json.loads(jwk.JWK.generate(kty="RSA", size=2048).export_public()) | {"alg": "RSA-OAEP-256"}
    assert p.check_tee_pubkey(rsa_key | {"e": keybroker_jwe.b64url((2**63 + 1).to_bytes(8, "big"))})
    huge_n = keybroker_jwe.b64url((2**8192 + 1).to_bytes(1025, "big"))  # 8193 bits, odd
    long_e = keybroker_jwe.b64url((2**64 + 1).to_bytes(9, "big"))
    for broken in (rsa_key | {"n": huge_n}, rsa_key | {"e": long_e}):
        with pytest.raises(ProtocolError, match="2048-8192 bits and a public exponent"):
            p.check_tee_pubkey(broken)
    key = json.loads(jwk.JWK.generate(kty="EC", crv="P-256").export_public()) | {"alg": "ECDH-ES+A256KW"}
    for broken in (key | {"crv": ["P-256"]}, key | {"crv": {"P-256": 1}}, rsa_key | {"alg": ["RSA-OAEP-256"]}):
        with pytest.raises(ProtocolError, match="tee-pubkey members must be strings"):
            p.check_tee_pubkey(broken)

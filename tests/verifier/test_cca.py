"""Arm CCA verification: the real tokens (trusted only with their published test CPAK),
negatives built from their bytes, and tokens built to the spec for the collection forms,
profiles, key encodings and algorithms the samples do not cover."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from keybroker.errors import ConfigError, EvidenceError
from keybroker.verifier import Context, Evidence, TrustStore, verify
from keybroker.verifier.cca import abi
from keybroker.verifier.trust import Cpak
from support import VECTORS as ALL_VECTORS
from support import cca as cb
from support.policies import ANY_GUEST

VECTORS = ALL_VECTORS / "cca"
SETS = {"trustee-example": "cpak.json", "veraison-tf-rmm": "cpak.pem"}


def vector(name: str) -> tuple[bytes, Path]:
    folder = VECTORS / name
    if not folder.is_dir():
        pytest.skip(f"no vector set {name} in {VECTORS}")
    return (folder / "token.cbor").read_bytes(), folder / SETS[name]


def run(raw: bytes, trust: TrustStore, **kw):
    return verify(Evidence("arm_cca_guest", raw, inblob=kw.pop("inblob", None)), Context(trust, **kw))


def trusting(*keys: ec.EllipticCurvePrivateKey, implementation_id: bytes | None = None) -> TrustStore:
    return TrustStore(cpaks=tuple(Cpak(k.public_key(), implementation_id, None, "test") for k in keys))


def first_failure(verdict) -> str:
    assert not verdict.ok
    return verdict.failures[0].name


def flip_value(raw: bytes, value: bytes) -> bytes:
    """Flip a bit inside ``value`` where it occurs (once) in the token: CBOR stays well formed."""
    assert raw.count(value) == 1
    at = raw.index(value) + len(value) // 2
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


def claims_of(raw: bytes) -> tuple[dict, dict]:
    top = cbor2.loads(raw)
    platform, realm = (cbor2.loads(cbor2.loads(top.value[k]).value[2]) for k in (44234, 44241))
    return platform, realm


# -- the real tokens ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SETS))
def test_vector_tokens_verify_only_with_their_test_cpak(name):
    raw, cpak = vector(name)
    untrusted = run(raw, TrustStore.default())
    assert first_failure(untrusted) == "cpak_trusted" and "none is by default" in untrusted.reason()
    verdict = run(raw, TrustStore.default().with_cpak_file(cpak))
    assert verdict.ok, verdict.reason()
    assert [c.name for c in verdict.checks] == ["format", "cpak_trusted", "platform_signature", "rak_binding",
                                                "realm_signature", "nonce_binding"]
    assert verdict.checks[-1].ok is None  # no nonce given
    assert ANY_GUEST.decide("default/disk/root", verdict.claims).allowed
    platform, realm = claims_of(raw)
    c = verdict.claims
    assert c["tee"] == "cca" and c["debug"] is False and c["cca.profile"] == "http://arm.com/CCA-SSD/1.0.0"
    assert c["measurement"] == c["cca.rim"] == realm[44238].hex()
    assert [c[f"cca.rem{i}"] for i in range(4)] == [r.hex() for r in realm[44239]]
    assert c["cca.realm_challenge"] == realm[10].hex() and c["cca.personalization"] == realm[44235].hex()
    assert c["cca.platform.lifecycle"] == platform[2395] == 0x3003 and c["cca.platform.lifecycle_state"] == "secured"
    assert [sw["measurement"] for sw in c["cca.platform.sw_components"]] == [sw[2].hex() for sw in platform[2399]]
    assert c["cca.platform.implementation_id"] == platform[2396].hex()
    # The realm challenge is what a nonce must match (as the driver pads a 32-64 byte inblob).
    assert run(raw, TrustStore.default().with_cpak_file(cpak), nonce=realm[10]).ok
    assert first_failure(run(raw, TrustStore.default().with_cpak_file(cpak), nonce=b"\0" * 64)) == "nonce_binding"


def test_trust_anchor_ids_must_match_the_platform(tmp_path):
    raw, cpak = vector("trustee-example")
    entries = json.loads(cpak.read_text())
    entries[0]["implementation-id"] = "00" * 32
    (tmp_path / "ta.json").write_text(json.dumps(entries))
    verdict = run(raw, TrustStore.default().with_cpak_file(tmp_path / "ta.json"))
    assert first_failure(verdict) == "cpak_trusted" and "implementation-id 7f454c46" in verdict.reason()


def test_a_certificate_given_as_a_cpak_is_refused_not_trusted_as_a_root():
    """--trust-cpak FILE with a certificate in it added that certificate to the roots SEV-SNP and TDX chains
    end in: meant as a CCA platform's key, it vouched for ARKs or Intel roots instead."""
    certificate = VECTORS.parent / "snp" / "virtee-sev" / "ark.pem"
    assert certificate.exists()
    with pytest.raises(ConfigError, match=r"--trust-cpak .*ark\.pem holds a certificate, not a CCA platform key"):
        TrustStore.default().with_cpak_file(certificate)


def test_trust_anchor_instance_ids_must_match_the_platform(tmp_path):
    """A CPAK entry names one platform instance: the same key for another instance-id is not trusted for this one."""
    raw, cpak = vector("trustee-example")
    entries = json.loads(cpak.read_text())
    assert run(raw, TrustStore.default().with_cpak_file(cpak)).ok
    entries[0]["instance-id"] = "01" + "00" * 32
    (tmp_path / "ta.json").write_text(json.dumps(entries))
    verdict = run(raw, TrustStore.default().with_cpak_file(tmp_path / "ta.json"))
    assert first_failure(verdict) == "cpak_trusted" and "instance-id 0107060504" in verdict.reason()


def test_a_cpak_file_nested_too_deep_is_a_config_error(tmp_path):
    (tmp_path / "cpak.json").write_text("[" * 50000 + "]" * 50000)  # under the 1 MiB a trust anchor may be
    with pytest.raises(ConfigError, match=r"cpak\.json is not a root certificate"):
        TrustStore.default().with_cpak_file(tmp_path / "cpak.json")
    with pytest.raises(ConfigError, match=r"cpak\.json is not a root certificate"):
        TrustStore.default().with_dirs([tmp_path])


@pytest.mark.parametrize("what, claim, failed", [
    ("realm challenge", "realm:10", "realm_signature"),
    ("RIM", "realm:44238", "realm_signature"),
    ("platform measurement", "platform:2399", "platform_signature"),
])
def test_flipped_claims_fail_the_named_check(what, claim, failed):
    raw, cpak = vector("trustee-example")
    platform, realm = claims_of(raw)
    token, key = claim.split(":")
    value = platform[2399][0][2] if claim == "platform:2399" else (realm if token == "realm" else platform)[int(key)]
    verdict = run(flip_value(raw, value), TrustStore.default().with_cpak_file(cpak))
    assert first_failure(verdict) == failed, (what, verdict.reason())


def test_unknown_cpak():
    raw, _ = vector("veraison-tf-rmm")
    verdict = run(raw, trusting(ec.generate_private_key(ec.SECP384R1())))
    assert first_failure(verdict) == "platform_signature" and "not signed by any trusted CPAK" in verdict.reason()


# -- tokens built to the spec ----------------------------------------------------------------

@pytest.mark.parametrize("collection, platform_profile, realm_profile, rak_form, rak_hash, cpak_curve", [
    (399, cb.PLATFORM, cb.REALM, "cose", "sha-256", ec.SECP384R1),
    (907, cb.PLATFORM, cb.REALM, "cose", "sha-512", ec.SECP384R1),
    (399, cb.LEGACY_PLATFORM, None, "raw", "sha-256", ec.SECP384R1),
    (907, "tag:arm.com,2024:cca_platform#2.0.0", "tag:arm.com,2024:realm#2.0.0", "cose", "sha-384", ec.SECP256R1),
    (399, cb.PLATFORM, cb.REALM, "raw", "sha-512", ec.SECP521R1),
])
def test_spec_built_tokens(collection, platform_profile, realm_profile, rak_form, rak_hash, cpak_curve):
    nonce = hashlib.sha384(b"nonce").digest()  # 48 bytes: the driver pads it to 64
    cca = cb.Cca(cpak=ec.generate_private_key(cpak_curve()), challenge=nonce.ljust(64, b"\0"), collection=collection,
                 platform_profile=platform_profile, realm_profile=realm_profile, rak_form=rak_form, rak_hash=rak_hash)
    verdict = run(cca.token(), trusting(cca.cpak, implementation_id=cb.IMPLEMENTATION_ID), inblob=nonce)
    assert verdict.ok, verdict.reason()
    c = verdict.claims
    assert c["cca.profile"] == platform_profile and c.get("cca.realm_profile") == realm_profile
    assert c["cca.rak_hash_algorithm"] == rak_hash and c["measurement"] == cca.rim.hex()
    assert f"tag-{collection} collection" in verdict.checks[0].detail
    assert ("COSE_Key" if rak_form == "cose" else "raw point") in verdict.checks[0].detail


def test_binding_and_challenge_negatives():
    cca = cb.Cca(binder=hashlib.sha256(b"another RAK").digest())
    assert first_failure(run(cca.token(), trusting(cca.cpak))) == "rak_binding"
    good = cb.Cca()
    assert first_failure(run(good.token(), trusting(good.cpak), inblob=b"\x01" * 32)) == "nonce_binding"
    exact = run(good.token(), trusting(good.cpak), report_data=good.challenge)
    assert exact.ok and exact.checks[-1].name == "report_data"


def test_debug_lifecycle_is_refused_by_policy():
    cca = cb.Cca(lifecycle=0x5000)  # recoverable PSA RoT debug
    verdict = run(cca.token(), trusting(cca.cpak))
    assert verdict.ok and verdict.claims["debug"] is True
    assert verdict.claims["cca.platform.lifecycle_state"] == "recoverable_psa_rot_debug"
    assert "debug guest" in ANY_GUEST.decide("x", verdict.claims).reason


@pytest.mark.parametrize("lifecycle, debug", [(0x2FFF, True), (0x3000, False), (0x30FF, False), (0x3100, True)])
def test_only_the_secured_lifecycle_range_is_not_debug(lifecycle, debug):
    # PSA security lifecycle: 0x3000-0x30FF is secured; provisioning (0x2xxx) and 0x3100 on are not.
    cca = cb.Cca(lifecycle=lifecycle)
    verdict = run(cca.token(), trusting(cca.cpak))
    assert verdict.ok and verdict.claims["debug"] is debug, verdict.reason()


def test_init_data_must_be_the_realm_personalization_value():
    """A realm's init-data counts only when the host set its digest as the personalization value (claim
    44235), zero-padded to its 64 bytes; else the genuine realm is refused after it was proven."""
    digest = hashlib.sha384(b"init-data").digest()
    bound = cb.Cca(personalization=digest.ljust(64, b"\0"))
    assert run(bound.token(), trusting(bound.cpak), init_data=digest).checks[-1].name == "init_data"
    assert run(bound.token(), trusting(bound.cpak), init_data=digest).ok
    other = cb.Cca(personalization=hashlib.sha384(b"other").digest().ljust(64, b"\0"))
    refused = run(other.token(), trusting(other.cpak), init_data=digest)
    assert first_failure(refused) == "init_data" and refused.proven
    assert "not the init-data digest" in refused.reason()


@pytest.mark.parametrize("mangle, text", [
    (lambda t: t[:-7], "not valid CBOR"),
    (lambda t: t + b"\0", "bytes after its CBOR item"),
    (lambda t: cbor2.dumps(cbor2.CBORTag(400, cbor2.loads(t).value)), "tag-399 (EAT) or tag-907"),
    (lambda t: cbor2.dumps(cbor2.CBORTag(399, {44234: cbor2.loads(t).value[44234]})), "realm token (44241) is missing"),
    (lambda t: t.replace(cb.PLATFORM.encode(), b"tag:arm.com,2023:cca_platform#9.9.9"), "unknown CCA platform profile"),
    (lambda t: b"\x81" * 500, "CBOR"),
])
def test_malformed_tokens_are_format_failures(mangle, text):
    cca = cb.Cca()
    verdict = run(mangle(cca.token()), trusting(cca.cpak))
    assert [c.name for c in verdict.checks] == ["format"] and text in verdict.reason(), verdict.reason()


def test_verify_command_with_a_jwk_cpak(tmp_path):
    cca = cb.Cca(collection=907)
    (tmp_path / "token.cbor").write_bytes(cca.token())
    key = jwk.JWK.from_pem(cca.cpak.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "cpak.jwk.json").write_text(key.export_public())

    def keybroker(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "keybroker", "verify", str(tmp_path / "token.cbor"), *args],
                              capture_output=True, text=True, timeout=60)

    out = keybroker("--trust-cpak", str(tmp_path / "cpak.jwk.json"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["claims"]["tee"] == "cca", out.stdout + out.stderr
    untrusted = keybroker()
    assert untrusted.returncode == 1 and "FAIL  cpak_trusted" in untrusted.stdout


def with_realm_header(cca: cb.Cca, header: bytes) -> bytes:
    collection = cbor2.loads(cca.token())
    parts = list(cbor2.loads(collection.value[44241]).value)
    parts[0] = header
    return cbor2.dumps(cbor2.CBORTag(399, {**collection.value, 44241: cbor2.dumps(cbor2.CBORTag(18, parts))}))


def shared_dag(depth: int) -> bytes:
    """CBOR for a pair of pairs ... of pairs, ``depth`` deep, each pair one item shared twice (tags 28, 29):
    a few bytes a level, 2**depth items to hash or print."""
    inner = b"\xd8\x1c\x80" + b"".join(cbor2.dumps(cbor2.CBORTag(29, depth - i)) for i in range(depth))
    return b"\xd8\x1c\x82" * depth + inner


@pytest.mark.parametrize("header, text", [
    # {dag: 1, 1: -35}: the key is hashed as it is decoded
    (b"\xa2" + shared_dag(16) + b"\x01\x01\x38\x22", "neither an integer nor a text string"),
    (b"\xa1\x01" + shared_dag(16), "semantic tag 28"),  # {1: dag}: the algorithm is named in the failure
])
def test_shared_references_are_refused(header, text):
    """Value sharing lets a few hundred bytes stand for 2**depth items, which Python hashes or prints in full."""
    cca = cb.Cca()
    verdict = run(with_realm_header(cca, header), trusting(cca.cpak))
    assert [c.name for c in verdict.checks] == ["format"] and text in verdict.reason(), verdict.reason()[:300]
    assert len(verdict.reason()) < 1000


@pytest.mark.parametrize("where", ["lifecycle", "alg", "alg in a list"])
def test_integers_too_long_to_print_are_format_failures(where):
    """A bignum (tag 2) of over 4300 digits, which Python will not turn into text, named in a failure."""
    big = 2**20000
    cca = cb.Cca(lifecycle=big if where == "lifecycle" else 0x3000)
    token = cca.token() if where == "lifecycle" else with_realm_header(cca, cbor2.dumps({1: big if where == "alg"
                                                                                        else [big]}))
    verdict = run(token, trusting(cca.cpak))
    assert [c.name for c in verdict.checks] == ["format"], verdict.reason()[:300]
    assert ("a 20001-bit integer" if where != "alg in a list" else "a list") in verdict.reason()


def test_critical_header_parameters_are_refused():
    """RFC 9052: a parameter the signer lists in crit changes what the message means; one not understood
    refuses it (keybroker understands none)."""
    cca = cb.Cca(realm_header={2: [-65537], -65537: "sealed"})
    verdict = run(cca.token(), trusting(cca.cpak))
    assert [c.name for c in verdict.checks] == ["format"] and "critical parameters" in verdict.reason(), \
        verdict.reason()
    plain = cb.Cca(realm_header={4: b"kid"})  # a parameter not marked critical
    assert run(plain.token(), trusting(plain.cpak)).ok


def test_no_standard_tag_is_interpreted_but_bignums():
    """cbor2 turns some tags into Python objects at a cost out of proportion to their bytes (below); a CCA token
    uses none of them, so each is refused, as any that a later cbor2 interprets would be."""
    for tag in range(65536):
        encoded = cbor2.dumps(cbor2.CBORTag(tag, 0))
        try:
            item = abi._decode(encoded, "the item")
        except EvidenceError:
            continue
        assert tag in (2, 3) or item == cbor2.CBORTag(tag, 0), (tag, item)
    assert abi._decode(cbor2.dumps(2**100), "a bignum") == 2**100


def test_a_decimal_fraction_is_refused_at_once():
    """A decimal fraction's mantissa becomes a Decimal in time quadratic in its size, holding the GIL: 5 s for
    a 250 KB token, during which the key server answered nobody."""
    cca = cb.Cca()
    mantissa = int.from_bytes(b"\xff" * (abi.TOKEN_MAX - 4096), "big")
    collection = cbor2.loads(cca.token())
    token = cbor2.dumps(cbor2.CBORTag(399, {**collection.value, 1: cbor2.CBORTag(4, [1, mantissa])}))
    start = time.monotonic()
    verdict = run(token, trusting(cca.cpak))
    assert time.monotonic() - start < 2
    assert [c.name for c in verdict.checks] == ["format"] and "semantic tag 4" in verdict.reason(), verdict.reason()


@pytest.mark.parametrize("key", [
    lambda j: (j + 8) * (2**61 - 1),  # bignums: Python hashes an integer modulo 2**61 - 1
    lambda j: [j],  # an array (a tuple in Python)
    lambda j: 1.5,  # a float
    lambda j: b"k",  # a byte string
])
def test_map_keys_are_integers_or_text(key):
    """A map key cbor2 would hash as Python does, where hashes can be made to collide: 19000 bignum keys of a
    245 KB token took 2 s to decode, holding the GIL. COSE labels and claim keys are integers or text."""
    cca = cb.Cca()
    collection = cbor2.loads(cca.token())
    extra = {cbor2.dumps(key(j)): None for j in range(3)}
    body = b"".join(k + b"\xf6" for k in extra)
    token = cbor2.dumps(cbor2.CBORTag(399, collection.value))
    assert token[3] == 0xA2  # tag 399 (3 bytes), then the map of two: make it a map of five
    token = token[:3] + bytes([0xA2 + len(extra)]) + token[4:] + body
    verdict = run(token, trusting(cca.cpak))
    assert [c.name for c in verdict.checks] == ["format"] and "neither an integer nor a text string" in verdict.reason()
    for ok in (-(2**64), 2**64 - 1, "text"):  # 64 bits at most, and text strings, as keys
        assert abi._decode(cbor2.dumps({ok: 1}), "a map") == {ok: 1}
    # indefinite lengths: {1: [h'00'], "a": 2}, the text key in chunks; then {[0]: 1}
    assert abi._decode(bytes.fromhex("bf019f5f4100ffff7f6161ff02ff"), "a map") == {1: [b"\0"], "a": 2}
    with pytest.raises(EvidenceError, match="neither an integer"):
        abi._decode(bytes.fromhex("bf8100" "01ff"), "a map")

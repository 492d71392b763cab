"""AMD SEV / SEV-ES (pre-SNP) verification: AMD's real legacy certificates and a real Naples platform's
(vectors/sev-legacy, read at test time), the pins, AEB evidence from the simulated platform, and refusals.

No real ATTESTATION report is public: the report path is tested on the simulated platform,
whose certificates are written by code that shares nothing with the parser.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keybroker.errors import ConfigError, EvidenceError
from keybroker.sim import sevlegacy
from keybroker.sim.roots import SimState
from keybroker.verifier import Context, Evidence, TrustStore, guess_provider, verify
from keybroker.verifier.sev import abi
from keybroker.verifier.sev.verify import ca_signs_platform, ecdsa_signs, rsa_signs
from keybroker.verifier.trust import AMD_SEV_ARKS
from support import REPO
from support import VECTORS as ALL_VECTORS

VECTORS = ALL_VECTORS / "sev-legacy"
GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")
NONCE = bytes(range(64))
DIGEST = bytes(range(100, 132))
POLICY = 0x05 | (0x16 << 24)  # NODBG, ES, API minor 22
ORDER = ["format", "ark", "ask", "cek", "oca", "pek", "report_signature", "mnonce"]


def vector(*parts: str) -> bytes:
    path = VECTORS.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"no SEV legacy vector {path} (see vectors/README.md)")
    return path.read_bytes()


def amd(gen: str, name: str) -> abi.CaCert:
    """AMD's ARK/ASK as virtee/sev ships them (src/certs/sev/builtin/<gen>/, = AMD KDS ask_ark_<gen>.cert)."""
    return abi.parse_ca_cert(vector("amd-builtin", gen, f"{name}.cert"))


def naples(name: str) -> abi.PlatformCert:
    """A real Naples platform's certificate (virtee/sev tests/naples/, 2019)."""
    return abi.parse_platform_cert(vector("virtee-naples", f"{name}.cert"))


# -- real certificates ------------------------------------------------------------------

@pytest.mark.parametrize("gen", GENERATIONS)
def test_amd_arks_are_self_signed_and_sign_their_asks(gen):
    ark, ask = amd(gen, "ark"), amd(gen, "ask")  # amd-builtin/<gen>/{ark,ask}.cert
    assert ark.usage == abi.ARK and ask.usage == abi.ASK and ark.self_issued
    assert ark.modulus_bits == (2048 if gen == "naples" else 4096)
    assert ark.hash.name == ("sha256" if gen == "naples" else "sha384")
    assert rsa_signs(ark, ark.body, ark.signature)
    assert ask.certifying_id == ark.key_id and rsa_signs(ark, ask.body, ask.signature)
    assert not rsa_signs(ask, ark.body, ark.signature)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_the_pins_are_the_vectors_arks(gen):
    raw = vector("amd-builtin", gen, "ark.cert")
    assert AMD_SEV_ARKS[hashlib.sha256(raw).hexdigest()] == gen.capitalize()
    assert hashlib.sha256(vector("amd-builtin", gen, "ask.cert")).hexdigest() not in AMD_SEV_ARKS
    assert set(TrustStore.default().sev_arks) == set(AMD_SEV_ARKS)


def test_the_ask_ark_file_parses_as_amd_publishes_it():
    both = vector("amd-builtin", "milan", "ask.cert") + vector("amd-builtin", "milan", "ark.cert")
    ask, ark = abi.parse_ca_certs(both)
    assert (ask.usage, ark.usage) == (abi.ASK, abi.ARK) and ask.certifying_id == ark.key_id


def test_the_naples_ark_as_first_published_lacks_only_its_signature():
    # virtee-naples/ark.cert.bad + ark.cert.sig == amd-builtin/naples/ark.cert (AMDESE/AMDSEV issue 17)
    bad, sig = vector("virtee-naples", "ark.cert.bad"), vector("virtee-naples", "ark.cert.sig")
    assert bad + sig == vector("amd-builtin", "naples", "ark.cert")
    with pytest.raises(EvidenceError, match="576 bytes, its header says 832"):
        abi.parse_ca_cert(bad)


def test_the_naples_platform_chain_verifies():
    # virtee-naples/{cek,pek,oca,pdh}.cert under amd-builtin/naples/ask.cert
    ask = amd("naples", "ask")
    cek, pek, oca, pdh = (naples(n) for n in ("cek", "pek", "oca", "pdh"))
    assert [c.usage for c in (cek, pek, oca, pdh)] == [abi.CEK, abi.PEK, abi.OCA, abi.PDH]
    assert (cek.curve, pek.algo, pdh.algo) == (2, abi.ECDSA_SHA256, abi.ECDH_SHA256)
    assert ca_signs_platform(ask, cek)                              # ASK -> CEK (RSA-PSS SHA-256)
    assert ecdsa_signs(cek, pek.signed_by(abi.CEK), pek.body)       # CEK -> PEK
    assert ecdsa_signs(oca, oca.signed_by(abi.OCA), oca.body)       # OCA self-signed
    assert ecdsa_signs(oca, pek.signed_by(abi.OCA), pek.body)       # OCA -> PEK
    assert ecdsa_signs(pek, pdh.signed_by(abi.PEK), pdh.body)       # PEK -> PDH
    assert not ecdsa_signs(oca, pek.signed_by(abi.CEK), pek.body)   # each slot has its own signer
    assert (pek.api_major, pek.api_minor) == (0, 16)


def test_the_rome_ask_does_not_sign_the_naples_cek():
    assert not ca_signs_platform(amd("rome", "ask"), naples("cek"))   # amd-builtin/rome/ask.cert


def test_a_trust_roots_folder_pins_an_ark_and_keeps_its_ask(tmp_path):
    (tmp_path / "ask_ark_rome.cert").write_bytes(vector("amd-builtin", "rome", "ask.cert")
                                                 + vector("amd-builtin", "rome", "ark.cert"))
    trust = TrustStore({}).with_dirs([tmp_path])
    assert list(trust.sev_arks.values()) == ["Rome"] and len(trust.sev_certs) == 2
    (tmp_path / "broken.cert").write_bytes(b"\x01\x00\x00\x00" + bytes(70))
    with pytest.raises(ConfigError, match=r"broken\.cert is not AMD's legacy SEV"):
        TrustStore({}).with_dirs([tmp_path])


# -- the simulated platform -------------------------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> tuple[sevlegacy.SevPlatform, SimState]:
    state = SimState(tmp_path_factory.mktemp("sev-legacy"))
    return sevlegacy.platform(state), state


def run(sim, outblob=None, *, auxblob=b"", trust=None, nonce=NONCE, **kw):
    platform, state = sim
    outblob = platform.evidence(nonce[:16], DIGEST, POLICY) if outblob is None else outblob
    trust = TrustStore.default().with_dirs([state.trust_dir]) if trust is None else trust
    return verify(Evidence("sev_aeb", outblob, auxblob, inblob=nonce), Context(trust, **kw))


def names(verdict):
    return [c.name for c in verdict.checks]


def test_the_state_is_created_once_with_private_keys(sim):
    platform, state = sim
    again = sevlegacy.platform(state)
    assert again.cek == platform.cek and again.ark == platform.ark
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (state.path / "sev").glob("*.key"))
    assert (state.trust_dir / sevlegacy.TRUST_FILE).read_bytes() == platform.ask + platform.ark


def test_sim_evidence_verifies_with_the_claims(sim):
    platform, _ = sim
    verdict = run(sim)
    assert verdict.ok, verdict.reason()
    assert names(verdict) == ORDER
    c = verdict.claims
    assert c["tee"] == "sev-es" and c["provider"] == "sev_aeb" and c["debug"] is False and c["unbound"] is True
    assert c["measurement"] == c["sev.launch_digest"] == DIGEST.hex() and c["sev.mnonce"] == NONCE[:16].hex()
    assert c["sev.policy"] == POLICY and c["sev.policy.nodbg"] and c["sev.policy.es"] and not c["sev.policy.noks"]
    assert (c["sev.policy.api_major"], c["sev.policy.api_minor"]) == (0, 0x16)
    assert (c["sev.api_major"], c["sev.api_minor"]) == sevlegacy.API_VERSION
    assert c["sev.product"] is None  # an operator's root, not one of AMD's
    cek = abi.parse_platform_cert(platform.cek)
    point = b"\x04" + cek.x.to_bytes(48, "big") + cek.y.to_bytes(48, "big")
    assert c["sev.chip_key"] == hashlib.sha256(point).hexdigest() and len(c["sev.oca_key"]) == 64


def test_a_plain_sev_debug_guest(sim):
    platform, _ = sim
    verdict = run(sim, platform.evidence(NONCE[:16], DIGEST, 0))
    assert verdict.ok and verdict.claims["tee"] == "sev" and verdict.claims["debug"] is True


def test_the_ask_ark_may_come_from_auxblob_or_a_certs_folder(sim, tmp_path):
    platform, _ = sim
    pinned_only = TrustStore({}, sev_arks={hashlib.sha256(platform.ark).hexdigest(): "simulated"})
    via_aux = run(sim, auxblob=platform.ask_ark, trust=pinned_only)
    assert via_aux.ok and via_aux.claims["sev.product"] == "simulated"
    (tmp_path / "ask_ark.cert").write_bytes(platform.ask_ark)
    (tmp_path / "cek.cert").write_bytes(platform.cek)  # platform certificates in the folder are skipped
    assert run(sim, trust=pinned_only, certs=(tmp_path,)).ok


def test_auxblob_holds_at_most_the_ask_and_the_ark(sim):
    platform, _ = sim
    pinned_only = TrustStore({}, sev_arks={hashlib.sha256(platform.ark).hexdigest(): "simulated"})
    verdict = run(sim, auxblob=platform.ask * 3 + platform.ark, trust=pinned_only)  # each ASK: an RSA verification
    assert not verdict.ok and verdict.failures[0].name == "format"
    assert "more than 2 AMD CA certificates" in verdict.failures[0].detail


def test_refusals(sim):
    platform, _ = sim
    cases = {
        "report_signature": platform.evidence(NONCE[:16], DIGEST, POLICY, corrupt_signature=True),
        "cek": platform.evidence(NONCE[:16], DIGEST, POLICY, broken_chain=True),
    }
    for name, blob in cases.items():
        verdict = run(sim, blob)
        assert not verdict.ok and verdict.failures[0].name == name and names(verdict)[-1] == name
    assert "not signed by the ASK" in run(sim, cases["cek"]).failures[0].detail


def test_an_ask_the_pinned_ark_did_not_sign_is_refused(sim):
    """An ASK naming the pinned ARK as its issuer (and signing the CEK) whose signature is not the
    ARK's: a forged intermediate under a genuine root vouches for nothing."""
    platform, _ = sim
    pinned_only = TrustStore({}, sev_arks={hashlib.sha256(platform.ark).hexdigest(): "simulated"})
    forged = platform.ask[:-1] + bytes([platform.ask[-1] ^ 1])  # the last byte of its signature
    assert abi.parse_ca_cert(forged).certifying_id == abi.parse_ca_cert(platform.ark).key_id
    verdict = run(sim, auxblob=forged + platform.ark, trust=pinned_only)
    assert not verdict.ok and verdict.failures[0].name == "ask", verdict.reason()


def test_a_pek_from_another_owner_is_refused(sim, tmp_path):
    platform, _ = sim
    other = sevlegacy.platform(SimState(tmp_path))
    blob = bytearray(platform.evidence(NONCE[:16], DIGEST, POLICY))
    blob[abi.REPORT_SIZE + 2 * abi.PLATFORM_CERT_SIZE:] = other.oca  # OCA that did not sign this PEK
    verdict = run(sim, bytes(blob))
    assert verdict.failures[0].name == "pek" and "not signed by the OCA" in verdict.failures[0].detail


def test_an_unpinned_ark_is_refused(sim):
    platform, _ = sim
    verdict = run(sim, auxblob=platform.ask_ark, trust=TrustStore.default())
    assert verdict.failures[0].name == "ark" and "not a pinned AMD ARK" in verdict.failures[0].detail
    missing = run(sim, trust=TrustStore.default())
    assert missing.failures[0].name == "ark" and "no AMD ASK" in missing.failures[0].detail


def test_the_chain_is_found_among_every_products_certificates(sim, tmp_path):
    """With AMD's ARKs and ASKs of every product at hand (all pinned), the ASK that signs the CEK is taken,
    then its own issuer: the ARK whose key id the ASK names, not merely the first pinned one."""
    for gen in GENERATIONS:
        (tmp_path / f"ask_ark_{gen}.cert").write_bytes(vector("amd-builtin", gen, "ask.cert")
                                                       + vector("amd-builtin", gen, "ark.cert"))
    verdict = run(sim, certs=(tmp_path,))
    assert verdict.ok, verdict.reason()


def test_a_pinned_ark_is_preferred_to_a_sent_one_of_the_same_key_id(sim):
    """A guest's auxblob may hold an ARK with the genuine ARK's key id that is not pinned (here its
    signature changed): the pinned ARK with that key id is taken first, not the one sent."""
    platform, _ = sim
    other = platform.ark[:-1] + bytes([platform.ark[-1] ^ 1])
    assert abi.parse_ca_cert(other).key_id == abi.parse_ca_cert(platform.ark).key_id
    verdict = run(sim, auxblob=platform.ask + other)
    assert verdict.ok, verdict.reason()


def test_a_real_amd_ark_does_not_vouch_for_the_simulated_chip(sim):
    rome = vector("amd-builtin", "rome", "ask.cert") + vector("amd-builtin", "rome", "ark.cert")
    verdict = run(sim, auxblob=rome, trust=TrustStore.default())
    assert verdict.failures[0].name == "cek" and "(Rome)" in verdict.failures[0].detail
    assert [c.ok for c in verdict.checks[:3]] == [True, True, True]


def test_the_broker_must_use_the_requested_mnonce(sim):
    platform, _ = sim
    verdict = run(sim, platform.evidence(bytes(16), DIGEST, POLICY))
    assert verdict.failures[0].name == "mnonce"
    assert "the broker did not use the requested MNONCE: freshness not shown" in verdict.failures[0].detail
    assert run(sim, report_data=NONCE[:16]).ok


def test_init_data_cannot_be_bound(sim):
    """A guest that presents init-data with SEV evidence is refused: no field of the report binds it, so its
    claims (init_data.digest, …) would be the requester's word alone."""
    verdict = run(sim, init_data=bytes(32))
    assert not verdict.ok and verdict.failures[0].name == "init_data", verdict.checks
    assert "cannot be verified" in verdict.failures[0].detail


def _format_failure(sim, blob, auxblob=b""):
    verdict = run(sim, blob, auxblob=auxblob)
    assert not verdict.ok and [c.name for c in verdict.failures] == ["format"], verdict.checks
    return verdict.failures[0].detail


def test_malformed_blobs_fail_the_format_check(sim):
    platform, _ = sim
    good = platform.evidence(NONCE[:16], DIGEST, POLICY)
    assert "expected 6460" in _format_failure(sim, good[:-1])
    assert "expected 6460" in _format_failure(sim, good + b"\0")
    assert "expected 6460" in _format_failure(sim, b"")
    assert _format_failure(sim, bytes(6460))
    assert "auxblob" in _format_failure(sim, good, auxblob=b"garbage")
    assert "truncated" in _format_failure(sim, good, auxblob=platform.ask_ark[:-1])


def _patch(blob: bytes, offset: int, fmt: str, value: int | None) -> bytes:
    out = bytearray(blob)
    if value is None:
        out[offset] ^= 1
    else:
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize("offset, fmt, value, reason", [
    (0x30, "<I", 1 << 6, "reserved bits 6-15"),
    (0x38, "<I", abi.RSA_SHA256, "SIG_ALGO"),
    (0x3C, "<I", 1, "reserved field"),
    (208, "<I", 2, "version is 2"),
    (208 + 8, "<I", abi.PEK, "expected CEK"),
    (208 + 12, "<I", abi.ECDH_SHA256, "key algorithm"),
    (208 + 16, "<I", 3, "on curve 3"),
    (208 + 20 + 60, "<B", 1, "beyond its P-384 point"),
    (208 + 20, "<B", None, "not a point"),
    (208 + 1044 + 4, "<I", 7, "algorithm 0x7"),
    (208 + 2084 + 1564 + 4, "<I", 0, "no algorithm but content"),
    (208 + 2084 + 8, "<I", abi.OCA, "expected PEK"),
])
def test_bad_field_values_fail_the_format_check(sim, offset, fmt, value, reason):
    platform, _ = sim
    blob = _patch(platform.evidence(NONCE[:16], DIGEST, POLICY), offset, fmt, value)
    assert reason in _format_failure(sim, blob)


def test_guess_provider_knows_aeb_evidence(sim):
    platform, _ = sim
    assert guess_provider(platform.evidence(NONCE[:16], DIGEST, POLICY)) == "sev_aeb"
    assert guess_provider(bytes(6460)) is None


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=7000))
def test_the_parsers_raise_only_evidence_errors(data):
    for parse in (abi.parse_evidence, abi.parse_ca_certs, abi.parse_platform_cert, abi.parse_report):
        try:
            parse(data)
        except EvidenceError:
            pass


@FUZZ
@given(st.integers(0, 6459), st.binary(min_size=1, max_size=8), st.booleans())
def test_mutated_evidence_always_gets_a_verdict(sim, at, patch, insert):
    platform, _ = sim
    good = platform.evidence(NONCE[:16], DIGEST, POLICY)
    blob = good[:at] + patch + good[at + (0 if insert else len(patch)):]
    verdict = run(sim, blob)
    assert verdict.ok is (blob == good), verdict.reason()


def test_keybroker_verify_prints_the_checks_and_claims(sim, tmp_path):
    platform, state = sim
    path = tmp_path / "evidence.bin"
    path.write_bytes(platform.evidence(NONCE[:16], DIGEST, POLICY))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "keybroker", "verify", str(path), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    out = cli("--provider", "sev_aeb", "--trust-roots", str(state.trust_dir), "--report-data", NONCE[:16].hex())
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("report_signature", "sev.chip_key", "sev-es", DIGEST.hex()):
        assert word in out.stdout
    (tmp_path / "ask_ark.cert").write_bytes(platform.ask_ark)
    refused = cli("--certs", str(tmp_path))  # guessed provider; the simulated ARK is not pinned
    assert refused.returncode == 1 and "not a pinned AMD ARK" in refused.stdout + refused.stderr


def test_a_certs_folder_file_gone_since_it_was_listed_is_named(tmp_path, monkeypatch):
    """The --certs folders are read at each attestation: a file removed between the listing and its
    reading was an OSError out of the verifier (a key server's 500), not an error naming the file."""
    import pathlib

    from keybroker.verifier.sev.verify import load_ca_dir

    (tmp_path / "ask_ark.cert").write_bytes(b"")
    stat, seen = pathlib.Path.stat, []

    def racing(path, **kw):
        if path.name == "ask_ark.cert":
            seen.append(path)
            if len(seen) == 2:  # is_file() has stat()ed it: gone since
                path.unlink()
        return stat(path, **kw)

    monkeypatch.setattr(pathlib.Path, "stat", racing)
    with pytest.raises(EvidenceError, match=r"ask_ark\.cert: No such file or directory"):
        load_ca_dir(tmp_path)

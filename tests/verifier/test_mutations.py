"""Mutated evidence: the parsers and verifiers answer every input with a verdict, and no change to a
signed byte verifies.

Property tests (hypothesis) over genuine evidence from the emulator's simulated platforms:
bit flips, overwritten, inserted and removed bytes, truncation, and mutated certificates in
the places that carry them. Only keybroker's own errors may come out of a parser, and
``verify`` must always return a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keybroker.errors import EvidenceError
from keybroker.sim import providers
from keybroker.sim.roots import SimState
from keybroker.verifier import Context, Evidence, TrustStore, verify
from keybroker.verifier.cca.abi import parse_token
from keybroker.verifier.certs import load_certs
from keybroker.verifier.tdx.abi import parse_quote

NONCE = bytes(range(64))
FAST = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass(frozen=True)
class Genuine:
    provider: str
    outblob: bytes
    auxblob: bytes
    signed: tuple[tuple[int, int], ...]  # byte ranges of the outblob that signatures cover
    trust: TrustStore

    def verdict(self, outblob: bytes | None = None, auxblob: bytes | None = None):  # type: ignore[no-untyped-def]
        evidence = Evidence(self.provider, self.outblob if outblob is None else outblob,
                            self.auxblob if auxblob is None else auxblob, inblob=NONCE)
        return verify(evidence, Context(self.trust, nonce=NONCE))


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, Genuine]:
    state = SimState(tmp_path_factory.mktemp("mutations"))
    snp, tdx, cca = state.snp(), state.tdx(), state.cca()
    trust = TrustStore.default().with_dirs([state.trust_dir])
    report = providers.snp_report(snp, report_data=NONCE, vmpl=0)
    table = providers.snp_cert_table(snp)
    quote = providers.tdx_quote_v4(tdx, report_data=NONCE)
    parsed = parse_quote(quote)
    qe_at = quote.index(parsed.qe_report.raw)
    token = providers.cca_token(cca, challenge=NONCE)
    sign1s = parse_token(token)
    payloads = tuple((token.index(s.payload), token.index(s.payload) + len(s.payload))
                     for s in (sign1s.platform, sign1s.realm))
    made = {
        "snp": Genuine("sev_guest", report, table, ((0, 0x4A0),), trust),
        # The quote's header and body (the attestation key's signature), the QE report and its signature.
        "tdx": Genuine("tdx_guest", quote, b"", ((0, len(parsed.signed)), (qe_at, qe_at + 384 + 64)), trust),
        "cca": Genuine("arm_cca_guest", token, b"", payloads, trust),
    }
    for name, evidence in made.items():
        assert evidence.verdict().ok, (name, evidence.verdict().reason())
    return made


@st.composite
def mutation(draw, size: int) -> tuple[str, int, int, bytes]:  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
    at = draw(st.integers(0, size - 1))
    if kind == "flip":
        return kind, at, at + 1, bytes([1 << draw(st.integers(0, 7))])
    if kind == "overwrite":
        data = draw(st.binary(min_size=1, max_size=16))
        return kind, at, min(at + len(data), size), data
    if kind == "insert":
        return kind, at, at, draw(st.binary(min_size=1, max_size=16))
    if kind == "delete":
        return kind, at, min(at + draw(st.integers(1, 64)), size), b""
    return kind, at, size, b""


def apply(blob: bytes, change: tuple[str, int, int, bytes]) -> bytes:
    kind, start, end, data = change
    if kind == "flip":
        return blob[:start] + bytes([blob[start] ^ data[0]]) + blob[start + 1:]
    return blob[:start] + data + blob[end:]


def touches_signed(change: tuple[str, int, int, bytes], blob: bytes, mutated: bytes,
                   signed: tuple[tuple[int, int], ...]) -> bool:
    kind, start, end, _ = change
    if mutated == blob:
        return False
    last = max(b for _, b in signed)
    if kind in ("insert", "delete", "truncate"):
        return start < last  # everything after the change moves
    return any(start < b and end > a for a, b in signed)


@pytest.mark.parametrize("name", ["snp", "tdx", "cca"])
def test_mutated_outblobs_get_a_verdict_and_never_verify_when_signed_bytes_changed(genuine, name):
    evidence = genuine[name]

    @FAST
    @given(change=mutation(len(evidence.outblob)))
    def check(change):  # type: ignore[no-untyped-def]
        mutated = apply(evidence.outblob, change)
        verdict = evidence.verdict(outblob=mutated)  # raises nothing but by a bug
        if touches_signed(change, evidence.outblob, mutated, evidence.signed):
            assert not verdict.ok, (change, verdict.checks)

    check()


def test_mutated_certificate_tables_get_a_verdict(genuine):
    evidence = genuine["snp"]

    @FAST
    @given(change=mutation(len(evidence.auxblob)))
    def check(change):  # type: ignore[no-untyped-def]
        verdict = evidence.verdict(auxblob=apply(evidence.auxblob, change))
        if verdict.ok:  # only a change outside every certificate's signed bytes could keep the chain
            assert verdict.claims == evidence.verdict().claims

    check()


def test_mutated_certificates_fail_as_keybroker_errors(genuine):
    ders = []
    table = genuine["snp"].auxblob
    for start in range(0, 72, 24):  # the three entries: offset and length of each DER
        offset = int.from_bytes(table[start + 16:start + 20], "little")
        length = int.from_bytes(table[start + 20:start + 24], "little")
        ders.append(table[offset:offset + length])

    @FAST
    @given(which=st.integers(0, 2), change=st.data())
    def check(which, change):  # type: ignore[no-untyped-def]
        der = ders[which]
        mutated = apply(der, change.draw(mutation(len(der))))
        try:
            load_certs(mutated)
        except EvidenceError:
            pass

    check()


@pytest.mark.parametrize("alg", [[-7], {"a": 1}, "ES256", -7.0, None, 2**70, [[], {}]])
def test_odd_cose_algorithms_are_evidence_errors(genuine, alg):
    """A protected header's algorithm of another type than an integer (a list is unhashable)."""
    import cbor2

    for key in (44234, 44241):
        collection = cbor2.loads(genuine["cca"].outblob)
        sign1 = cbor2.loads(collection.value[key])
        parts = list(sign1.value if isinstance(sign1, cbor2.CBORTag) else sign1)
        parts[0] = cbor2.dumps({1: alg})
        tokens = {**collection.value, key: cbor2.dumps(cbor2.CBORTag(18, parts))}
        verdict = genuine["cca"].verdict(outblob=cbor2.dumps(cbor2.CBORTag(collection.tag, tokens)))
        assert verdict.failures[0].name == "format" and "algorithm" in verdict.failures[0].detail

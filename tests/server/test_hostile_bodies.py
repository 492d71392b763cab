"""Over HTTP, hostile bodies never yield a 5xx and mutated evidence never releases.

Genuine SEV-SNP evidence is made for each session from the emulator's simulated platform
(bound to the session's nonce and a fresh tee key), then mutated: bytes of the report or
of its certificate table, JSON members swapped for values of the wrong type, deep nesting,
huge numbers, broken base64, tee keys that are no points on their curve.
"""

from __future__ import annotations

import base64
import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk

from keybroker.sim import providers
from keybroker.sim.roots import SimState
from keybroker.verifier.cca.abi import parse_token
from keybroker.verifier.tdx.abi import parse_quote
from keybroker.wire import envelope, trustee
from keybroker.wire import rcar as p
from keybroker.wire.envelope import TsmReport
from support.kbs import challenge

SECRET = b"only for the genuine"
HOSTILE = settings(max_examples=150, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ODD_VALUES = [None, True, 0, -1, 2**200, 1.5e308, "", "x" * 5000, [], [[]], {}, {"a": {"b": []}},
              "[" * 1000, "\u0000", "not base64!"]


@pytest.fixture
def server(tsm_sim, sim_state, kbs):
    state = SimState(sim_state)
    state.snp(), state.tdx(), state.cca()  # all three simulated platforms, whose roots the server trusts
    server = kbs("--rate-limit", "0", "--kds-url", "")
    server.put("default/key/a", SECRET)
    return server


def genuine_body(sim_state, nonce: str, tee: str = "snp", form: str = "envelope") -> tuple[jwk.JWK, dict]:
    """A tee key and the /attest body of genuine evidence bound to ``nonce`` and it, in the
    envelope or in Trustee's form."""
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    public = json.loads(key.export_public()) | {"alg": p.KEY_ALGORITHM}
    inblob = p.report_data(nonce, public)
    state = SimState(sim_state)
    if tee == "snp":
        ident = state.snp()
        report = providers.snp_report(ident, report_data=inblob, vmpl=0)
        table = providers.snp_cert_table(ident)
        tsm = TsmReport(provider="sev_guest", generation=1, inblob=inblob, outblob=report, auxblob=table)
    elif tee == "tdx":
        tsm = TsmReport(provider="tdx_guest", generation=1, inblob=inblob,
                        outblob=providers.tdx_quote_v4(state.tdx(), report_data=inblob))
    else:
        tsm = TsmReport(provider="arm_cca_guest", generation=1, inblob=inblob,
                        outblob=providers.cca_token(state.cca(), challenge=inblob))
    primary = envelope.to_json(tsm) if form == "envelope" else trustee.to_json(tsm.provider, tsm.outblob, tsm.auxblob)
    return key, p.Attestation(nonce, public, primary).to_json()


def paths(node, prefix=()):  # type: ignore[no-untyped-def]
    """Every place in a JSON document: a key path."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))


def replace_at(doc, path, value):  # type: ignore[no-untyped-def]
    if not path:
        return value
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def signed_bytes(blob: bytes, tee: str) -> range:
    """Where in an outblob a change must break a signature: the whole SNP report, the TDX quote's
    header and body, the CCA realm token's claims. (A TDX PEM chain or a COSE unprotected header
    can take changes that leave every signed byte as it was.)"""
    if tee == "tdx":
        return range(len(parse_quote(blob).signed))
    if tee == "cca":
        payload = parse_token(blob).realm.payload
        return range(blob.index(payload), blob.index(payload) + len(payload))
    return range(len(blob))


def blob_mutation(name: str, draw, tee: str = "snp") -> callable:  # type: ignore[no-untyped-def,valid-type]
    """A change to a base64 blob of the envelope: bytes flipped, overwritten or cut (of the
    outblob, at a signed byte)."""
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate"]))
    at = draw(st.integers(0, 10_000))
    value = draw(st.binary(min_size=1, max_size=8))

    def change(body: dict) -> dict:
        body = copy.deepcopy(body)
        evidence = body["tee-evidence"]["primary_evidence"]
        blob = bytearray(base64.b64decode(evidence[name]))
        places = signed_bytes(bytes(blob), tee) if name == "outblob" else range(len(blob))
        where = places[at % len(places)]
        if kind == "flip":
            blob[where] ^= value[0] or 1
        elif kind == "overwrite":
            blob[where:where + len(value)] = value
        else:
            del blob[where:]
        evidence[name] = base64.b64encode(bytes(blob)).decode()
        return body
    return change


def attest_and_fetch(server, sim_state, change, tee: str = "snp",  # type: ignore[no-untyped-def]
                     form: str = "envelope") -> tuple[int, int | None, bool]:
    http, nonce = challenge(server.url, tee)
    _key, body = genuine_body(sim_state, nonce, tee, form)
    mutated = change(body)
    data = mutated if isinstance(mutated, (bytes, str)) else json.dumps(mutated)
    attested = http.post(f"{server.url}/kbs/v0/attest", data=data, headers={"Content-Type": "application/json"},
                         timeout=30)
    fetched = http.get(f"{server.url}/kbs/v0/resource/default/key/a", timeout=30)
    return attested.status_code, fetched.status_code, mutated == body


def test_mutated_certificate_tables_are_never_a_5xx(server, sim_state):
    @HOSTILE
    @given(data=st.data())
    def check(data):  # type: ignore[no-untyped-def]
        attested, fetched, _ = attest_and_fetch(server, sim_state, blob_mutation("auxblob", data.draw))
        assert attested < 500 and fetched < 500, (attested, fetched)
        # A table that still holds a valid chain changes nothing the signatures vouch for.
        assert fetched == (200 if attested == 200 else 401)

    check()


@pytest.mark.parametrize("tee", ["snp", "tdx", "cca"])
def test_a_changed_report_quote_or_token_never_releases(server, sim_state, tee):
    @HOSTILE
    @given(data=st.data())
    def check(data):  # type: ignore[no-untyped-def]
        attested, fetched, unchanged = attest_and_fetch(server, sim_state, blob_mutation("outblob", data.draw, tee),
                                                        tee)
        if not unchanged:
            assert attested in (400, 401) and fetched == 401, (attested, fetched)

    check()


def test_json_of_the_wrong_shape_is_a_4xx(server, sim_state):
    _, template = genuine_body(sim_state, "n")
    places = list(paths(template))

    @HOSTILE
    @given(where=st.sampled_from(places), value=st.sampled_from(ODD_VALUES) | st.integers() | st.text(max_size=64))
    def check(where, value):  # type: ignore[no-untyped-def]
        attested, fetched, unchanged = attest_and_fetch(server, sim_state, lambda body: replace_at(body, where, value))
        assert attested < 500 and fetched < 500
        if not unchanged and attested == 200:  # only the envelope's unsigned counter may take another value
            assert where[-1:] == ("generation",) and type(value) is int and 0 <= value < 2**64, (where, value)

    check()


@pytest.mark.parametrize("tee", ["snp", "tdx", "cca"])
def test_trustee_evidence_of_the_wrong_shape_is_a_4xx(server, sim_state, tee):
    _, template = genuine_body(sim_state, "n", tee, "trustee")
    places = list(paths(template))

    @HOSTILE
    @given(where=st.sampled_from(places), value=st.sampled_from(ODD_VALUES) | st.integers() | st.text(max_size=64))
    def check(where, value):  # type: ignore[no-untyped-def]
        attested, fetched, unchanged = attest_and_fetch(server, sim_state, lambda body: replace_at(body, where, value),
                                                        tee, "trustee")
        assert attested < 500 and fetched < 500
        if not unchanged and attested == 200:  # only what no signature covers may change: the TDX
            # event log (not replayed), an SNP TCB's fmc (the sev crate does not encode it on Genoa)
            fmc = value is None or (type(value) is int and 0 <= value < 256)
            assert where[-1:] == ("cc_eventlog",) or (where[-1:] == ("fmc",) and fmc), (where, value)

    check()


@pytest.mark.parametrize("body", ["[" * 200_000, "{\"a\":" * 100_000, "1" * 10_000, "1e999999", "\"\\ud800\""])
def test_pathological_json_is_a_400(server, body):
    http, _ = challenge(server.url)
    answer = http.post(f"{server.url}/kbs/v0/attest", data=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["type"].endswith("BadRequest")


@pytest.mark.parametrize("nested", ["[" * 3000 + "]" * 3000, "{a=" * 3000 + "1" + "}" * 3000])
def test_init_data_nested_too_deeply_is_refused_not_a_500(server, sim_state, nested):
    init_data = {"format": "toml", "body": f'version = "0.1.0"\nalgorithm = "sha384"\nx = {nested}\n'}
    attested, fetched, _ = attest_and_fetch(server, sim_state, lambda body: body | {"init-data": init_data})
    assert (attested, fetched) == (401, 401)
    assert "init-data nests arrays or tables too deeply" in server.log_path.read_text()


@pytest.mark.parametrize("line, logged", [
    (f'x = {"9" * 4400}', "init-data holds a value TOML cannot read"),  # past Python's 4300 digits
    (f'algorithm = 0x{"f" * 20000}', "init-data algorithm <an integer of 80000 bits> is not one of"),  # read, not shown
    ("algorithm = [1]", "init-data algorithm [1] is not one of"),  # no key of a table
    ("algorithm = {a = 1}", "init-data algorithm {'a': 1} is not one of"),
])
def test_init_data_with_a_value_python_will_not_read_or_look_up_is_refused_not_a_500(server, sim_state, line, logged):
    body = f'version = "0.1.0"\n{line}\n' if line.startswith("algorithm") else \
        f'version = "0.1.0"\nalgorithm = "sha384"\n{line}\n'
    init_data = {"format": "toml", "body": body}
    attested, fetched, _ = attest_and_fetch(server, sim_state, lambda body: body | {"init-data": init_data})
    assert (attested, fetched) == (401, 401)
    assert logged in server.log_path.read_text()


@pytest.mark.parametrize("form", ["escaped", "encoded", "utf-16"])
@pytest.mark.parametrize("where", [("runtime-data", "nonce"), ("tee-evidence", "additional_evidence"),
                                   ("tee-evidence", "primary_evidence", "provider")])
def test_a_lone_surrogate_anywhere_is_a_400_that_spends_nothing(server, sim_state, where, form):
    """JSON may escape half a UTF-16 pair (\\ud800), or carry it encoded (UTF-8's ED A0 80, or a
    body in UTF-16); no text, hash or column can hold it."""
    http, nonce = challenge(server.url)
    _, body = genuine_body(sim_state, nonce)
    text = json.dumps(replace_at(body, where, "\ud800 or " + str(nonce)))
    hostile = {"escaped": text.encode(), "encoded": text.encode().replace(b"\\ud800", b"\xed\xa0\x80"),
               "utf-16": text.replace("\\ud800", "x").encode("utf-16")}[form]
    answer = http.post(f"{server.url}/kbs/v0/attest", data=hostile, headers={"Content-Type": "application/json"})
    reason = {"escaped": "surrogate", "encoded": "codec can't decode", "utf-16": "codec can't decode"}[form]
    assert answer.status_code == 400 and reason in answer.json()["detail"], answer.text
    genuine = http.post(f"{server.url}/kbs/v0/attest", json=body)  # the nonce is still unspent
    assert genuine.status_code == 200, genuine.text


@pytest.mark.parametrize("coordinate, named", [
    ("AAAAA", "not a base64url P-256 coordinate"),              # a length base64 cannot have
    ("A" * 43, "not a point on P-256"),                         # 32 zero bytes
    (base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="), "not a point on P-256"),
], ids=["short", "zero", "random"])  # ids, not the random values: pytest-xdist's workers collect alike
def test_tee_keys_that_are_no_keys_are_refused_at_attest(server, sim_state, coordinate, named):
    def change(body):  # type: ignore[no-untyped-def]
        return replace_at(body, ("runtime-data", "tee-pubkey", "y"), coordinate)

    http, nonce = challenge(server.url)
    _, body = genuine_body(sim_state, nonce)
    answer = http.post(f"{server.url}/kbs/v0/attest", json=change(body))
    assert answer.status_code == 400 and named in answer.json()["detail"], answer.text
    assert http.get(f"{server.url}/kbs/v0/resource/default/key/a").status_code == 401


@pytest.mark.parametrize("tee", ["snp", "tdx", "cca"])
def test_the_genuine_evidence_is_released(server, sim_state, tee):
    attested, fetched, unchanged = attest_and_fetch(server, sim_state, lambda body: body, tee)
    assert (attested, fetched, unchanged) == (200, 200, True)

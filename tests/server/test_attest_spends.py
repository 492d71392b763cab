"""/attest and a release in process, with the appraisal stubbed: what the key server does with a verdict
(the nonce spent once across workers and replicas, a refusal's record, the token's end, the release's
record), whatever evidence made it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.server import audit
from keybroker.server import store as store_module
from keybroker.server.admin import Admin
from keybroker.server.audit import ALLOW, ATTEST, DENY, RELEASE, Event
from keybroker.server.kbs import KeyServer, Problem, session_ref
from keybroker.server.metrics import Metrics
from keybroker.server.sealing import Kek, Sealer
from keybroker.server.sessions import Session
from keybroker.server.store import PURGE_MARGIN, Store
from keybroker.server.tokens import TokenSigner
from keybroker.verifier import TrustStore
from keybroker.wire import jwe
from keybroker.wire import rcar as p
from support.policies import ANY_GUEST_DOCUMENT

KEK = Kek.from_bytes(bytes(range(32)), "test")
PATH = "default/key/a"
CLAIMS = {"tee": "cca", "debug": False, "measurement": "m"}


def replica(url: str, tokens: TokenSigner | None = None) -> KeyServer:
    """A key server (a worker or replica) on the database ``url``, whose appraisal says ``CLAIMS``."""
    sealer = Sealer(KEK)
    kbs = KeyServer(store=Store(url, sealer), sealer=sealer, trust=TrustStore.default(),
                    tokens=tokens or TokenSigner(), metrics=Metrics(), name="test")

    async def appraised(tee: str, attestation: p.Attestation, size: int) -> dict:
        return dict(CLAIMS)
    kbs._appraised = appraised  # type: ignore[method-assign]
    return kbs


def setup(tmp_path) -> tuple[str, KeyServer, Admin]:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/kbs.db"
    kbs = replica(url)
    admin = Admin(kbs.store, kbs.sealer, "local:test", "test")
    admin.put_policy(json.dumps(ANY_GUEST_DOCUMENT))
    admin.put_resource(PATH, b"the value")
    return url, kbs, admin


def tee_key() -> tuple[ec.EllipticCurvePrivateKey, dict[str, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, p.check_tee_pubkey(jwe.public_jwk(key.public_key()) | {"alg": "ECDH-ES+A256KW"})


def attest(kbs: KeyServer, cookie: str, nonce: str, pubkey: dict[str, str]) -> str:
    """The token, or the name of the problem /attest answered with."""
    body = p.Attestation(nonce, pubkey, {"evidence": "stubbed"}).to_json()
    try:
        return asyncio.run(kbs.attest(cookie, body, "peer", size=100))["token"]
    except Problem as problem:
        return problem.name


def events(kbs: KeyServer, kind: str) -> list[Event]:
    return [r.event for r in audit.records(kbs.store.engine) if r.event.event == kind]


def test_a_nonce_attested_on_one_replica_is_spent_on_every_other(tmp_path):
    """The other replica has not stored the session (its cache knows nothing): the attestation's transaction
    refuses it, and what it tried (another tee key) is remembered nowhere."""
    url, first, _ = setup(tmp_path)
    second = replica(url)
    cookie, challenge = asyncio.run(first.auth(p.AuthRequest("cca").to_json()))
    winner, winners_key = tee_key()
    _, other_key = tee_key()
    assert attest(first, cookie, challenge["nonce"], winners_key).count(".") == 2
    assert attest(second, cookie, challenge["nonce"], other_key) == p.UNKNOWN_SESSION
    assert attest(first, cookie, challenge["nonce"], other_key) == p.UNKNOWN_SESSION
    for kbs in (second, first, replica(url)):
        answer = asyncio.run(kbs.release(PATH, cookie, None, "peer"))
        assert bytes(jwe.unwrap(answer.jwe, winner)) == b"the value"
    assert [e.decision for e in events(first, ATTEST)] == [ALLOW]


def test_a_store_remembers_only_the_session_it_stored(tmp_path):
    """A session refused as stored already (by a concurrent /attest of this worker) is not cached in its
    place: the guest that attested first keeps its key and claims on this worker too."""
    store = Store(f"sqlite:///{tmp_path}/kbs.db", Sealer(KEK))
    first = Session("s1", "cca", "n", "attested", time.time() + 300, {"kty": "EC", "x": "first"}, {"tee": "cca"})
    second = Session("s1", "cca", "n", "attested", time.time() + 300, {"kty": "EC", "x": "second"}, {"tee": "x"})
    event = Event(ATTEST, ALLOW, "test", "a")

    async def both() -> Session | None:
        assert await store.end_attestation(first, event) is not None
        assert await store.end_attestation(second, event) is None
        return await store.get_session("s1")
    assert asyncio.run(both()) == first


def test_a_proven_refusal_spends_the_nonce_on_the_record_and_attests_nothing(tmp_path):
    url, kbs, _ = setup(tmp_path)

    async def refused(tee: str, attestation: p.Attestation, size: int) -> dict:
        raise Problem(p.ATTESTATION_DENIED, "evidence did not verify: tcb too old", "evidence_tcb", proven=True)
    kbs._appraised = refused  # type: ignore[method-assign]
    cookie, challenge = asyncio.run(kbs.auth(p.AuthRequest("cca").to_json()))
    _, pubkey = tee_key()
    assert attest(kbs, cookie, challenge["nonce"], pubkey) == p.ATTESTATION_DENIED
    [record] = events(kbs, ATTEST)
    assert (record.decision, record.reason) == (DENY, "evidence did not verify: tcb too old")
    other = replica(url)  # the nonce is spent on another replica too, where this refusal would repeat
    other._appraised = refused  # type: ignore[method-assign]
    assert attest(other, cookie, challenge["nonce"], pubkey) == p.UNKNOWN_SESSION
    assert attest(replica(url), cookie, challenge["nonce"], pubkey) == p.UNKNOWN_SESSION
    assert len(events(kbs, ATTEST)) == 1
    with pytest.raises(Problem) as caught:
        asyncio.run(replica(url).release(PATH, cookie, None, "peer"))
    assert caught.value.name == p.NOT_ATTESTED


def test_an_attestation_that_failed_inside_the_server_spends_its_nonce(tmp_path):
    url, kbs, _ = setup(tmp_path)

    async def broken(tee: str, attestation: p.Attestation, size: int) -> dict:
        raise RuntimeError("a verifier bug")
    kbs._appraised = broken  # type: ignore[method-assign]
    cookie, challenge = asyncio.run(kbs.auth(p.AuthRequest("cca").to_json()))
    _, pubkey = tee_key()
    with pytest.raises(RuntimeError):
        attest(kbs, cookie, challenge["nonce"], pubkey)
    assert [(e.decision, e.reason) for e in events(kbs, ATTEST)] == [(DENY, "internal error")]
    assert attest(replica(url), cookie, challenge["nonce"], pubkey) == p.UNKNOWN_SESSION


def test_the_token_attest_issues_ends_with_its_session_under_a_longer_token_lifetime(tmp_path):
    url, _, _ = setup(tmp_path)
    signer = TokenSigner(lifetime=3600)
    kbs = replica(url, signer)
    cookie, challenge = asyncio.run(kbs.auth(p.AuthRequest("cca").to_json()))
    token = attest(kbs, cookie, challenge["nonce"], tee_key()[1])
    claims = signer.verify(token)
    assert claims is not None and claims["exp"] == int(cookie.split(".")[2])


def test_a_release_is_recorded_as_allowed_under_its_policy_for_its_session(tmp_path):
    _, kbs, _ = setup(tmp_path)
    cookie, challenge = asyncio.run(kbs.auth(p.AuthRequest("cca").to_json()))
    attest(kbs, cookie, challenge["nonce"], tee_key()[1])
    answer = asyncio.run(kbs.release(PATH, cookie, None, "peer"))
    [record] = [r for r in audit.records(kbs.store.engine) if r.event.event == RELEASE]
    assert record.hash == answer.audit
    assert (record.event.decision, record.event.resource, record.event.policy_version, record.event.session,
            record.event.measurement) == (ALLOW, PATH, 1, session_ref(cookie.split(".")[0]), "m")


def test_a_resource_that_does_not_unseal_is_recorded_past_the_sessions_refusals(tmp_path):
    """Past REFUSALS_MAX a session's refusals are counted only; a server fault is recorded all the same."""
    import sqlite3

    from keybroker.server.kbs import REFUSALS_MAX

    _, kbs, _ = setup(tmp_path)
    cookie, challenge = asyncio.run(kbs.auth(p.AuthRequest("cca").to_json()))
    attest(kbs, cookie, challenge["nonce"], tee_key()[1])
    for _ in range(REFUSALS_MAX + 1):
        with pytest.raises(Problem):
            asyncio.run(kbs.release("default/key/none", cookie, None, "peer"))
    assert len(events(kbs, RELEASE)) == REFUSALS_MAX
    with sqlite3.connect(tmp_path / "kbs.db") as db:
        db.execute("UPDATE resources SET sealed = x'00' WHERE path = ?", (PATH,))
    with pytest.raises(Problem) as caught:
        asyncio.run(kbs.release(PATH, cookie, None, "peer"))
    assert caught.value.name == p.INTERNAL
    assert events(kbs, RELEASE)[-1].reason.startswith(f"resource {PATH} cannot be unsealed")


def test_a_session_stays_stored_for_purge_margin_after_its_end(tmp_path, monkeypatch):
    """Its nonce stays spent on a replica whose clock is behind by less than PURGE_MARGIN; older rows go."""
    store = Store(f"sqlite:///{tmp_path}/kbs.db", Sealer(KEK))
    start = time.time()
    event = Event(ATTEST, ALLOW, "test", "a")

    def stored(session_id: str, ends: float) -> None:
        session = Session(session_id, "cca", "n", "attested", ends, {"kty": "EC"}, {"tee": "cca"})
        assert asyncio.run(store.end_attestation(session, event)) is not None

    stored("old", start + 10)
    stored("recent", start + 300)
    now = start + 10 + PURGE_MARGIN + 50  # "old" ended PURGE_MARGIN + 50 s ago, "recent" 360 s ago
    monkeypatch.setattr(store_module.time, "time", lambda: now)
    store._next_purge = 0.0
    stored("new", now + 300)  # its transaction purges
    reader = Store(f"sqlite:///{tmp_path}/kbs.db", Sealer(KEK))  # no cache: the rows
    assert [asyncio.run(reader.get_session(s)) is not None for s in ("old", "recent", "new")] == [False, True, True]


@pytest.mark.parametrize("path", ["default/key/a/../a", "default/key", "default/key/.a", "default//a",
                                  "default/key/a b", "default/key/" + "a" * 1000])
def test_a_path_outside_the_grammar_is_refused_before_the_session_is_read(tmp_path, path):
    _, kbs, _ = setup(tmp_path)
    cookie, challenge = asyncio.run(kbs.auth(p.AuthRequest("cca").to_json()))
    attest(kbs, cookie, challenge["nonce"], tee_key()[1])
    for credentials in ((None, None), (cookie, None)):
        with pytest.raises(Problem) as caught:
            asyncio.run(kbs.release(path, *credentials, "peer"))
        assert caught.value.name == p.BAD_REQUEST
    assert not events(kbs, RELEASE)


def test_evidence_that_proved_nothing_costs_no_write_and_leaves_the_nonce_unspent(tmp_path, monkeypatch):
    """A refusal before the evidence was shown to come from a trusted TEE for this session (its signature or
    chain failed) records nothing and spends nothing: the audit log is not a stranger's to grow, and a
    stranger who read a guest's challenge cannot spend its nonce. A genuine TEE refused is recorded."""
    from keybroker.server import kbs as kbs_module
    from keybroker.verifier.core import Check, Verdict
    from keybroker.wire import envelope

    url, kbs, _ = setup(tmp_path)
    kbs._appraised = KeyServer._appraised.__get__(kbs)  # type: ignore[method-assign]  # the real appraisal
    verdicts = iter([False, True])

    def verify(evidence, context):  # type: ignore[no-untyped-def]
        check = Check("signature", False, "does not verify")
        return Verdict(evidence.provider, (check,), {}, proven=next(verdicts))
    monkeypatch.setattr(kbs_module, "verify", verify)
    cookie, challenge = asyncio.run(kbs.auth(p.AuthRequest("cca").to_json()))
    _, pubkey = tee_key()
    report = envelope.TsmReport(provider=p.PROVIDER_BY_TEE["cca"], generation=1,
                                inblob=p.report_data(challenge["nonce"], pubkey, ""), outblob=b"x")
    body = p.Attestation(challenge["nonce"], pubkey, envelope.to_json(report)).to_json()
    for spent in (False, True):
        with pytest.raises(Problem) as caught:
            asyncio.run(kbs.attest(cookie, body, "peer", size=100))
        assert caught.value.name == p.ATTESTATION_DENIED
        assert len(events(kbs, ATTEST)) == spent
        assert (asyncio.run(replica(url).store.get_session(cookie.split(".")[0])) is not None) == spent

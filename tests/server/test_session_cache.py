"""The sessions a worker remembers: never a stale answer to a release, a fresh one for one attestation only."""

from __future__ import annotations

import asyncio

from keybroker.server.audit import ALLOW, ATTEST, Event
from keybroker.server.store import SessionCache, Store


def test_a_fresh_session_is_read_back_for_a_release_and_handed_once_to_an_attestation(tmp_path):
    a = Store(f"sqlite:///{tmp_path}/kbs.db")
    b = Store(f"sqlite:///{tmp_path}/kbs.db")  # another worker or replica on the same database

    async def steps() -> None:
        await a.create_session("s1", "snp", "nonce", 300)
        session = b.get_session("s1", to_attest=True)  # read from the database: b never saw it
        assert session is not None and session.state == "authed"
        event = Event(ATTEST, ALLOW, "test", "b")
        assert await b.end_attestation(session, "nonce", event, claims={"tee": "snp"}, tee_pubkey={"kty": "EC"})
        # a still holds the session as it made it; a release must not take that for the truth
        attested = a.get_session("s1")
        assert attested is not None and attested.state == "attested" and attested.claims == {"tee": "snp"}
        # an attestation on a with the cached fresh session: its UPDATE finds the nonce spent
        stale = a.get_session("s1", to_attest=True)
        assert stale is not None and stale.state == "authed"
        assert await a.end_attestation(stale, "nonce", event, claims={"tee": "snp"}, tee_pubkey={}) is None
        # and the cache handed it out once: the next look is at the database
        again = a.get_session("s1", to_attest=True)
        assert again is not None and again.state == "attested"

    asyncio.run(steps())


def test_the_cache_keeps_the_newest_sessions_only():
    from keybroker.server.store import Session

    cache = SessionCache(size=3)
    for n in range(5):
        cache.put(Session(f"s{n}", "snp", "n", "attested", 1e12, {}, {}))
    assert [cache.get(f"s{n}", to_attest=False) is not None for n in range(5)] == [False, False, True, True, True]

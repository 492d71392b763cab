"""RCAR sessions: the cookie /auth gives proves its nonce; the session is stored once, when it attests."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest

from keybroker.server.audit import ALLOW, ATTEST, Event
from keybroker.server.cookies import SessionCookies
from keybroker.server.sealing import Kek, RowMac, Sealer
from keybroker.server.sessions import Session, SessionCache
from keybroker.server.store import SESSION_MAC, Store

KEK = Kek.from_bytes(bytes(range(32)), "test")
NEXT_KEK = Kek.from_bytes(bytes(range(1, 33)), "test")
ROWS = Sealer(KEK)  # the KEK a store makes and checks its rows with


def test_a_cookie_opens_with_its_own_nonce_only():
    cookies = SessionCookies(Sealer(KEK))
    fresh, cookie = cookies.issue("snp", "the-nonce", 300)
    opened = cookies.open(cookie, "the-nonce")
    assert opened == fresh and opened.tee == "snp" and opened.expires > time.time()
    assert cookies.open(cookie, "another-nonce") is None
    assert cookies.session_id(cookie) == fresh.id


@pytest.mark.parametrize("change", [
    lambda c: c.replace(".snp.", ".tdx."),                                    # another TEE
    lambda c: ".".join([c.split(".")[0], "snp", "9999999999", c.split(".")[3]]),  # a later end
    lambda c: "f" * 32 + c[32:],                                              # another session
    lambda c: c[:-1] + ("A" if c[-1] != "A" else "B"),                         # another MAC
    lambda c: c + ".x", lambda c: c.upper(), lambda c: "", lambda c: c * 1000,  # not a cookie
    lambda c: c.replace(".", "\u2024"),
    lambda c: c.replace(".snp.", ".snp.0"),                                    # the same end, spelt otherwise
])
def test_an_altered_or_malformed_cookie_opens_nothing(change):
    cookies = SessionCookies(Sealer(KEK))
    _, cookie = cookies.issue("snp", "n", 300)
    assert cookies.open(change(cookie), "n") is None


def test_a_cookie_cannot_move_its_nonces_digits_into_its_end():
    """The MAC tells where the end stops and the nonce starts: else a nonce beginning with digits would
    lend them to the end (a cookie good for centuries, under a shorter nonce its evidence is bound to)."""
    cookies = SessionCookies(Sealer(KEK))
    fresh, cookie = cookies.issue("snp", "42abc", 300)
    session, tee, end, mac = cookie.split(".")
    assert cookies.open(f"{session}.{tee}.{end}4.{mac}", "2abc") is None
    assert cookies.open(f"{session}.{tee}.{end}42.{mac}", "abc") is None
    assert cookies.open(cookie, "42abc") == fresh


def test_an_expired_cookie_opens_nothing():
    cookies = SessionCookies(Sealer(KEK))
    _, cookie = cookies.issue("snp", "n", -1)
    assert cookies.open(cookie, "n") is None


def test_replicas_check_each_others_cookies_through_a_kek_rotation():
    old_replica, rotated = SessionCookies(Sealer(KEK)), SessionCookies(Sealer(NEXT_KEK, [KEK]))
    _, old = old_replica.issue("snp", "n", 300)
    assert rotated.open(old, "n") is not None  # made under the previous KEK
    _, new = rotated.issue("snp", "n", 300)
    assert rotated.open(new, "n") is not None and old_replica.open(new, "n") is None
    assert SessionCookies(Sealer(Kek.from_bytes(bytes(32), "other"))).open(old, "n") is None  # another KEK


def attested(session_id: str) -> Session:
    return Session(session_id, "snp", "n", "attested", time.time() + 300, {"kty": "EC"}, {"tee": "snp"})


def test_a_session_is_stored_once_however_many_replicas_try(tmp_path):
    a = Store(f"sqlite:///{tmp_path}/kbs.db", ROWS)
    b = Store(f"sqlite:///{tmp_path}/kbs.db", ROWS)  # another worker or replica on the same database
    event = Event(ATTEST, ALLOW, "test", "a")

    async def attest_twice() -> None:
        record = await a.end_attestation(attested("s1"), event)
        assert record is not None and a.stored_here("s1") and not b.stored_here("s1")
        assert await b.end_attestation(attested("s1"), event) is None  # the nonce is spent
        assert await a.end_attestation(attested("s1"), event) is None
        both = await asyncio.gather(*(store.end_attestation(attested("s2"), event) for store in (a, b, a, b)))
        assert sum(record is not None for record in both) == 1

    asyncio.run(attest_twice())
    stored = asyncio.run(b.get_session("s1"))  # read from the database: b stored nothing
    assert stored is not None and stored.state == "attested" and stored.claims == {"tee": "snp"}


def test_a_session_that_ended_while_its_evidence_was_verified_is_not_stored(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/kbs.db", ROWS)
    ended = Session("s1", "snp", "n", "attested", time.time() - 1, {"kty": "EC"}, {"tee": "snp"})
    assert asyncio.run(store.end_attestation(ended, Event(ATTEST, ALLOW, "test", "a"))) is None
    assert asyncio.run(store.get_session("s1")) is None


@pytest.mark.parametrize("forge", [
    {"state": "attested"},                                       # a failed attestation made good
    {"claims": '{"tee": "snp", "debug": false}'},                # claims of the writer's choosing
    {"tee_pubkey": '{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}'},  # the writer's key
    {"expires": 9999999999.0},                                   # a longer life
    {"mac": "\u00e9" * 43}, {"mac": b"A" * 43},                       # a MAC not ASCII, or no text (SQLite keeps it)
])
def test_a_session_row_changed_in_the_database_is_not_believed(tmp_path, forge):
    """Someone who can write the database but has no KEK cannot make a session attested (the
    cookie /auth gives anyone names its id and nonce), nor change its claims, key or end."""
    from sqlalchemy import update

    from keybroker.server import schema

    failed = Session("s1", "snp", "n", "failed", time.time() + 300, None, None)
    writer, reader = Store(f"sqlite:///{tmp_path}/kbs.db", ROWS), Store(f"sqlite:///{tmp_path}/kbs.db", ROWS)
    assert asyncio.run(writer.end_attestation(failed if "state" in forge else attested("s1"),
                                              Event(ATTEST, ALLOW, "test", "a"))) is not None
    assert asyncio.run(reader.get_session("s1")) is not None  # as stored, it reads back
    with reader.engine.begin() as db:
        db.execute(update(schema.sessions).where(schema.sessions.c.id == "s1").values(**forge))
    assert asyncio.run(reader.get_session("s1")) is None
    expires = time.time() + 300
    columns = ("s2", "snp", "n", "attested", str(expires), "{}", "{}")
    for key, believed in ((NEXT_KEK, False), (KEK, True)):  # a row inserted whole, with a MAC under another KEK
        with reader.engine.begin() as db:
            db.execute(schema.sessions.delete())
            db.execute(schema.sessions.insert().values(id="s2", tee="snp", nonce="n", state="attested",
                                                       expires=expires, tee_pubkey="{}", claims="{}",
                                                       mac=RowMac(Sealer(key), SESSION_MAC).mac(columns)))
        assert (asyncio.run(reader.get_session("s2")) is not None) is believed


def test_a_row_mac_tells_where_each_column_ends():
    """Bytes moved from one column to the next (the same text end to end) make another row: a writer
    of the database must not turn a session's tee_pubkey into the start of its claims."""
    rows = RowMac(Sealer(KEK), SESSION_MAC)
    columns = ("s1", "snp", "n", "attested", "1700000000", '{"kty": "EC"}', '{"debug": false}')
    mac = rows.mac(columns)
    assert rows.verify(columns, mac)
    for moved in (columns[:5] + ('{"kty": "EC"}{"debug"', ': false}'), columns[:2] + ("na", "ttested") + columns[4:]):
        assert "".join(moved) == "".join(columns) and not rows.verify(moved, mac), moved


def test_a_session_row_stays_good_across_a_kek_rotation(tmp_path):
    stored = Store(f"sqlite:///{tmp_path}/kbs.db", ROWS)
    asyncio.run(stored.end_attestation(attested("s1"), Event(ATTEST, ALLOW, "test", "a")))
    rotated = Store(f"sqlite:///{tmp_path}/kbs.db", Sealer(NEXT_KEK, [KEK]))
    assert asyncio.run(rotated.get_session("s1")) is not None


def test_a_database_made_before_the_sessions_mac_gains_it_and_believes_none_of_its_old_rows(tmp_path):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path}/kbs.db"
    with Store(url, ROWS).engine.begin() as db:
        db.execute(text("ALTER TABLE sessions DROP COLUMN mac"))
        db.execute(text("INSERT INTO sessions (id, tee, nonce, state, expires, tee_pubkey, claims) "
                        f"VALUES ('s1', 'snp', 'n', 'attested', {time.time() + 300}, '{{}}', '{{}}')"))
    store = Store(url, ROWS)
    assert asyncio.run(store.get_session("s1")) is None
    assert asyncio.run(store.end_attestation(attested("s2"), Event(ATTEST, ALLOW, "test", "a"))) is not None
    assert asyncio.run(Store(url, ROWS).get_session("s2")) is not None


def test_processes_opening_an_old_database_together_change_its_schema_once(tmp_path):
    import subprocess
    import sys

    from sqlalchemy import text

    for n in range(4):
        url = f"sqlite:///{tmp_path}/kbs{n}.db"
        with Store(url).engine.begin() as db:
            db.execute(text("ALTER TABLE sessions DROP COLUMN mac"))
            db.execute(text("ALTER TABLE policies DROP COLUMN mac"))
        code = f"from keybroker.server.store import Store; Store({url!r})"
        opening = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(4)]
        failed = [p.stderr.read() for p in opening if p.wait(timeout=60) != 0]  # type: ignore[union-attr]
        assert not failed


def test_the_cache_keeps_the_newest_sessions_only():
    cache = SessionCache(size=3)
    for n in range(5):
        cache.put(attested(f"s{n}"))
    assert [cache.get(f"s{n}") is not None for n in range(5)] == [False, False, True, True, True]


def test_the_cache_keeps_no_more_than_its_budget_of_claims(tmp_path):
    """A genuine guest attesting again and again with a long event log (megabytes of claims per
    session) fills the cache up to its budget, not 4096 times that."""
    store = Store(f"sqlite:///{tmp_path}/kbs.db", ROWS)
    events = [{"rtmr": 1, "type": "EV_IPL", "digest": f"{n:096x}"} for n in range(8000)]  # about 1 MB as JSON
    event = Event(ATTEST, ALLOW, "test", "a")

    async def attest_many() -> None:
        for n in range(48):
            session = replace(attested(f"big{n}"), claims={"tee": "tdx", "tdx.events": events})
            assert await store.end_attestation(session, event) is not None

    asyncio.run(attest_many())
    cache = store._cached
    kept = [sid for sid in (f"big{n}" for n in range(48)) if store.stored_here(sid)]
    assert kept and kept[-1] == "big47" and "big0" not in kept
    assert sum(len(json.dumps(cache.get(sid).claims)) for sid in kept) <= cache.budget
    assert asyncio.run(store.get_session("big0")).claims["tdx.events"] == events  # read back from the database


def test_auth_writes_nothing(tmp_path):
    """A flood of /auth costs CPU only: no session, no audit record, until one attests."""
    from sqlalchemy import func, select

    from keybroker.server import schema
    from keybroker.server.kbs import KeyServer
    from keybroker.server.metrics import Metrics
    from keybroker.server.tokens import TokenSigner
    from keybroker.verifier import TrustStore
    from keybroker.wire import rcar as p

    store = Store(f"sqlite:///{tmp_path}/kbs.db", ROWS)
    kbs = KeyServer(store=store, sealer=Sealer(KEK), trust=TrustStore.default(), tokens=TokenSigner(),
                    metrics=Metrics(), name="test")

    async def flood() -> list[tuple[str, dict]]:
        return [await kbs.auth(p.AuthRequest("snp").to_json()) for _ in range(200)]

    challenges = asyncio.run(flood())
    assert len({cookie for cookie, _ in challenges}) == 200
    assert all(kbs.cookies.open(cookie, challenge["nonce"]) for cookie, challenge in challenges)
    with store.engine.connect() as db:
        assert db.execute(select(func.count()).select_from(schema.sessions)).scalar() == 0
        assert db.execute(select(func.count()).select_from(schema.audit)).scalar() == 0

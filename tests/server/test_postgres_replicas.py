"""Stateless replicas on one PostgreSQL database: any replica serves any step of RCAR,
nonces stay single-use across replicas, and a replica killed with SIGKILL in a burst of
releases loses no audit record of a release that completed.

The tests start their own PostgreSQL server (initdb in a temporary folder, as the
``postgres`` user, listening only on a unix socket there) and remove it afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from keybroker.errors import StoreError
from keybroker.server.store import ADMIN_WAIT, READ_WAIT, READERS, WRITE_WAIT, Store
from keybroker.wire import rcar as p
from keybroker.wire.resource import PATH_MAX
from support.appender import appending
from support.kbs import attest, attestation, audit_records, challenge, keybroker
from support.postgres import fresh_database
from support.servers import KeyServerProcess, ServerSecrets

SECRET = b"\x02replicated disk key\xfd"


@pytest.fixture
def database(postgres: str) -> Iterator[str]:
    """A fresh database on the test server; dropped after the test (its replicas are stopped by then)."""
    with fresh_database(postgres) as url:
        yield url


@pytest.fixture
def replicas(database: str, sim_state: Path, tmp_path: Path) -> Iterator[Callable[[], list[KeyServerProcess]]]:
    """Factory: two key servers sharing the database, the KEK, the admin token and the
    token-signing key, started at the same time on a database that has no schema yet."""
    secrets = ServerSecrets(tmp_path / "secrets")
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(KeyServerProcess(tmp_path / name, sim_state / "trust", "--name", f"replica-{name}",
                                        "--token-key-file", str(secrets.token_key), db=database, secrets=secrets))

    def start() -> list[KeyServerProcess]:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(KeyServerProcess.start, servers))

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def put_remotely(server: KeyServerProcess, path: str, value: bytes) -> None:
    out = keybroker("resource", "put", path, "--server", server.url, "--admin-token-file",
                    str(server.secrets.admin_token_file), data=value)
    assert out.returncode == 0, out.stderr


def test_any_replica_serves_any_step(tsm_sim, replicas):
    root = tsm_sim("sev_guest")
    a, b = servers = replicas()
    put_remotely(a, "default/disk/root", SECRET)
    for auth, attest_on, fetch_on in itertools.product(servers, repeat=3):
        guest = attest(root, auth.url, attest_on.url)
        by_cookie = guest.fetch(fetch_on.url, "default/disk/root")
        assert by_cookie.status_code == 200, (auth.url, attest_on.url, fetch_on.url, by_cookie.text)
        assert guest.decrypt(by_cookie) == SECRET
        other = b if fetch_on is a else a  # the token is accepted by the replica that did not issue it
        assert guest.decrypt(guest.fetch(other.url, "default/disk/root", bearer=True)) == SECRET

    records = audit_records(a.db)
    releases = [r for r in records if r["event"] == "release" and r["decision"] == "allow"]
    assert len(releases) == 16 and {r["server"] for r in releases} == {"replica-a", "replica-b"}
    attests = [r for r in records if r["event"] == "attest"]
    assert len(attests) == 8 and {r["measurement"] for r in attests} == {releases[0]["measurement"]}
    assert keybroker("audit", "verify", "--db", a.db).returncode == 0

    longest = "default/disk/" + "x" * (PATH_MAX - len("default/disk/"))  # fits every column, audit's too
    put_remotely(a, longest, SECRET)
    guest = attest(root, b.url)
    assert guest.decrypt(guest.fetch(b.url, longest)) == SECRET
    assert audit_records(a.db)[-1]["resource"] == longest


def test_a_nonce_is_used_once_across_replicas(tsm_sim, replicas):
    root = tsm_sim("sev_guest")
    a, b = servers = replicas()
    http, nonce = challenge(a.url)
    _, body = attestation(root, nonce)
    barrier = threading.Barrier(2)

    def post(server: KeyServerProcess) -> requests.Response:
        barrier.wait()
        return http.post(f"{server.url}/kbs/v0/attest", json=body, timeout=30)

    with ThreadPoolExecutor(2) as pool:  # the same attestation to both replicas at once
        answers = sorted(r.status_code for r in pool.map(post, servers))
    assert answers == [200, 401]
    replay = http.post(f"{b.url}/kbs/v0/attest", json=body, timeout=30)
    assert replay.status_code == 401 and replay.json()["type"].endswith("UnknownSession")
    # A spent nonce proves nothing: the refusals are counted, not audited.
    assert [r for r in audit_records(a.db) if r["event"] == "attest" and r["decision"] == "deny"] == []
    assert sum(server.denials("unknown_session") for server in servers) == 2


def test_sigkill_during_a_burst_loses_no_audit_record(tsm_sim, replicas):
    root = tsm_sim("sev_guest")
    a, b = servers = replicas()
    put_remotely(b, "default/disk/root", SECRET)
    guests = [attest(root, b.url) for _ in range(4)]
    completed: list[str] = []  # audit hashes of releases whose response arrived
    lock = threading.Lock()
    kill_after = 60

    def release(i: int) -> None:
        server = servers[i % 2]
        guest = guests[i % len(guests)]
        try:
            response = guest.fetch(server.url, "default/disk/root", bearer=i % 3 == 0, timeout=10)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            return  # the killed replica: no response (or its head only, the body cut off), no promise
        assert response.status_code == 200, response.text
        with lock:
            completed.append(response.headers["Keybroker-Audit"])
            if len(completed) == kill_after:
                a.crash()  # SIGKILL to the workers and the supervisor, with requests in flight

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(release, range(400)))
    assert a.proc.returncode == -9
    assert len(completed) > kill_after  # replica b went on serving

    recorded = {r["hash"]: r for r in audit_records(b.db)}
    missing = [h for h in completed if h not in recorded]
    assert not missing, f"{len(missing)} completed releases have no audit record"
    assert all(recorded[h]["event"] == "release" and recorded[h]["decision"] == "allow" for h in completed)
    assert {recorded[h]["server"] for h in completed} == {"replica-a", "replica-b"}
    verified = keybroker("audit", "verify", "--db", b.db)
    assert verified.returncode == 0, verified.stdout
    a.start()  # a restarted replica joins the same chain
    guest = attest(root, a.url)
    assert guest.decrypt(guest.fetch(a.url, "default/disk/root")) == SECRET
    assert keybroker("audit", "verify", "--db", b.db).returncode == 0


def test_readiness_follows_the_database(tsm_sim, replicas, postgres, database):
    import psycopg
    from sqlalchemy.engine import make_url

    tsm_sim("sev_guest")  # the simulated roots the replicas trust
    a, _ = replicas()
    assert requests.get(f"{a.url}/readyz").status_code == 200
    with psycopg.connect(postgres, autocommit=True) as db:
        db.execute(f"DROP DATABASE {make_url(database).database} WITH (FORCE)")
    deadline = time.monotonic() + 30
    while (response := requests.get(f"{a.url}/readyz")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert response.status_code == 503 and response.json() == {"status": "unavailable",
                                                                "detail": "the database does not answer"}
    assert requests.get(f"{a.url}/healthz").status_code == 200  # alive, only not ready


def test_database_errors_name_the_database_not_its_password():
    out = keybroker("audit", "verify", "--db", "postgresql://kb:hunter2@/kbs?host=/nonexistent&port=5432")
    assert out.returncode == 1 and b"hunter2" not in out.stderr
    assert b"database postgresql+psycopg://kb:***@/kbs" in out.stderr and b"/nonexistent/.s.PGSQL.5432" in out.stderr


def test_an_audit_write_outlives_its_writers_connection(database):
    """The audit writer keeps its connection between transactions; one the database dropped is replaced."""
    import psycopg
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from keybroker.server import audit
    from keybroker.server.audit import ADMIN, ALLOW, Event
    from keybroker.server.store import Store

    store = Store(database)
    backends: list[int] = []

    def noting_the_backend(db) -> Event:
        backends.append(db.execute(text("SELECT pg_backend_pid()")).scalar())
        return Event(ADMIN, ALLOW, f"write {len(backends)}", "test")
    assert store.audited(noting_the_backend).seq == 1
    assert store.audited(noting_the_backend).seq == 2
    assert backends[0] == backends[1]  # one connection, kept
    url = make_url(database).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as db:
        assert db.execute("SELECT pg_terminate_backend(%s)", (backends[1],)).fetchone() == (True,)
    assert store.audited(noting_the_backend).seq == 3  # the batch on the dead connection was run again
    assert backends[-1] != backends[1]
    assert audit.verify(store.engine).ok


def test_a_read_keeps_its_threads_connection_outside_a_transaction_until_the_database_drops_it(database):
    """Reads run on threads, each on a connection of its own kept between reads, in autocommit: no
    transaction stays open on it. A read on one the database dropped is made again on a new one,
    whether it is made by SQLAlchemy (ping) or on the driver's cursor (a release's read)."""
    import asyncio

    import psycopg
    from sqlalchemy.engine import make_url

    from keybroker.server.store import Store

    store = Store(database)
    url = make_url(database).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as watcher:
        def readers() -> dict[int, str]:
            return dict(watcher.execute("SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                                        "AND pid <> pg_backend_pid()").fetchall())
        for read in (store.ping, lambda: store.for_release("default/disk/root")):
            for _ in range(3):
                asyncio.run(read())
            kept = readers()
            assert 0 < len(kept) <= READERS and set(kept.values()) == {"idle"}, kept  # no transaction left open
            for backend in kept:
                assert watcher.execute("SELECT pg_terminate_backend(%s)", (backend,)).fetchone() == (True,)
            for _ in range(READERS + 1):
                asyncio.run(read())  # not an error: made again on a new connection
            assert readers() and not set(readers()) & set(kept)
    store.close_connections()


def test_verify_while_appends_go_on_reports_an_intact_log(database):
    """Verify reads the head and the records in one snapshot: appends meanwhile are no alarm."""
    from keybroker.server import audit, schema

    engine = schema.open_engine(database)
    with appending(database, batch=50) as committed:
        while len(committed) < 3:
            time.sleep(0.01)
        verdicts = [audit.verify(engine) for _ in range(20)]
        cli = keybroker("audit", "verify", "--db", database)
        assert len(committed) > 20  # the appends went on meanwhile
    assert [v.problems for v in verdicts if not v.ok] == []
    assert all(v.records == v.head_seq for v in verdicts)
    assert cli.returncode == 0 and b"audit log intact" in cli.stdout, cli.stdout + cli.stderr
    engine.dispose()


@contextmanager
def stopped(postgres: str) -> Iterator[None]:
    """The PostgreSQL server of ``postgres`` (its postmaster and every backend) stopped with
    SIGSTOP: connections stay open and nothing answers, as with a database host that hangs."""
    sockets = Path(parse_qs(urlsplit(postgres).query)["host"][0])
    postmaster = int((sockets.parent / "data" / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    pids = [postmaster, *map(int, children)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_stalled_database_stalls_requests_not_the_worker(tsm_sim, postgres, database, sim_state, tmp_path):
    root = tsm_sim("sev_guest")
    server = KeyServerProcess(tmp_path, sim_state / "trust", "--workers", "1", db=database).start()
    try:
        put_remotely(server, "default/disk/root", SECRET)
        put_remotely(server, "default/disk/data", SECRET)
        guest = attest(root, server.url)
        assert guest.decrypt(guest.fetch(server.url, "default/disk/root")) == SECRET
        with stopped(postgres), ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            # A resource the worker has not released yet: it reads the policy and the resource first.
            pending = pool.submit(guest.fetch, server.url, "default/disk/data")
            time.sleep(0.5)  # the release is waiting for its read
            # The one worker's event loop still answers what needs no database, at once.
            auth = requests.post(f"{server.url}/kbs/v0/auth", json=p.AuthRequest("snp").to_json(), timeout=2)
            assert auth.status_code == 200 and time.monotonic() - started < READ_WAIT
            ready = requests.get(f"{server.url}/readyz", timeout=READ_WAIT + 5)
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            release = pending.result(timeout=READ_WAIT + 5)
            assert release.status_code == 503, release.text
            assert release.json()["type"].endswith(p.UNAVAILABLE) and release.headers["Retry-After"] == "5"
            assert READ_WAIT <= time.monotonic() - started < READ_WAIT + 5
        # Answering again, the database serves the next release; the refused one left no record.
        assert guest.decrypt(guest.fetch(server.url, "default/disk/data")) == SECRET
        releases = [r for r in audit_records(database) if r["event"] == "release"]
        assert [r["decision"] for r in releases] == ["allow", "allow"]
        assert "the database did not answer within 5 s" in server.log_path.read_text()
    finally:
        server.stop()


def test_reads_stuck_on_a_stalled_database_keep_to_their_threads(postgres, database):
    store = Store(database)

    async def stalled() -> None:
        started = time.monotonic()
        reads = [asyncio.ensure_future(store.for_release("default/disk/root")) for _ in range(3 * READERS)]
        await asyncio.sleep(0.2)
        # Work that needs a thread (a large attestation, a collateral fetch) still gets one at once.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "verified"), 1) == "verified"
        outcomes = await asyncio.gather(*reads, return_exceptions=True)
        assert all(isinstance(o, StoreError) and "did not answer within 5 s" in str(o) for o in outcomes), outcomes
        assert time.monotonic() - started < READ_WAIT + 2  # the queued reads were given up with the rest

    def run() -> None:
        try:
            asyncio.run(stalled())
        except BaseException as exc:
            failure.append(exc)
        finally:
            failure.append(None)

    failure: list[BaseException | None] = []
    try:
        with stopped(postgres):  # on a thread: a loop whose default executor is stuck never closes
            threading.Thread(target=run, daemon=True).start()
            deadline = time.monotonic() + READ_WAIT + 10
            while not failure and time.monotonic() < deadline:
                time.sleep(0.1)
        assert failure, "the event loop could not close: its default executor's threads were stuck on the reads"
        assert failure[0] is None, failure[0]
        active, _ = asyncio.run(store.for_release("default/disk/root"))
        assert active.version == 0  # answering again: no policy stored in this fresh database
    finally:
        store.close_connections()


def test_a_database_that_refuses_is_a_503_to_guests_and_admins_not_a_500(tsm_sim, postgres, database, sim_state,
                                                                          tmp_path):
    """Errors of the database (here: it is gone, so every connection is refused) are the same 503
    with Retry-After as one that does not answer, for a release and for the admin API alike."""
    import psycopg
    from sqlalchemy.engine import make_url

    root = tsm_sim("sev_guest")
    server = KeyServerProcess(tmp_path, sim_state / "trust", "--workers", "1", db=database).start()
    try:
        put_remotely(server, "default/disk/root", SECRET)
        guest = attest(root, server.url)
        with psycopg.connect(postgres, autocommit=True) as db:
            db.execute(f"DROP DATABASE {make_url(database).database} WITH (FORCE)")
        admin = {"Authorization": f"Bearer {server.secrets.admin_token}"}
        answers = [guest.fetch(server.url, "default/disk/root")]
        answers += [requests.request(method, f"{server.url}/admin/v1/{path}", headers=admin, data=b"v", timeout=30)
                    for method, path in [("GET", "resources"), ("GET", "policies"), ("GET", "policy"),
                                         ("PUT", "resources/default/disk/new"), ("DELETE", "policy")]]
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert answer.json()["type"].endswith(p.UNAVAILABLE) and answer.headers["Retry-After"] == "5"
        log = server.log_path.read_text()
        assert "internal error" not in log and "Traceback" not in log
        assert f'database "{make_url(database).database}" does not exist' in log
    finally:
        server.stop()


def test_admin_calls_on_a_stalled_database_are_given_up(postgres, database, tmp_path):
    """An admin call waits ADMIN_WAIT for a database that stopped answering, then is a 503: it
    does not hang until the database answers again (or for ever)."""
    server = KeyServerProcess(tmp_path, None, "--workers", "1", db=database).start()
    admin = {"Authorization": f"Bearer {server.secrets.admin_token}"}
    try:
        put_remotely(server, "default/disk/root", SECRET)
        def call(method: str, path: str) -> None:
            started = time.monotonic()
            answer = requests.request(method, f"{server.url}/admin/v1/{path}", headers=admin, data=b"v",
                                      timeout=ADMIN_WAIT + 10)
            assert answer.status_code == 503, answer.text
            assert answer.json()["type"].endswith(p.UNAVAILABLE) and answer.headers["Retry-After"] == "5"
            assert time.monotonic() - started < ADMIN_WAIT + 5

        with stopped(postgres), ThreadPoolExecutor(3) as calls:  # at once: each waits ADMIN_WAIT
            for done in [calls.submit(call, method, path) for method, path in
                         [("GET", "resources"), ("PUT", "resources/default/disk/new"), ("GET", "policies")]]:
                done.result()
        listing = requests.get(f"{server.url}/admin/v1/resources", headers=admin, timeout=30)
        assert listing.status_code == 200 and "default/disk/root" in listing.text
    finally:
        server.stop()


def test_an_attestation_on_a_stalled_database_is_given_up(tsm_sim, postgres, database, sim_state, tmp_path):
    """/attest waits WRITE_WAIT for its write (the spent nonce, the session) to a database that stopped
    answering, then is a 503: it does not hang until the database answers again (or for ever)."""
    root = tsm_sim("sev_guest")
    server = KeyServerProcess(tmp_path, sim_state / "trust", "--workers", "1", db=database).start()
    try:
        http, nonce = challenge(server.url)
        _, body = attestation(root, nonce)
        with stopped(postgres):
            started = time.monotonic()
            answer = http.post(f"{server.url}/kbs/v0/attest", json=body, timeout=WRITE_WAIT + 10)
            assert answer.status_code == 503, answer.text
            assert answer.json()["type"].endswith(p.UNAVAILABLE) and answer.headers["Retry-After"] == "5"
            assert WRITE_WAIT <= time.monotonic() - started < WRITE_WAIT + 5
        assert f"the database did not commit within {WRITE_WAIT:g} s" in server.log_path.read_text()
        assert attest(root, server.url).token  # answering again, the database serves the next guest
    finally:
        server.stop()

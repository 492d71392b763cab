"""The audit log's group commit: concurrent writes share one transaction; a failing one fails alone;
the writer keeps one connection, replaces it after a failure, and gives it back before a fork."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event

from keybroker.server import audit
from keybroker.server.audit import ADMIN, ALLOW, Event
from keybroker.server.store import Store


def write(store: Store, reason: str, *, fail: bool = False, entered: threading.Event | None = None,
          hold: threading.Event | None = None) -> audit.Record | None:
    def work(db) -> Event:
        if entered is not None and hold is not None:
            entered.set()
            hold.wait(10)  # keeps the writer inside this transaction while the others queue up
        if fail:
            raise RuntimeError(f"{reason}: refused by the work itself")
        return Event(ADMIN, ALLOW, reason, "test")
    return store.audited(work)


def test_a_failing_write_fails_alone_and_the_chain_holds(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/kbs.db")
    checkouts: list[int] = []
    event.listen(store.engine, "checkout", lambda *_: checkouts.append(1))
    entered, release = threading.Event(), threading.Event()
    first = threading.Thread(target=write, args=(store, "first"), kwargs={"entered": entered, "hold": release})
    first.start()
    assert entered.wait(10)
    records: dict[int, audit.Record | None] = {}
    errors: dict[int, str] = {}

    def one(n: int) -> None:
        try:
            records[n] = write(store, f"write {n}", fail=n == 7)
        except RuntimeError as exc:
            errors[n] = str(exc)
    threads = [threading.Thread(target=one, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while store._commits._queue.qsize() < 12 and time.monotonic() < deadline:  # all twelve wait: one batch
        time.sleep(0.01)
    assert store._commits._queue.qsize() == 12
    before = len(checkouts)
    release.set()
    for thread in (first, *threads):
        thread.join()
    assert errors == {7: "write 7: refused by the work itself"}
    assert sorted(r.seq for r in records.values() if r) == list(range(2, 13))  # after "first"; none lost
    assert all(r.event.reason == f"write {n}" for n, r in records.items() if r)
    assert len(checkouts) > before  # the failed batch's connection was given back, another taken
    later = write(store, "after the failure")
    assert later is not None and later.seq == 13
    verdict = audit.verify(store.engine)
    assert verdict.ok and verdict.records == 13, verdict.problems


def test_the_writer_gives_its_connection_back_before_a_fork(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/kbs.db")
    write(store, "kept between transactions")
    assert store.engine.pool.checkedout() == 1  # the writer's
    store.close_connections()  # what serve does before it forks the workers
    assert store.engine.pool.checkedout() == 0
    assert write(store, "and taken again").seq == 2


def test_what_arrives_while_another_writer_holds_the_lock_joins_the_waiting_transaction(tmp_path):
    """Another worker's commit holds the chain's lock: this worker's writer, blocked on it with one
    write, takes every write that queued meanwhile into the same transaction."""
    store = Store(f"sqlite:///{tmp_path}/kbs.db")
    other = Store(f"sqlite:///{tmp_path}/kbs.db")  # another worker on the same database
    write(store, "the writer's connection is open")
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda *_: commits.append(1))
    with other._writer:  # what another worker's commit holds
        first = store._commits.submit(lambda db: Event(ADMIN, ALLOW, "first", "test"))
        deadline = time.monotonic() + 10
        while not store._commits._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer took the first write and waits for the lock
        later = [store._commits.submit(lambda db, n=n: Event(ADMIN, ALLOW, f"later {n}", "test")) for n in range(5)]
        time.sleep(0.2)
        assert not first.done()
    records = [first.result(10), *(f.result(10) for f in later)]
    assert [r.event.reason for r in records if r] == ["first", *(f"later {n}" for n in range(5))]
    assert commits == [1]  # one transaction for all six
    assert audit.verify(store.engine).ok


def test_a_busy_writer_waits_briefly_for_more_work_and_an_idle_one_does_not(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/kbs.db")
    store._commits.BATCH_DELAY, store._commits.BUSY = 0.5, 0.3  # wide margins: counts, not timings, are checked
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda *_: commits.append(1))

    def submit(reason: str):
        return store._commits.submit(lambda db: Event(ADMIN, ALLOW, reason, "test"))

    def two_writes_apart(first: str, second: str) -> None:
        one = submit(first)
        time.sleep(0.1)
        other = submit(second)
        assert (one.result(10).event.reason, other.result(10).event.reason) == (first, second)

    submit("wakes the writer").result(10)
    two_writes_apart("a", "b")  # within BUSY of the last commit: the writer waits, one transaction
    assert len(commits) == 2
    time.sleep(0.4)  # idle now: "c" is committed as it comes, "d" after it
    two_writes_apart("c", "d")
    assert len(commits) == 4
    assert audit.verify(store.engine).ok


def test_a_caller_that_leaves_does_not_stop_the_writer(tmp_path):
    """A request cancelled while it awaits its write: the write is committed all the same, and
    the writer goes on serving the others (a cancelled future once killed its thread)."""
    import asyncio

    store = Store(f"sqlite:///{tmp_path}/kbs.db")
    entered, release = threading.Event(), threading.Event()

    async def scenario() -> None:
        holder = asyncio.get_running_loop().run_in_executor(
            None, lambda: write(store, "holds the writer", entered=entered, hold=release))
        await asyncio.to_thread(entered.wait, 10)
        leaving = asyncio.create_task(store.record(Event(ADMIN, ALLOW, "left before its answer", "test")))
        await asyncio.sleep(0.05)
        leaving.cancel()
        release.set()
        await holder
        later = await asyncio.wait_for(store.record(Event(ADMIN, ALLOW, "after", "test")), 10)
        assert later.seq == 3

    asyncio.run(scenario())
    reasons = [record.event.reason for record in audit.records(store.engine)]
    assert reasons == ["holds the writer", "left before its answer", "after"]


@pytest.mark.filterwarnings("ignore:transaction already deassociated")  # what the stand-in for a lost answer leaves
def test_a_commit_whose_answer_was_lost_is_not_run_again(tmp_path, monkeypatch):
    """The connection lost while COMMIT was answered (the database committed; the driver raised): the
    batch landed, so its records are what its callers get, not a second run that records it twice."""
    from sqlalchemy.engine.base import RootTransaction
    from sqlalchemy.exc import OperationalError

    store = Store(f"sqlite:///{tmp_path}/kbs.db")
    commit, lost = RootTransaction._do_commit, []

    def commit_then_lose_the_answer(self) -> None:
        commit(self)
        if not lost:
            lost.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
    monkeypatch.setattr(RootTransaction, "_do_commit", commit_then_lose_the_answer)
    record = write(store, "released once")
    assert lost and record is not None and record.seq == 1
    assert [r.event.reason for r in audit.records(store.engine)] == ["released once"]
    assert write(store, "next").seq == 2 and audit.verify(store.engine).ok


def test_an_admin_change_on_sqlite_whose_writers_lock_is_held_is_given_up(tmp_path, monkeypatch):
    """Another process holds the SQLite writers' lock (a stopped `keybroker resource put`, a long
    rotate-kek): an admin call is a StoreError (503) after ADMIN_WAIT, as on PostgreSQL, not a request
    that hangs until the lock is let go; the change is made once it is."""
    import asyncio

    from keybroker.errors import StoreError
    from keybroker.server import store as store_module
    from keybroker.server.admin import Admin
    from keybroker.server.sealing import Kek, Sealer

    monkeypatch.setattr(store_module, "ADMIN_WAIT", 0.5)
    sealer = Sealer(Kek.from_bytes(bytes(32), "test"))
    store = Store(f"sqlite:///{tmp_path}/kbs.db", sealer)
    other = Store(f"sqlite:///{tmp_path}/kbs.db")  # another process on the same database
    admin = Admin(store, sealer, "local:test", "test")
    with other._writer:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"did not answer within 0\.5 s"):
            asyncio.run(asyncio.wait_for(store.admin(lambda: admin.put_resource("default/key/a", b"v")), 10))
        assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while store.get_resource("default/key/a") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get_resource("default/key/a") is not None and audit.verify(store.engine).ok

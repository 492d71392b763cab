"""The audit log's group commit: concurrent writes share one transaction; a failing one fails alone."""

from __future__ import annotations

import threading
import time

from keybroker.server import audit
from keybroker.server.audit import ADMIN, ALLOW, Event
from keybroker.server.store import Store


def write(store: Store, reason: str, *, fail: bool = False, hold: float = 0.0) -> audit.Record | None:
    def work(db) -> Event:
        time.sleep(hold)  # keeps the writer busy while the others queue up for the next batch
        if fail:
            raise RuntimeError(f"{reason}: refused by the work itself")
        return Event(ADMIN, ALLOW, reason, "test")
    return store.audited(work)


def test_a_failing_write_fails_alone_and_the_chain_holds(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/kbs.db")
    first = threading.Thread(target=write, args=(store, "first"), kwargs={"hold": 0.3})
    first.start()
    time.sleep(0.1)  # the writer is inside the first transaction: the writes below form one batch
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
    for thread in (first, *threads):
        thread.join()
    assert errors == {7: "write 7: refused by the work itself"}
    assert sorted(r.seq for r in records.values() if r) == list(range(2, 13))  # after "first"; none lost
    assert all(r.event.reason == f"write {n}" for n, r in records.items() if r)
    later = write(store, "after the failure")  # the writer goes on, on a fresh connection
    assert later is not None and later.seq == 13
    verdict = audit.verify(store.engine)
    assert verdict.ok and verdict.records == 13, verdict.problems

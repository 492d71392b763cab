"""A writer that appends to a key server's audit log without pause, as a busy server does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from keybroker.server import audit, schema
from keybroker.server.audit import ADMIN, ALLOW, Event


@contextmanager
def appending(url: str, *, batch: int = 5) -> Iterator[list[int]]:
    """Append ``batch`` records per transaction to the log at ``url`` until the block ends;
    yields the list of the transactions committed so far (one item each)."""
    engine = schema.open_engine(url)
    committed: list[int] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            while not stop.is_set():
                with engine.begin() as db:
                    seq, prev = audit.lock_head(db)
                    audit.append(db, seq, prev, [Event(ADMIN, ALLOW, f"busy {seq + n}", "appender")
                                                 for n in range(batch)])
                committed.append(1)
        except BaseException as exc:
            failures.append(exc)

    writer = threading.Thread(target=run, name="appender")
    writer.start()
    try:
        yield committed
    finally:
        stop.set()
        writer.join(30)
        engine.dispose()
    assert not failures, failures

"""Group commit: audited work from many threads in shared transactions (see :class:`GroupCommit`)."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection

from . import audit, schema
from .audit import Event, Record

#: A piece of work on the database that returns the event to record, or None when it changed nothing.
Work = Callable[[Connection], Event | None]
_HASH_AT = select(schema.audit.c.hash).where(schema.audit.c.seq == bindparam("seq"))
#: What the writer is handed: work and the future of its record (no work: give the connection back).
Queued = tuple[Work | None, Future[Record | None]]


class GroupCommit:
    """Runs audited work from many threads in shared transactions: one commit (one fsync) for all
    the work waiting, each caller answered after that commit.

    A batch is what waits when the writer wakes, and what arrives while it waits for the
    chain's lock (held by another worker's or replica's commit). A busy writer (its last
    commit ended less than ``BUSY`` seconds ago) also waits up to ``BATCH_DELAY`` for more
    work before it commits, as PostgreSQL's ``commit_delay`` does: each transaction's fixed
    cost (the fsync, the chain's head) is then shared, while a lone write is not delayed.
    When a shared transaction fails, its pieces are run again one transaction each, so that
    a failing piece fails alone. The writer thread is started on first use in each process
    (the key server's workers are forked) and keeps its connection between transactions.
    """

    BATCH_MAX = 64
    BATCH_DELAY = 0.001  # seconds
    BUSY = 0.005  # seconds

    def __init__(self, engine: Any, lock: schema.WriterLock) -> None:
        self.engine, self.lock = engine, lock
        self._pid = 0
        self._queue: queue.SimpleQueue[Queued] = queue.SimpleQueue()

    def submit(self, work: Work) -> Future[Record | None]:
        """Queue ``work``: the future is done once its transaction is committed (or has failed)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._writer, args=(self._queue,), name="keybroker-audit", daemon=True).start()
        done: Future[Record | None] = Future()
        self._queue.put((work, done))
        return done

    def close(self) -> None:
        """Have this process's writer give its connection back (before a fork: none may cross it)."""
        if self._pid == os.getpid():
            done: Future[Record | None] = Future()
            self._queue.put((None, done))
            done.result(timeout=60)

    def _writer(self, waiting: queue.SimpleQueue[Queued]) -> None:
        db: Connection | None = None  # this thread's own, kept between batches, replaced after a failure
        last_commit = 0.0
        while True:
            batch = [waiting.get()]
            if time.monotonic() - last_commit < self.BUSY:
                self._gather(waiting, batch, time.monotonic() + self.BATCH_DELAY)
            else:
                self._take(waiting, batch)
            try:
                db = self._run(db, batch, waiting)
            except Exception as exc:  # a bug, not a database failure (those fail their pieces): nobody waits forever
                discard(db)
                db = None
                for _, done in batch:
                    _settle(done, error=exc)
            last_commit = time.monotonic()
            if any(work is None for work, _ in batch):  # close(): the connection goes back to the pool
                discard(db)
                db = None
                for work, done in batch:
                    if work is None:
                        _settle(done, None)

    def _take(self, waiting: queue.SimpleQueue[Queued],
              batch: list[Queued]) -> None:
        while len(batch) < self.BATCH_MAX and not waiting.empty():
            batch.append(waiting.get())

    def _gather(self, waiting: queue.SimpleQueue[Queued], batch: list[Queued], deadline: float) -> None:
        while len(batch) < self.BATCH_MAX and (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(waiting.get(timeout=left))
            except queue.Empty:
                return

    def _run(self, db: Connection | None, batch: list[Queued],
             waiting: queue.SimpleQueue[Queued]) -> Connection | None:
        """Commit ``batch`` (grown while waiting for the lock) in one transaction, else each piece
        in its own; the connection to keep."""
        try:
            db = db if db is not None else self.engine.connect()
            results = self._commit(db, batch, waiting)
        except Exception:
            discard(db)
            db = None
            for work, done in batch:
                if work is None:
                    continue
                try:
                    db = db if db is not None else self.engine.connect()
                    _settle(done, self._commit(db, [(work, done)])[0])
                except Exception as exc:
                    discard(db)
                    db = None
                    _settle(done, error=exc)
            return db
        for (work, done), result in zip(batch, results, strict=True):
            if work is not None:
                _settle(done, result)
        return db

    def _commit(self, db: Connection, batch: list[Queued],
                waiting: queue.SimpleQueue[Queued] | None = None
                ) -> list[Record | None]:
        appended: list[Record] = []
        try:
            with self.lock, db.begin():
                seq, prev = audit.lock_head(db)
                if waiting is not None:
                    self._take(waiting, batch)  # what queued while the lock was awaited joins this transaction
                events = [None if work is None else work(db) for work, _ in batch]
                appended = audit.append(db, seq, prev, [event for event in events if event is not None])
        except Exception:
            # A connection lost during COMMIT leaves its outcome unknown: when the last record is in
            # the log (its hash covers the chain before it), the batch committed and must not run again.
            if not appended or not self._landed(appended[-1]):
                raise
        records = iter(appended)
        return [None if event is None else next(records) for event in events]

    def _landed(self, record: Record) -> bool:
        """Whether ``record`` is in the log, read on a new connection (False when that fails too)."""
        try:
            with self.engine.connect() as db:
                return db.execute(_HASH_AT, {"seq": record.seq}).scalar() == record.hash
        except Exception:
            return False


def _settle(done: Future[Record | None], result: Record | None = None, *, error: Exception | None = None) -> None:
    """Resolve ``done`` unless it is already (resolved by a failed batch, or cancelled by a caller that left)."""
    with contextlib.suppress(InvalidStateError):
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)


def discard(db: Connection | None) -> None:
    """Give a connection back to the pool (which tests or replaces one whose transaction failed)."""
    if db is not None:
        with contextlib.suppress(Exception):
            db.close()

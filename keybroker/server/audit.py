"""The audit log: append-only, hash-chained records of attestations, releases, refusals
and administrative actions.

Record ``n`` carries the hash of record ``n-1`` (``prev``; 64 zeros for the first) and its
own ``hash``: SHA-256 of the RFC 8785 canonical JSON of all its other fields. A one-row
head holds the last ``seq`` and ``hash``. Appending first locks the head (taking the
database's write lock on it, so appends from any number of replicas and workers form one
chain), then inserts the records in the same transaction as the actions they record, and
moves the head. ``verify`` recomputes
the chain: an edited record no longer matches its hash, a removed one leaves a gap in
``seq`` or a broken ``prev`` link, and records cut off the end disagree with the head.

The chain proves the log was not changed by someone who could not also rewrite every
later record and the head; to catch that too, keep the head that ``keybroker audit
verify`` prints somewhere else now and then.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine

from ..errors import StoreError
from . import schema
from .prepared import Prepared

ATTEST, RELEASE, ADMIN = "attest", "release", "admin"
ALLOW, DENY = "allow", "deny"
REASON_MAX = 2000
_VERIFY_PROBLEMS_MAX = 20


@dataclass(frozen=True)
class Event:
    """What happened: the caller's half of a record."""

    event: str            # attest | release | admin
    decision: str         # allow | deny
    reason: str
    server: str           # the replica that decided
    peer: str = ""        # the client's address
    actor: str = ""       # who administered: "token:<fingerprint>" or "local:<user>"
    session: str = ""     # reference of the RCAR session (not the cookie itself)
    provider: str = ""    # the TEE: snp, tdx, cca
    measurement: str = ""
    resource: str = ""
    policy_version: int | None = None

    def clipped(self) -> Event:
        """Every text within its column (hostile inputs such as a peer's path may be long)."""
        changes: dict[str, Any] = {name: value[:limit] for name, limit in _LIMITS.items()
                                   if len(value := getattr(self, name)) > limit}
        return replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _EVENT_FIELDS}


_EVENT_FIELDS = tuple(f.name for f in fields(Event))
#: The longest text each field's column takes.
_LIMITS: dict[str, int] = {column.name: length for column in schema.audit.columns
                           if column.name in _EVENT_FIELDS and (length := getattr(column.type, "length", None))}
_LIMITS["reason"] = REASON_MAX


@dataclass(frozen=True)
class Record:
    seq: int
    time: str
    event: Event
    prev: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, **self.event.as_dict(), "prev": self.prev, "hash": self.hash}

    def line(self) -> str:
        """The record as one line of text: seq, time, replica, event, decision, what is set, the reason."""
        e = self.event
        fields = [f"{self.seq}", self.time, e.server, e.event, e.decision]
        fields += [f"{name}={value}" for name, value in (("peer", e.peer), ("actor", e.actor), ("session", e.session),
                   ("provider", e.provider), ("measurement", e.measurement[:16]), ("resource", e.resource),
                   ("policy", e.policy_version)) if value not in ("", None)]
        return " ".join(str(field) for field in fields) + f" reason={json.dumps(e.reason, default=str)}"


@dataclass(frozen=True)
class Verification:
    records: int
    head_seq: int
    head_hash: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def digest(seq: int, time: str, event: Event, prev: str) -> str:
    content = {"seq": seq, "time": time, **event.as_dict(), "prev": prev}
    return hashlib.sha256(canonical(content)).hexdigest()


def canonical(content: dict[str, str | int | None]) -> bytes:
    """The RFC 8785 form of a record's content, by the standard library's C encoder (a pure-Python
    canonicaliser was a third of the audit writer's time). For what a record holds (ASCII
    names; text, integers and null) RFC 8785 is JSON with sorted names, no whitespace, UTF-8
    unescaped, and the escapes ``json`` makes: \\" \\\\ \\b \\f \\n \\r \\t, else \\u00xx below
    U+0020. An integer beyond I-JSON's 2**53, which only an edit puts in a record, hashes to no
    record's hash; text with half a surrogate pair cannot be encoded (UnicodeEncodeError)."""
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# The statements of every append, built once (building one costs more than running it).
_HEAD = schema.audit_head
_LOCK_HEAD = Prepared(update(_HEAD).where(_HEAD.c.id == 1).values(seq=_HEAD.c.seq).returning(_HEAD.c.seq, _HEAD.c.hash))
_MOVE_HEAD = Prepared(update(_HEAD).where(_HEAD.c.id == 1).values(seq=bindparam("head_seq"),
                                                                  hash=bindparam("head_hash")))
_INSERT = Prepared(insert(schema.audit))


def lock_head(db: Connection) -> tuple[int, str]:
    """Take the chain's write lock (until commit): the last record's seq and hash."""
    rows = _LOCK_HEAD.rows(db)
    if len(rows) != 1 or type(rows[0].seq) is not int or type(rows[0].hash) is not str:
        raise StoreError(f"the audit log's head row is {'altered' if rows else 'missing'}: nothing can be "
                         "appended to the chain (keybroker audit verify says more)")
    return rows[0].seq, rows[0].hash


def append(db: Connection, seq: int, prev: str, events: list[Event]) -> list[Record]:
    """Insert ``events`` after record ``seq`` (hash ``prev``, locked in this transaction) and move the head."""
    if not events:
        return []
    time = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    out = []
    for event in events:
        event = event.clipped()
        seq += 1
        record = Record(seq, time, event, prev, digest(seq, time, event, prev))
        out.append(record)
        prev = record.hash
    _INSERT.many(db, [{"seq": r.seq, "time": r.time, "prev": r.prev, "hash": r.hash, **r.event.as_dict()}
                      for r in out])
    _MOVE_HEAD.rows(db, {"head_seq": seq, "head_hash": prev})
    return out


def records(engine: Engine, *, after: int = 0, limit: int | None = None) -> Iterator[Record]:
    """Records with ``seq > after`` in order (at most ``limit``), read in batches."""
    with engine.connect() as db:
        yield from _records(db, after=after, limit=limit)


def _records(db: Connection, *, after: int = 0, limit: int | None = None) -> Iterator[Record]:
    query = select(schema.audit).where(schema.audit.c.seq > after).order_by(schema.audit.c.seq)
    if limit is not None:
        query = query.limit(limit)
    for row in db.execution_options(yield_per=1000).execute(query):
        yield _record(row)


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one state of the log, whatever is committed meanwhile.

    The head and the records it vouches for must be read together: read apart, every append
    in between looks like records cut off the end. PostgreSQL gives one snapshot to a
    REPEATABLE READ transaction; SQLite (WAL) to a read transaction, which pysqlite does not
    begin before a SELECT, so it is begun here.
    """
    with engine.connect() as db:
        if db.dialect.name == "postgresql":
            db.execution_options(isolation_level="REPEATABLE READ")
        with db.begin():
            if db.dialect.name == "sqlite" and not db.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
                db.exec_driver_sql("BEGIN")
            yield db


def head(engine: Engine) -> tuple[int, str]:
    """The last record's seq and hash: keep them outside the database to detect a rewrite of the whole chain."""
    with engine.connect() as db:
        found = _head(db)
    if found is None:
        raise StoreError(f"the audit log has no head row: {_NO_HEAD}")
    if found is _MALFORMED_HEAD:
        raise StoreError("the audit log's head row holds a value of the wrong type: it was edited "
                         "(keybroker audit verify says more)")
    return found


_NO_HEAD = "it was deleted, or this is not a keybroker database"


def _head(db: Connection) -> tuple[int, str] | None:
    """The head row's seq and hash; None when the row is gone (reading never puts one back),
    _MALFORMED_HEAD when it holds a value of another type (an edit: SQLite keeps any type)."""
    row = db.execute(select(schema.audit_head.c.seq, schema.audit_head.c.hash)).first()
    if row is None:
        return None
    if type(row.seq) is not int or not isinstance(row.hash, str):
        return _MALFORMED_HEAD
    return row.seq, row.hash


_MALFORMED_HEAD = (-1, "")


def _well_typed(record: Record) -> bool:
    """Whether every column of ``record`` holds what the log writes there."""
    event = record.event
    texts = [record.time, record.prev, record.hash] + [getattr(event, name) for name in _EVENT_FIELDS
                                                       if name != "policy_version"]
    return all(isinstance(text, str) for text in texts) and (event.policy_version is None
                                                             or type(event.policy_version) is int)


def verify(engine: Engine, known: tuple[int, str] | None = None) -> Verification:
    """Recompute the chain; with ``known`` (a head exported earlier), that record must still be in it.

    The head and the records are read in one snapshot (see ``_snapshot``), so that appends
    committed while a live server's log is verified are neither seen nor taken for tampering.
    """
    with _snapshot(engine) as db:
        found = _head(db)
        return _verify(_records(db), found, known)


def _verify(chain: Iterator[Record], head: tuple[int, str] | None, known: tuple[int, str] | None) -> Verification:
    problems: list[str] = []  # what the kept head and the head row show, and the first records' problems
    unshown = 0  # the records' problems past _VERIFY_PROBLEMS_MAX: counted, not kept (every record may have one)

    def problem(text: str) -> None:
        nonlocal unshown
        if len(problems) < _VERIFY_PROBLEMS_MAX:
            problems.append(text)
        else:
            unshown += 1

    expected, prev, count = 1, schema.GENESIS, 0
    # Record 0 is the empty log, whose head `audit head` prints as 0:GENESIS: every chain starts there.
    seen_known = known is not None and known[0] == 0
    if seen_known and known is not None and known[1] != schema.GENESIS:
        problems.append(f"the kept head 0:{known[1][:16]}... is not the empty log's (0:{schema.GENESIS[:16]}...)")
    for record in chain:
        count += 1
        # SQLite keeps a value of any type in any column: only an edit puts one of another type there.
        if type(record.seq) is not int:  # sorted apart from the numbers: no place in the chain
            problem(f"a record's seq is {str(record.seq)[:40]!r}, not a number (edited)")
            continue
        if not _well_typed(record):
            problem(f"record {record.seq}: a column holds a value of the wrong type (edited)")
            expected, prev = record.seq + 1, str(record.hash)
            continue
        if known is not None and record.seq == known[0]:
            seen_known = True
            if record.hash != known[1]:
                problems.append(f"record {record.seq} is not the one whose hash was kept ({known[1][:16]}...): "
                                "the chain was rewritten since")
        if record.seq != expected:
            gap = f"{expected}" if record.seq == expected + 1 else f"{expected} to {record.seq - 1}"
            problem(f"record {gap} missing (removed from the log)")
        if record.prev != prev:
            problem(f"record {record.seq}: its prev link does not match the hash of the record before it")
        if digest(record.seq, record.time, record.event, record.prev) != record.hash:
            problem(f"record {record.seq}: its content does not match its hash (edited)")
        expected, prev = record.seq + 1, record.hash
    head_seq, head_hash = head or (0, "")
    if head is _MALFORMED_HEAD:
        problems.append("the head row holds a value of the wrong type (the head was edited)")
    elif head is None:  # the end of the chain cannot be checked: a problem, not a head to assume
        problems.append(f"the head row is missing ({_NO_HEAD}): records cut off the end cannot be told")
    elif head_seq != expected - 1:
        problems.append(f"the log ends at record {expected - 1} but the head says {head_seq} were written "
                        "(records removed from the end, or the head edited)")
    elif head_hash != prev:
        problems.append(f"the head hash differs from record {head_seq}'s hash (the last record or the head "
                        "was edited)")
    if known is not None and not seen_known:
        problems.append(f"record {known[0]}, whose hash was kept, is gone: the chain was cut or rewritten since")
    if unshown:
        problems.append(f"... and {unshown} more problems")
    return Verification(count, head_seq, head_hash, tuple(problems))


def _record(row: Any) -> Record:
    event = Event(**{name: getattr(row, name) for name in _EVENT_FIELDS})
    return Record(row.seq, row.time, event, row.prev, row.hash)

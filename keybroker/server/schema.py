"""The key server's database: its tables, and how to open it (SQLAlchemy Core).

Embedded SQLite by default (``sqlite:///path``): WAL journal, ``synchronous=FULL`` so that
a committed audit record survives a crash of the process or the machine, file mode 0600.
PostgreSQL (``postgresql://…``, through psycopg 3) lets replicas share one database;
there the schema is created under an advisory lock, so replicas may start together.

The audit table refuses UPDATE and DELETE (a trigger): the application only appends, and
whoever edits it by hand must drop the trigger first — ``keybroker audit verify`` still
sees the edit.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from ..errors import ConfigError, StoreError

SCHEMA_VERSION = "1"
GENESIS = "0" * 64  # the "previous hash" of the first audit record

metadata = MetaData()

meta = Table(
    "keybroker_meta", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
)

resources = Table(
    "resources", metadata,
    Column("path", String(200), primary_key=True),
    Column("kek_id", String(16), nullable=False),
    Column("sealed", LargeBinary, nullable=False),  # nonce || AES-256-GCM ciphertext || tag
    Column("lease", Integer, nullable=True),
    Column("updated", Float, nullable=False),
)

sessions = Table(
    "sessions", metadata,
    Column("id", String(64), primary_key=True),
    Column("tee", String(16), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("state", String(16), nullable=False),  # attested | failed (old databases: also authed)
    Column("expires", Float, nullable=False),
    Column("tee_pubkey", Text, nullable=True),
    Column("claims", Text, nullable=True),
    Column("mac", String(43), nullable=True),  # sealing.RowMac over the others (old databases: none)
)
# Expired sessions are deleted through it: no request scans the table.
sessions_expires = Index("sessions_expires", sessions.c.expires)

policies = Table(
    "policies", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("digest", String(64), nullable=False),
    Column("document", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("mac", String(43), nullable=True),  # sealing.RowMac over the others (old databases: none)
)

audit = Table(
    "audit", metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", String(32), nullable=False),
    Column("server", String(200), nullable=False),
    Column("event", String(16), nullable=False),
    Column("decision", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("peer", String(64), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("session", String(32), nullable=False),
    Column("provider", String(32), nullable=False),
    Column("measurement", String(200), nullable=False),
    Column("resource", String(200), nullable=False),
    Column("policy_version", Integer, nullable=True),
    Column("prev", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

# One row: the last record's seq and hash. Appending updates it first, which serialises
# appends across processes, and it shows when records were cut off the end of the log.
audit_head = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

_APPEND_ONLY = "the audit log is append-only"
event.listen(audit, "after_create", DDL(
    f"CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
).execute_if(dialect="sqlite"))
event.listen(audit, "after_create", DDL(
    f"CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
).execute_if(dialect="sqlite"))
event.listen(audit, "after_create", DDL(
    "CREATE FUNCTION keybroker_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN RAISE EXCEPTION '{_APPEND_ONLY}'; END $$"
).execute_if(dialect="postgresql"))
event.listen(audit, "after_create", DDL(
    "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit "
    "FOR EACH STATEMENT EXECUTE FUNCTION keybroker_audit_append_only()"
).execute_if(dialect="postgresql"))


def open_engine(url: str) -> Engine:
    """An engine for ``url`` with the schema in place (created on first use); a commit is on disk
    when it returns (SQLite ``synchronous=FULL``, PostgreSQL's default)."""
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    engine = _sqlite(parsed) if backend == "sqlite" else _postgresql(parsed)
    # Processes opening the database together create or change the schema once: SQLite's
    # inspect-then-ALTER is no transaction the others wait for, so they take the writers' lock.
    try:
        with writer_lock(url), engine.begin() as db:
            if backend == "postgresql":  # replicas starting together create the schema once
                db.execute(text("SELECT pg_advisory_xact_lock(7190542273413361729)"))
            metadata.create_all(db)
            _initialise(db)
    except SQLAlchemyError as exc:
        raise store_error(parsed, exc) from None
    return engine


def open_existing(url: str) -> Engine:
    """A read-only engine for the keybroker database at ``url``, which must exist whole.

    What inspects a database (``keybroker audit``) must not make or mend it: a mistyped
    SQLite path would become an empty log reported intact, and dropped audit tables would
    come back empty and intact. So nothing is created: SQLite opens an existing file
    read-only, PostgreSQL sessions are read-only, and a missing table is an error.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_read_only(parsed)
    else:
        engine = _postgresql(parsed, options="-c default_transaction_read_only=on")
    try:
        with engine.connect() as db:
            _check_existing(db, parsed)
    except SQLAlchemyError as exc:
        raise store_error(parsed, exc) from None
    return engine


def _parse(url: str) -> Any:
    """The URL of a database keybroker can store in, else a ConfigError saying what it takes."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--db {url!r} is not a database URL (e.g. sqlite:////var/lib/keybroker/kbs.db "
                          "or postgresql://keybroker@db.example/keybroker)") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"--db {parsed.drivername}: keybroker stores in SQLite (sqlite:///PATH) or "
                          "PostgreSQL (postgresql://…)")
    if parsed.get_backend_name() == "sqlite" and (not parsed.database or parsed.database == ":memory:"):
        raise ConfigError("--db needs a SQLite file (sqlite:///path), not an in-memory database")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _postgresql(parsed: Any, **connect_args: Any) -> Engine:
    try:
        # A host that stops answering (a partition, not a refusal) ends a connection within
        # 20 s, not after TCP's retransmissions (15 min): the reads that wait on it give up
        # after store.READ_WAIT, and their threads come back soon after.
        return create_engine(parsed, pool_pre_ping=True, connect_args={
            "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 2, "tcp_user_timeout": 20000, **connect_args})
    except ImportError:
        raise ConfigError("--db postgresql://… needs psycopg 3: pip install 'keybroker[postgresql]'") from None


def store_error(parsed: Any, exc: SQLAlchemyError) -> StoreError:
    """The driver's first line of ``exc``, naming the database but not its password."""
    cause = getattr(exc, "orig", None) or exc
    return StoreError(f"database {parsed.render_as_string(hide_password=True)}: "
                      f"{str(cause).strip().splitlines()[0]}")


class WriterLock:
    """One writing transaction at a time across the key server's processes, for SQLite.

    SQLite lets one connection write; another that wants to waits in its busy handler, which
    sleeps 1, 2, 5, 10, 15, 20, 25… ms between tries: under concurrent releases the sleeps, not
    the work, made the latency. Writers queue here instead, on an flock of a file beside the
    database, and the next is woken as soon as the lock is released. PostgreSQL queues writers
    itself: there, this does nothing.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._local = threading.local()

    def __enter__(self) -> None:
        if self.path is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._local.fd = fd

    def __exit__(self, *_: object) -> None:
        if self.path is not None:
            os.close(self._local.fd)  # and with it the lock


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL; None for PostgreSQL."""
    parsed = _parse(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" else None


def writer_lock(url: str) -> WriterLock:
    """The WriterLock for the database at ``url`` (an already checked URL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return WriterLock(None)
    return WriterLock(Path(f"{parsed.database}-writer.lock"))


def _sqlite(parsed: Any) -> Engine:
    path = Path(parsed.database)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # secrets live here, sealed or not
    engine = create_engine(parsed, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
    return engine


def _sqlite_read_only(parsed: Any) -> Engine:
    """An engine that opens the existing file of ``parsed`` read-only (SQLite's ``mode=ro``)."""
    path = Path(parsed.database).absolute()
    if not path.is_file():
        raise StoreError(f"database {parsed.render_as_string()}: there is no file {path} (is --db right? "
                         "nothing is created to be read)")
    uri = f"{path.as_uri()}?mode=ro"
    return create_engine("sqlite://", poolclass=NullPool,
                         creator=lambda: sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False))


def _check_existing(db: Connection, parsed: Any) -> None:
    """Refuse a database without keybroker's schema of this version or without its audit tables."""
    missing = [table.name for table in (meta, audit, audit_head) if not inspect(db).has_table(table.name)]
    if missing:
        raise StoreError(f"database {parsed.render_as_string(hide_password=True)} has no table "
                         f"{', '.join(missing)}: not a keybroker database, or its tables were dropped")
    version = db.execute(select(meta.c.value).where(meta.c.name == "schema")).scalar()
    if version != SCHEMA_VERSION:
        raise ConfigError(f"the database has keybroker schema {version or 'none'}; this keybroker uses "
                          f"{SCHEMA_VERSION}")


def _initialise(db: Connection) -> None:
    version = db.execute(select(meta.c.value).where(meta.c.name == "schema")).scalar()
    if version is None:
        db.execute(insert(meta).values(name="schema", value=SCHEMA_VERSION))
    elif version != SCHEMA_VERSION:
        raise ConfigError(f"the database has keybroker schema {version}; this keybroker uses {SCHEMA_VERSION}")
    sessions_expires.create(db, checkfirst=True)  # databases made before the index
    for table in ("sessions", "policies"):
        if "mac" not in {column["name"] for column in inspect(db).get_columns(table)}:
            # Databases made before rows carried a MAC: their rows have none and are not believed (a
            # session's guest attests again; a policy is put again).
            db.execute(text(f"ALTER TABLE {table} ADD COLUMN mac VARCHAR(43)"))
    if db.execute(select(audit_head.c.seq)).first() is None:
        db.execute(insert(audit_head).values(id=1, seq=0, hash=GENESIS))

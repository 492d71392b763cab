"""The key server's storage (SQLAlchemy Core): resources and RCAR sessions.

Embedded SQLite by default (``sqlite:///path``, WAL journal, file mode 0600); any URL
SQLAlchemy knows works the same way. Sessions live in the database, so a nonce is
consumed by one atomic UPDATE however many server processes share it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (Column, Float, Integer, LargeBinary, MetaData, String, Table, Text, create_engine,
                        delete, event, insert, select, update)
from sqlalchemy.engine import Engine, make_url

from ..errors import ConfigError

metadata = MetaData()

resources = Table(
    "resources", metadata,
    Column("path", String(200), primary_key=True),
    Column("value", LargeBinary, nullable=False),
    Column("lease", Integer, nullable=True),
    Column("updated", Float, nullable=False),
)

sessions = Table(
    "sessions", metadata,
    Column("id", String(64), primary_key=True),
    Column("tee", String(16), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("state", String(16), nullable=False),  # authed -> attesting -> attested | failed
    Column("expires", Float, nullable=False),
    Column("tee_pubkey", Text, nullable=True),
    Column("claims", Text, nullable=True),
)


@dataclass(frozen=True)
class Resource:
    path: str
    value: bytes
    lease: int | None


@dataclass(frozen=True)
class Session:
    id: str
    tee: str
    nonce: str
    state: str
    expires: float
    tee_pubkey: dict[str, str] | None
    claims: dict[str, Any] | None


def open_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"--db {url!r} is not a database URL (e.g. sqlite:////var/lib/keybroker/kbs.db)") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError("--db needs a SQLite file (sqlite:///path), not an in-memory database")
        path = Path(parsed.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # secrets live here
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    return engine


class Store:
    def __init__(self, url: str) -> None:
        self.engine = open_engine(url)

    # -- resources -----------------------------------------------------------------------

    def put_resource(self, path: str, value: bytes, lease: int | None = None) -> None:
        with self.engine.begin() as db:
            db.execute(delete(resources).where(resources.c.path == path))
            db.execute(insert(resources).values(path=path, value=value, lease=lease, updated=time.time()))

    def get_resource(self, path: str) -> Resource | None:
        with self.engine.connect() as db:
            row = db.execute(select(resources).where(resources.c.path == path)).first()
        return None if row is None else Resource(row.path, row.value, row.lease)

    def delete_resource(self, path: str) -> bool:
        with self.engine.begin() as db:
            return db.execute(delete(resources).where(resources.c.path == path)).rowcount > 0

    def list_resources(self) -> list[tuple[str, int, int | None]]:
        """(path, size, lease) of every resource; the values stay in the database."""
        with self.engine.connect() as db:
            rows = db.execute(select(resources.c.path, resources.c.value, resources.c.lease)
                              .order_by(resources.c.path)).all()
        return [(row.path, len(row.value), row.lease) for row in rows]

    # -- sessions ------------------------------------------------------------------------

    def create_session(self, session_id: str, tee: str, nonce: str, lifetime: float) -> None:
        now = time.time()
        with self.engine.begin() as db:
            db.execute(delete(sessions).where(sessions.c.expires < now - 3600))
            db.execute(insert(sessions).values(id=session_id, tee=tee, nonce=nonce, state="authed",
                                               expires=now + lifetime))

    def consume_nonce(self, session_id: str, nonce: str) -> Session | None:
        """Atomically move an unexpired, unused session from authed to attesting."""
        with self.engine.begin() as db:
            done = db.execute(update(sessions)
                              .where(sessions.c.id == session_id, sessions.c.nonce == nonce,
                                     sessions.c.state == "authed", sessions.c.expires > time.time())
                              .values(state="attesting")).rowcount
        return self.get_session(session_id) if done == 1 else None

    def finish_attestation(self, session_id: str, *, claims: dict[str, Any] | None,
                           tee_pubkey: dict[str, str] | None) -> None:
        state = "attested" if claims is not None else "failed"
        with self.engine.begin() as db:
            db.execute(update(sessions).where(sessions.c.id == session_id)
                       .values(state=state, claims=json.dumps(claims) if claims is not None else None,
                               tee_pubkey=json.dumps(tee_pubkey) if tee_pubkey is not None else None))

    def get_session(self, session_id: str) -> Session | None:
        with self.engine.connect() as db:
            row = db.execute(select(sessions).where(sessions.c.id == session_id)).first()
        if row is None:
            return None
        return Session(row.id, row.tee, row.nonce, row.state, row.expires,
                       json.loads(row.tee_pubkey) if row.tee_pubkey else None,
                       json.loads(row.claims) if row.claims else None)

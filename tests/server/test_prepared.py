"""Statements run on the driver's cursor keep SQLAlchemy's contract: the dialect's SQL, the
driver's errors as DBAPIError (a database's refusal is a 503, not a traceback), rows by name."""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import bindparam, delete, select, text, update
from sqlalchemy.exc import DBAPIError

from keybroker.errors import StoreError
from keybroker.server import audit, schema
from keybroker.server.audit import ADMIN, ALLOW, Event
from keybroker.server.prepared import Prepared

HEAD = Prepared(select(schema.audit_head.c.seq, schema.audit_head.c.hash).where(schema.audit_head.c.id == 1))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """An engine on a new database: SQLite's driver binds by position, psycopg's by name."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/kbs.db"
        else:
            from support.postgres import fresh_database

            url = stack.enter_context(fresh_database(request.getfixturevalue("postgres")))
        engine = schema.open_engine(url)
        stack.callback(engine.dispose)
        yield engine


def test_rows_are_named_and_the_statements_own_values_are_bound(engine):
    with engine.connect() as db:
        row = HEAD.first(db)
        assert (row.seq, row.hash) == (0, schema.GENESIS)
        assert Prepared(select(schema.audit.c.seq).where(schema.audit.c.seq == bindparam("seq"))).rows(
            db, {"seq": 1}) == []


def test_a_misspelt_parameter_is_an_error_not_null(engine):
    exists = Prepared(select(schema.sessions.c.id).where(schema.sessions.c.id == bindparam("session_id")))
    with engine.connect() as db, pytest.raises(KeyError, match="no parameter sesion_id"):
        exists.first(db, {"sesion_id": "x"})


def test_a_drivers_error_is_sqlalchemys(engine):
    with engine.begin() as db:
        db.execute(text("DROP TABLE sessions"))
    exists = Prepared(select(schema.sessions.c.id).where(schema.sessions.c.id == bindparam("session_id")))
    gone = r'no such table: sessions|relation "sessions" does not exist'  # SQLite's, PostgreSQL's
    with engine.connect() as db, pytest.raises(DBAPIError, match=gone):
        exists.first(db, {"session_id": "x"})
    with engine.connect() as db, pytest.raises(DBAPIError, match=gone):
        Prepared(schema.sessions.insert()).many(db, [{"id": "x"}])


@pytest.mark.parametrize("edit", ["missing", "altered"])
def test_an_append_after_the_head_row_was_edited_is_a_store_error(engine, edit):
    if edit == "altered" and engine.dialect.name == "postgresql":
        pytest.skip("PostgreSQL keeps only numbers in a BIGINT column")
    change = delete(schema.audit_head) if edit == "missing" else update(schema.audit_head).values(seq="x")
    with engine.begin() as db:
        db.execute(change)
    with engine.begin() as db, pytest.raises(StoreError, match=f"head row is {edit}"):
        seq, prev = audit.lock_head(db)
        audit.append(db, seq, prev, [Event(ADMIN, ALLOW, "x", "test")])


def test_a_connection_its_driver_closed_is_a_drivers_error(engine):
    """Even the cursor's making: a raw error there became a 500 with a traceback."""
    db = engine.connect()
    db.connection.dbapi_connection.close()
    with pytest.raises(DBAPIError, match="closed"):
        HEAD.first(db)
    db.invalidate()

"""Statements of the release path, compiled once per database and run on the driver's cursor.

SQLAlchemy Core's work on each execution (its statement cache, parameter and result
processing, the result object) cost four times what SQLite spends on these statements:
about 80 µs against 20 per statement, six or more per release. A :class:`Prepared` statement
is compiled by SQLAlchemy (so its SQL is the dialect's, as for any other statement), once, and
then runs on the DBAPI cursor of the :class:`~sqlalchemy.engine.Connection` it is given, inside
that connection's transaction. Its columns are plain (text, integers, floats, bytes), which both
drivers take and return as they are. A driver's error is raised as SQLAlchemy's ``DBAPIError``,
as from any other statement, so that callers tell a database's refusal the same way.
"""

from __future__ import annotations

import contextlib
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class Prepared:
    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, str, str], tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        self._rows: dict[tuple[str, ...], Any] = {}  # column names -> the namedtuple of rows

    def rows(self, db: Connection, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Run with ``params``; the rows it returns (none for a statement that returns none), each
        a named tuple of the columns."""
        sql, values = self._bind(db.dialect, params or {})
        with _cursor(db, sql, values) as cursor:
            cursor.execute(sql, values)
            if cursor.description is None:
                return []
            names = tuple(column[0] for column in cursor.description)
            row = self._rows.get(names) or self._rows.setdefault(names, namedtuple("Row", names))
            return [row._make(found) for found in cursor.fetchall()]

    def first(self, db: Connection, params: Mapping[str, Any] | None = None) -> Any | None:
        rows = self.rows(db, params)
        return rows[0] if rows else None

    def many(self, db: Connection, params: Sequence[Mapping[str, Any]]) -> None:
        """Run once for each of ``params`` (an INSERT of many rows)."""
        if not params:
            return
        binds = [self._bind(db.dialect, one) for one in params]
        sql = binds[0][0]
        with _cursor(db, sql, binds[0][1]) as cursor:
            cursor.executemany(sql, [values for _, values in binds])

    def _bind(self, dialect: Dialect, params: Mapping[str, Any]) -> tuple[str, Any]:
        """The dialect's SQL and its parameters (positional or named, as its driver takes them):
        ``params`` over the values the statement carries (a LIMIT, a literal it compares with)."""
        key = (dialect.name, dialect.driver, dialect.paramstyle)
        compiled = self._compiled.get(key)
        if compiled is None:
            done = self.statement.compile(dialect=dialect)
            assert isinstance(done, SQLCompiler)
            order = tuple(done.positiontup) if done.positional and done.positiontup is not None else None
            compiled = self._compiled[key] = (str(done), order, dict(done.params))
        sql, order, defaults = compiled
        merged = defaults | dict(params)
        unknown = set(params) - set(defaults)
        if unknown:  # a misspelt name would otherwise bind NULL
            raise KeyError(f"the statement has no parameter {', '.join(sorted(unknown))}")
        return sql, [merged[name] for name in order] if order is not None else merged


@contextlib.contextmanager
def _cursor(db: Connection, sql: str, values: Any) -> Iterator[Any]:
    """A cursor of ``db``'s driver connection; the driver's errors raised as SQLAlchemy's."""
    error = db.dialect.loaded_dbapi.Error
    try:
        cursor = db.connection.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
    except error as exc:
        gone = db.dialect.is_disconnect(exc, db.connection.dbapi_connection, None)
        raise DBAPIError.instance(sql, values, exc, error, connection_invalidated=gone) from None

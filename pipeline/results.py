"""Read-only SQL over the catalogue and results (the ``query`` command).

The SQL text goes to the database driver untouched (no bind-parameter parsing: ``:x`` and
``%`` mean what they mean in SQL), and rows stream back, so memory stays flat whatever the
result's size. Read-only means no side effects at all:

* SQLite: an authorizer admits reading statements only (SELECT, reads, functions, recursive
  CTEs, and informational pragmas such as ``table_info``); ``ATTACH``, ``VACUUM INTO``,
  writing pragmas and every write are refused while the statement is prepared, before
  anything happens (no file is created).
* PostgreSQL: a ``READ ONLY`` transaction, rolled back; ``COPY`` is refused. For a shared
  server, give researchers a role with SELECT rights only as well.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.resources import ready_queries

FETCH = 1000  # rows per round trip

_SQLITE_READING = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_SQLITE_INFO_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                        "foreign_key_list", "collation_list", "function_list", "pragma_list",
                        "database_list", "compile_options"}


class QueryError(CxrlabelError):
    pass


def statement(sql: str) -> str:
    """The SQL of a ``query`` argument: a ready query's name (``ctr_by_group``), a ``.sql``
    file, or the statement itself."""
    ready = ready_queries()
    if sql in ready:
        return ready[sql].read_text()
    if sql.endswith(".sql"):
        path = Path(sql)
        if not path.is_file():
            raise QueryError(f"{sql}: no such file; ready queries: {', '.join(ready)}")
        return path.read_text()
    return sql


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action in _SQLITE_READING and not (action == sqlite3.SQLITE_FUNCTION and arg2 == "load_extension"):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _SQLITE_INFO_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


@dataclass
class QueryResult:
    columns: list[str]
    rows: Iterator[dict]  # streamed: read once


def read_only_query(engine: Engine, sql: str) -> QueryResult:
    """The columns and streamed rows of one SQL statement, run so that it cannot write.

    Errors (a refused or failing statement) are raised here, before any row is read.
    """
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise QueryError("empty query")
    dialect = engine.dialect.name
    if dialect == "postgresql" and sql.split(None, 1)[0].upper() == "COPY":
        raise QueryError("query refused: the query command is read-only (COPY is not run)")
    raw = engine.raw_connection()
    dbapi = raw.driver_connection
    cur = None
    try:
        if dialect == "sqlite":
            dbapi.set_authorizer(_authorize)
        elif dialect == "postgresql":
            raw.cursor().execute("SET TRANSACTION READ ONLY")
        cur = _execute(raw, dbapi, dialect, sql)
        if cur.description is None:
            raise QueryError("the query returned no rows (only SELECT-like statements are run)")
        columns = [d[0] for d in cur.description]
        return QueryResult(columns, _stream(raw, dbapi, dialect, cur, columns))
    except BaseException:
        _close(raw, dbapi, dialect, cur)
        raise


def _execute(raw, dbapi, dialect: str, sql: str):
    """A cursor on ``sql``: on PostgreSQL a server-side one (rows stream), unless the
    statement is not a query such a cursor takes (EXPLAIN, SHOW)."""
    if dialect == "postgresql":
        cur = dbapi.cursor(name="cxrlabel_query")
        cur.itersize = FETCH
        try:
            cur.execute(sql)
            return cur
        except Exception as e:
            cur.close()
            if "cursor" not in str(e).lower():
                raise _query_error(e) from e
            raw.rollback()  # DECLARE refused the statement: run it plainly (small results)
            raw.cursor().execute("SET TRANSACTION READ ONLY")
    cur = dbapi.cursor()
    try:
        cur.execute(sql)
    except Exception as e:  # the driver's own errors: sqlite3.Error, psycopg.Error
        cur.close()
        raise _query_error(e) from e
    return cur


def _stream(raw, dbapi, dialect: str, cur, columns: list[str]) -> Iterator[dict]:
    try:
        while rows := cur.fetchmany(FETCH):
            for row in rows:
                yield dict(zip(columns, row, strict=True))
    finally:
        _close(raw, dbapi, dialect, cur)


def _close(raw, dbapi, dialect: str, cur) -> None:
    if cur is not None:
        cur.close()
    if dialect == "sqlite":
        dbapi.set_authorizer(None)
    raw.rollback()
    raw.close()


def _query_error(e: Exception) -> QueryError:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    low = msg.lower()
    if "not authorized" in low or "authorization denied" in low or D.is_read_only_error(e):
        return QueryError(f"query refused: the query command is read-only ({msg})")
    return QueryError(f"SQL error: {msg}")

"""Read-only SQL over the catalogue and results (the `query` command)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline import CxrlabelError
from pipeline.resources import ready_queries


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


def read_only_query(engine: Engine, sql: str, max_rows: int = 100_000) -> list[dict]:
    """Rows of one SQL statement, run so that it cannot write.

    SQLite: ``PRAGMA query_only`` on the connection; PostgreSQL: a READ ONLY transaction.
    The transaction is rolled back in any case.
    """
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise QueryError("empty query")
    if ";" in sql:
        raise QueryError("one statement at a time, please (found ';' inside the query)")
    with engine.connect() as conn:
        dialect = conn.dialect.name
        try:
            if dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA query_only = ON")
            elif dialect == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            result = conn.execute(text(sql))
            if not result.returns_rows:
                raise QueryError("the query returned no rows (only SELECT-like statements are run)")
            rows = [dict(r._mapping) for r in result.fetchmany(max_rows)]
        except SQLAlchemyError as e:
            msg = str(getattr(e, "orig", e)).splitlines()[0]
            if "readonly" in msg.lower() or "read-only" in msg.lower() or "read only" in msg.lower():
                raise QueryError(f"query refused: the query command is read-only ({msg})") from e
            raise QueryError(f"SQL error: {msg}") from e
        finally:
            conn.rollback()
            if dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA query_only = OFF")
    return rows

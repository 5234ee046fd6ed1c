"""Rows in and out, the same on SQLite and PostgreSQL: the upsert, rows looked up by a list of
keys in chunks the drivers accept, failures recorded and cleared."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    Table,
    bindparam,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql import ColumnElement, Select

from pipeline.db.engine import DatabaseError
from pipeline.db.schema import failures, utcnow

# Values per ``IN (...)`` list: SQLite builds before 3.32 allow 999 host parameters a
# statement; 900 leaves room for the query's other parameters.
IN_CHUNK = 900

T = TypeVar("T")


def upsert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str],
           update: Sequence[str] | None = None) -> None:
    """Insert ``rows`` into ``table``; where the keys exist, update ``update`` columns (default:
    every non-key column given).

    Uses the dialect's ON CONFLICT (SQLite and PostgreSQL share the syntax); every row must
    carry the same columns and no two rows the same keys.
    """
    if not rows:
        return
    columns = tuple(rows[0])
    sql, order, procs = _upsert_sql(conn.dialect, table, columns, tuple(keys),
                                    tuple(update) if update is not None else None)
    _executemany(conn, sql, order, procs, rows)


@functools.lru_cache(maxsize=256)
def _upsert_sql(dialect: Any, table: Table, columns: tuple[str, ...], keys: tuple[str, ...],
                update: tuple[str, ...] | None) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
    """The upsert of ``columns`` into ``table`` compiled for ``dialect``: its SQL, the order of
    its parameters (None: named ones) and each column's bind processor. Compiled once per
    table and columns (a labelling batch writes the same ones every time: compiling them took
    a few milliseconds a batch)."""
    insert: Any
    if dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[no-redef]
    else:
        raise DatabaseError(f"database {dialect.name!r} is not supported: use SQLite or PostgreSQL")
    stmt = insert(table).values({c: bindparam(c) for c in columns})
    names = update if update is not None else [c for c in columns if c not in keys]
    updates = {c: stmt.excluded[c] for c in names}
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates) if updates \
        else stmt.on_conflict_do_nothing(index_elements=list(keys))
    compiled = stmt.compile(dialect=dialect)
    procs = {c: p for c in columns if (p := table.c[c].type.bind_processor(dialect))}
    order = compiled.positiontup  # qmark/format dialects; named ones (psycopg) take the dicts
    return str(compiled), tuple(order) if order is not None else None, procs


def _executemany(conn: Connection, sql: str, order: tuple[str, ...] | None, procs: dict[str, Any],
                 rows: Sequence[dict[str, Any]]) -> None:
    """Execute the compiled ``sql`` for many rows at the driver level, each column's bind
    processor applied: what SQLAlchemy does per row, but several times faster for bulk loads
    (catalogues of millions of rows)."""
    if procs:
        rows = [{**r, **{c: p(r[c]) for c, p in procs.items()}} for r in rows]
    params: list = [tuple(map(r.__getitem__, order)) for r in rows] if order is not None else list(rows)
    conn.exec_driver_sql(sql, params)


def chunks(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """``values`` in consecutive slices of at most ``size``."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def rows_in(conn: Connection, query: Select, column: ColumnElement, values: Sequence[Any]) -> Iterator[Row]:
    """Rows of ``query`` where ``column`` is one of ``values``, in ``IN`` lists of
    :data:`IN_CHUNK`: the one way every module looks rows up by a list of keys."""
    for part in chunks(list(values)):
        yield from conn.execute(query.where(column.in_(part)))


def record_failure(conn: Connection, stage: str, uid: str | None, error: BaseException | str,
                   error_class: str | None = None) -> None:
    """The row in ``failures`` for an image a stage could not process: one per stage and uid,
    its message and ``last_seen_at`` renewed when the problem repeats."""
    now = utcnow()
    upsert(conn, failures, [{
        "stage": stage, "uid": uid,
        "error_class": error_class or (type(error).__name__ if isinstance(error, BaseException) else "Error"),
        "message": str(error)[:2000], "created_at": now, "last_seen_at": now,
    }], ["stage", "uid"], update=["error_class", "message", "last_seen_at"])


def clear_failures(conn: Connection, stage: str, uids: Sequence[str]) -> None:
    """Forget the failures of ``uids`` at ``stage``: they have now been processed."""
    for part in chunks(list(uids)):
        conn.execute(failures.delete().where(failures.c.stage == stage, failures.c.uid.in_(part)))

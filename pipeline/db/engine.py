"""Engines from a URL (``--db``, ``CXRLABEL_DB``): SQLite's connection settings, PostgreSQL's
timeouts, a read-only engine for ``query``."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine import Connection, Engine

from pipeline import CxrlabelError

log = logging.getLogger(__name__)


DEFAULT_URL = "sqlite:///data/catalogue.db"


class DatabaseError(CxrlabelError):
    pass


def resolve_url(url: str | None = None) -> str:
    """The database URL: the argument, else ``CXRLABEL_DB``, else ``sqlite:///data/catalogue.db``."""
    return url or os.environ.get("CXRLABEL_DB") or DEFAULT_URL


def display_url(url: str | None = None) -> str:
    """The database URL as messages show it: the password masked."""
    url = resolve_url(url)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: shown as given, minus anything before an @
        return url.rsplit("@", 1)[-1]


def first_line(e: BaseException) -> str:
    """An error's first line (drivers add hints and SQL on further lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


CONNECT_TIMEOUT = 5  # seconds: an unreachable PostgreSQL server is an error, not a wait


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling would begin late and never BEGIN IMMEDIATE: the
    # "begin" listener below emits BEGIN itself (SQLAlchemy's documented recipe)
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")  # a write when the file is in another mode
    except sqlite3.OperationalError as e:  # a read-only database keeps its mode
        log.debug("journal_mode left as it is: %s", e)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write_lock") else "BEGIN")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (``sqlite:///x.db``, ``sqlite:///~/x.db``, or a
    ``file:`` URI with ``uri=true``); None for other databases and in-memory ones."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    name = u.database
    if u.query.get("uri") == "true" and name.startswith("file:"):
        name = name.removeprefix("file:").split("?")[0]
        if not name or name == ":memory:" or u.query.get("mode") == "memory":
            return None
    return Path(name).expanduser()


def _sqlite_connect_read_only(dbapi_conn: Any, _record: Any) -> None:
    # the file stays as it is: no journal-mode switch, and SQLite itself refuses any write
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA query_only=ON")
    cur.close()


def make_engine(url: str | None = None, read_only: bool = False) -> Engine:
    """Engine for ``url``; SQLite gets WAL, foreign keys, a busy timeout, explicit
    transactions and ``~`` expanded. The default database's folder (``data/``) is created when
    missing; a folder given in ``--db`` must exist (a mistyped path creates nothing).

    ``read_only``: SQLite's file is opened as it is (it must exist; its journal mode is
    kept) with ``query_only`` on, so nothing can change it."""
    url = resolve_url(url)
    path = sqlite_path(url)
    if path is not None:
        u = make_url(url)
        if u.database and u.database.startswith("~"):
            url = u.set(database=str(path)).render_as_string(hide_password=False)
        if read_only and not path.is_file():
            raise DatabaseError(f"no database at {path}: check --db / CXRLABEL_DB (`cxrlabel catalogue load` "
                                "creates one)")
        if not read_only and u.query.get("mode") != "ro" and not path.parent.exists():
            if url != DEFAULT_URL:
                raise DatabaseError(f"the database folder {path.parent} does not exist: create it "
                                    f"(mkdir -p {path.parent}) or check --db / CXRLABEL_DB")
            path.parent.mkdir(parents=True, exist_ok=True)
    u = make_url(url)
    connect_args = {}
    if u.get_backend_name() == "postgresql" and "connect_timeout" not in u.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT
    engine = create_engine(url, future=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect_read_only if read_only else _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def is_read_only_error(e: BaseException) -> bool:
    """Whether a database error says the database cannot be written (SQLite, PostgreSQL)."""
    text_ = str(e).lower()
    return "readonly" in text_ or "read-only" in text_ or "read only" in text_

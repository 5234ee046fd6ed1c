"""Read-only SQL over the catalogue and results (the ``query`` command).

The SQL text goes to the database driver untouched (no bind-parameter parsing: ``:x`` and
``%`` mean what they mean in SQL), and rows stream back, so memory stays flat whatever the
result's size. Read-only means no side effects at all, whatever the text:

* SQLite: the database is opened as it is (no schema upgrade, no journal-mode change: the
  file stays byte for byte as it was) with ``query_only`` on, and an authorizer admits
  reading statements only (SELECT, reads, functions, recursive CTEs, informational pragmas
  such as ``table_info``). ``ATTACH``, ``VACUUM INTO``, writing pragmas, every write and the
  functions that reach past the database (``load_extension``, ``fts3_tokenizer``, file I/O
  extensions) are refused while the statement is prepared, before anything happens.
* PostgreSQL: the statement is read with its comments and literals set aside
  (:func:`sql_skeleton`): one statement, starting SELECT, WITH, VALUES, TABLE, EXPLAIN or
  SHOW, naming none of the functions that read or write server files, run programs, reach
  other servers or change settings (:data:`PG_REFUSED_FUNCTIONS`). It then runs in a
  ``READ ONLY`` transaction, rolled back, and never retried as anything else; on a superuser
  connection (PostgreSQL 14+) as the predefined role ``pg_read_all_data``, which may read
  every table but write no file nor start a program (a read-only transaction alone does not
  stop a superuser's ``COPY ... TO``). The real guard of a shared server is still a role
  with SELECT rights only (README, "A reader's role").
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.regular import read_text
from pipeline.resources import ready_queries

FETCH = 1000  # rows per round trip

_SQLITE_READING = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_SQLITE_INFO_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                        "foreign_key_list", "collation_list", "function_list", "pragma_list",
                        "database_list", "compile_options"}
# functions that load code, expose a pointer or reach the file system (sqlite3's own, the fts3
# tokenizer hook, and the fileio/zipfile/sqlar extensions where a build carries them)
SQLITE_REFUSED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit",
                                      "fsdir", "lsdir", "zipfile", "sqlar_compress", "sqlar_uncompress"})

PG_STATEMENTS = ("select", "with", "values", "table", "explain", "show")
_PG_CURSOR_STATEMENTS = ("select", "with", "values", "table")  # what DECLARE ... CURSOR takes
# Names refused anywhere in a PostgreSQL statement (after comments and literals are set aside):
# exact names, and prefixes ending in "_" or naming a family. They read or write server files
# (lo_*, pg_read_*, pg_ls_*, pg_stat_file, adminpack's pg_file_*), run SQL given as text
# (query_to_xml*, dblink*), change settings or roles (set_config), or act on the server
# (backends, WAL, replication, logs, statistics, notifications).
PG_REFUSED_FUNCTIONS = ("lo_", "loread", "lowrite", "dblink", "pg_read_", "pg_ls_", "pg_stat_file",
                        "pg_stat_reset", "pg_file_", "pg_logdir", "pg_log_", "pg_current_logfile",
                        "query_to_xml", "set_config", "pg_terminate_backend", "pg_cancel_backend",
                        "pg_reload_conf", "pg_rotate_logfile", "pg_promote", "pg_switch_wal",
                        "pg_create_", "pg_drop_", "pg_replication_", "pg_logical_", "pg_backup_",
                        "pg_start_backup", "pg_stop_backup", "pg_wal_replay_", "pg_notify",
                        "pg_import_system_collations", "pg_sleep", "pg_advisory")
_WORD = re.compile(r"[a-z_][a-z0-9_$]*")
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


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
        if not path.exists():
            raise QueryError(f"{sql}: no such file; ready queries: {', '.join(ready)}")
        return read_text(path, QueryError, "query file")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", sql.strip()) and sql.strip().upper() not in ("TABLE", "VALUES"):
        import difflib
        close = difflib.get_close_matches(sql.strip(), list(ready), n=1)
        raise QueryError(f"no ready query named {sql.strip()!r}" + (f": did you mean {close[0]}?" if close else "")
                         + f" Ready queries: {', '.join(ready)}; or give a SQL statement or a .sql file")
    return sql


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in SQLITE_REFUSED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if action in _SQLITE_READING:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _SQLITE_INFO_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


@dataclass
class QueryResult:
    columns: list[str]
    rows: Iterator[dict]  # streamed: read once


def sql_skeleton(sql: str) -> str:
    """``sql`` lower-cased with its comments (``--``, nested ``/* */``) made spaces, its string
    literals (``'...'``, ``E'...'``, ``$tag$...$tag$``) made ``''`` and its quoted identifiers
    unquoted (characters outside a name made ``_``): what PostgreSQL will parse as keywords
    and names, so a check of the statement cannot be hidden behind a comment or quotes.
    :class:`QueryError` for text PostgreSQL would not read either (an unterminated comment or
    literal) and for Unicode-escaped names (``U&"..."``), which could spell any name."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            out.append(" ")
        elif sql.startswith("/*", i):
            i = _comment_end(sql, i)
            out.append(" ")
        elif c == "'":
            i = _literal_end(sql, i)
            out.append("''")
        elif c == '"':
            name, i = _quoted_name(sql, i)
            out.append(name)
        elif c == "$" and not _name_char(sql[i - 1:i]) and (m := _DOLLAR.match(sql, i)):
            close = sql.find(m.group(0), m.end())
            if close < 0:
                raise QueryError("SQL error: a $-quoted string is not closed")
            out.append("''")
            i = close + len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out).lower()


def _comment_end(sql: str, i: int) -> int:
    """Where the (nested) ``/* */`` comment that opens at ``i`` ends."""
    depth, i = 1, i + 2
    while depth:
        if i >= len(sql):
            raise QueryError("SQL error: a /* comment is not closed")
        if sql.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _literal_end(sql: str, i: int) -> int:
    """Where the string literal whose quote is at ``i`` ends (``''`` inside it, and backslash
    escapes in an ``E'...'`` one)."""
    backslashes = sql[i - 1:i] in ("e", "E") and not _name_char(sql[i - 2:i - 1])
    j = i + 1
    while True:
        if j >= len(sql):
            raise QueryError("SQL error: a string literal is not closed")
        if backslashes and sql[j] == "\\":
            j += 2
        elif sql[j] == "'" and sql.startswith("''", j):
            j += 2
        elif sql[j] == "'":
            return j + 1
        else:
            j += 1


def _quoted_name(sql: str, i: int) -> tuple[str, int]:
    """The quoted identifier that opens at ``i``, unquoted (characters outside a name made
    ``_``), and where it ends; Unicode-escaped names are refused."""
    if sql[max(0, i - 2):i].lower() == "u&":
        raise QueryError('query refused: Unicode-escaped names (U&"...") are not read by the query command')
    j, name = i + 1, []
    while True:
        if j >= len(sql):
            raise QueryError('SQL error: a quoted name (") is not closed')
        if sql.startswith('""', j):
            name.append("_")
            j += 2
        elif sql[j] == '"':
            return "".join(name) or "_", j + 1
        else:
            name.append(sql[j] if sql[j].isalnum() or sql[j] in "_$" else "_")
            j += 1


def _name_char(c: str) -> bool:
    return c != "" and (c.isalnum() or c in "_$")


def check_postgres_statement(sql: str) -> str:
    """The first keyword of ``sql`` when PostgreSQL's ``query`` may run it; otherwise
    :class:`QueryError` saying why (see the module's docstring)."""
    skeleton = sql_skeleton(sql).strip().rstrip(";").strip()
    if ";" in skeleton:
        raise QueryError("query refused: one statement at a time (a ';' outside quotes starts another)")
    first = (_WORD.match(skeleton.lstrip("( \t\r\n")) or [""])[0]
    if first not in PG_STATEMENTS:
        raise QueryError(f"query refused: the query command is read-only and runs "
                         f"{', '.join(w.upper() for w in PG_STATEMENTS)} statements, not {first.upper() or 'this'}")
    for word in _WORD.findall(skeleton):
        if any(word.startswith(name) for name in PG_REFUSED_FUNCTIONS):
            raise QueryError(f"query refused: the query command is read-only and does not call {word} "
                             "(it reaches files, programs, other servers or settings)")
    return first


def read_only_query(engine: Engine, sql: str) -> QueryResult:
    """The columns and streamed rows of one SQL statement, run so that it cannot write.

    Errors (a refused or failing statement) are raised here, before any row is read.
    """
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise QueryError("empty query")
    dialect = engine.dialect.name
    first = check_postgres_statement(sql) if dialect == "postgresql" else ""
    raw = engine.raw_connection()
    dbapi: Any = raw.driver_connection
    cur = None
    try:
        if dialect == "sqlite":
            dbapi.set_authorizer(_authorize)
        elif dialect == "postgresql":
            _postgres_read_only(raw)
        cur = _execute(dbapi, sql, cursor=first in _PG_CURSOR_STATEMENTS)
        if cur.description is None:
            raise QueryError("the query returned no rows (only SELECT-like statements are run)")
        columns = [d[0] for d in cur.description]
        return QueryResult(columns, _stream(raw, dbapi, dialect, cur, columns))
    except BaseException:
        _close(raw, dbapi, dialect, cur)
        raise


def _postgres_read_only(raw) -> None:
    """This transaction reads only: READ ONLY, and a superuser's rights set aside for those of
    ``pg_read_all_data`` (PostgreSQL 14+), which writes no file and runs no program."""
    cur = raw.cursor()
    try:
        cur.execute("SET TRANSACTION READ ONLY")
        cur.execute("SET LOCAL standard_conforming_strings = on")  # literals read as sql_skeleton reads them
        cur.execute("SELECT current_setting('is_superuser') = 'on', current_setting('server_version_num')::int")
        superuser, version = cur.fetchone()
        if superuser and version >= 140000:
            cur.execute("SET LOCAL ROLE pg_read_all_data")
    finally:
        cur.close()


def _execute(dbapi, sql: str, cursor: bool = False):
    """A cursor on ``sql``: with ``cursor`` (PostgreSQL's SELECT-like statements) a
    server-side one, so rows stream; EXPLAIN and SHOW, which such a cursor does not take, a
    plain one. A statement is run once, the way its first keyword says, never retried."""
    cur = dbapi.cursor(name="cxrlabel_query") if cursor else dbapi.cursor()
    if cursor:
        cur.itersize = FETCH
    try:
        cur.execute(sql)
    except Exception as e:  # the driver's own errors: sqlite3.Error, psycopg.Error
        cur.close()
        raise _query_error(e) from e
    return cur


def _stream(raw, dbapi, dialect: str, cur, columns: list[str]) -> Iterator[dict]:
    try:
        while True:
            try:
                rows = cur.fetchmany(FETCH)
            except Exception as e:  # a server-side cursor meets the statement's errors here
                raise _query_error(e) from e
            if not rows:
                break
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
    msg = D.first_line(e)
    low = msg.lower()
    if ("not authorized" in low or "authorization denied" in low or "permission denied" in low
            or D.is_read_only_error(e)):
        return QueryError(f"query refused: the query command is read-only ({msg})")
    return QueryError(f"SQL error: {msg}")

"""Database: engine from a URL, the schema (SQLAlchemy Core metadata), migrations and views.

The metadata below is the source of truth; ``sql/schema.sql`` is its SQLite rendering, kept
in the repository for readers and checked against it by ``tests/test_db.py``. Everything here
is portable between SQLite (the embedded default) and PostgreSQL; SQLite-only settings are
guarded by the dialect name.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql import ColumnElement, Select

from pipeline import CxrlabelError
from pipeline.resources import resource

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///data/catalogue.db"
SCHEMA_VERSION = 1
# Values per ``IN (...)`` list: SQLite builds before 3.32 allow 999 host parameters a
# statement; 900 leaves room for the query's other parameters.
IN_CHUNK = 900

T = TypeVar("T")
metadata = MetaData()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("uid", String(200), primary_key=True),
    Column("source", String(40), nullable=False),  # nih, openi, dicom, csv, generalblockchain
    Column("patient_id", String(100)),
    Column("age", Integer),  # whole years
    Column("sex", String(1)),  # M, F, O
    Column("view", String(20)),  # PA, AP, LL...
    Column("study_date", String(10)),  # ISO yyyy-mm-dd
    Column("text", Text),  # free-text diagnosis / report: what group rules read
    Column("labels", Text),  # structured labels, '|'-separated (NIH Finding Labels)
    Column("reference", Text),  # yardstick labels the rules never read (OpenI MeSH major)
    Column("path", Text),  # source image file
    Column("width", Integer),
    Column("height", Integer),
    Column("spacing_x", Float),  # mm per pixel, column direction
    Column("spacing_y", Float),  # mm per pixel, row direction
    Column("modality", String(10)),
    Column("body_part", String(40)),
    Column("photometric", String(20)),
    Column("study_uid", String(100)),
    Column("sop_uid", String(100)),
    Column("study_description", Text),
    Column("license", String(40)),  # per-image licence where the source states one
    Column("loaded_at", DateTime, nullable=False),
)

load_errors = Table(
    "load_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source_file", Text, nullable=False),
    Column("line", Integer),
    Column("uid", String(200)),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

groups = Table(
    "groups",
    metadata,
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("group_name", String(40), nullable=False),
    Column("rule", Text),  # which rule decided, for audits
    Column("assigned_at", DateTime, nullable=False),
    Index("ix_groups_group_name", "group_name"),
)

samples = Table(
    "samples",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("group_name", String(40)),
    Column("created_at", DateTime, nullable=False),
)

cache = Table(
    "cache",
    metadata,
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("settings_id", String(16), primary_key=True),
    Column("path", Text, nullable=False),
    Column("orig_height", Integer, nullable=False),
    Column("orig_width", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("mode", String(10), nullable=False),  # pad | stretch
    # cache = (original + offset) * scale, per axis, in continuous pixel coordinates
    Column("offset_x", Float, nullable=False),
    Column("offset_y", Float, nullable=False),
    Column("scale_x", Float, nullable=False),
    Column("scale_y", Float, nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
)

failures = Table(
    "failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("stage", String(20), nullable=False),
    Column("uid", String(200)),
    Column("error_class", String(60), nullable=False),
    Column("message", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Index("ix_failures_stage_uid", "stage", "uid"),
)

models = Table(
    "models",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("preset", String(60), nullable=False),
    Column("config", Text, nullable=False),  # JSON
    Column("data_hash", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("dice_heart", Float),
    Column("dice_left_lung", Float),
    Column("dice_right_lung", Float),
    Column("metrics", Text),  # JSON: per-epoch history, folds...
    Column("created_at", DateTime, nullable=False),
)

label_runs = Table(
    "label_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(100), nullable=False),
    Column("model_sha256", String(64)),
    Column("selection", Text, nullable=False),
    Column("device", String(20)),
    Column("host", String(100)),
    Column("started_at", DateTime, nullable=False),
    Column("ended_at", DateTime),
    Column("n_selected", Integer),
    Column("n_labelled", Integer),
    Column("n_skipped", Integer),
    Column("n_failed", Integer),
    Column("status", String(20), nullable=False),  # running | done | failed | interrupted
)

masks = Table(
    "masks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), nullable=False),
    Column("structure", String(20), nullable=False),  # heart, left_lung, right_lung
    Column("kind", String(10), nullable=False),  # manual | predicted
    Column("model", String(100), nullable=False, default=""),  # '' for manual masks
    Column("run_id", Integer, ForeignKey("label_runs.id")),
    Column("encoding", String(10), nullable=False),  # png: 1-bit PNG, original geometry
    Column("height", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("area", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("uid", "structure", "kind", "model", name="uq_masks_identity"),
)

measurements = Table(
    "measurements",
    metadata,
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), primary_key=True),
    Column("model", String(100), primary_key=True),
    Column("run_id", Integer, ForeignKey("label_runs.id")),
    Column("heart_area_px", Integer),
    Column("heart_area_mm2", Float),
    Column("heart_width_px", Integer),
    Column("thoracic_width_px", Integer),
    Column("heart_width_mm", Float),
    Column("thoracic_width_mm", Float),
    Column("ctr", Float),
    Column("heart_x0", Integer),
    Column("heart_y0", Integer),
    Column("heart_x1", Integer),
    Column("heart_y1", Integer),
    Column("lungs_x0", Integer),
    Column("lungs_y0", Integer),
    Column("lungs_x1", Integer),
    Column("lungs_y1", Integer),
    Column("quality", Float),
    Column("labelled_at", DateTime, nullable=False),
    Index("ix_measurements_model_quality", "model", "quality"),
)

# Upgrades from older schema versions: version -> statements run before recording it.
# New tables need no entry (create_all adds them); changed columns do.
MIGRATIONS: dict[int, list[str]] = {}


class DatabaseError(CxrlabelError):
    pass


def resolve_url(url: str | None = None) -> str:
    """The database URL: the argument, else ``CXRLABEL_DB``, else ``sqlite:///data/catalogue.db``."""
    return url or os.environ.get("CXRLABEL_DB") or DEFAULT_URL


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str | None = None) -> Engine:
    """Engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout, and its folder."""
    url = resolve_url(url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def current_version(conn: Connection) -> int:
    if not conn.dialect.has_table(conn, "schema_version"):
        return 0
    v = conn.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc()))
    return v.scalar() or 0


def view_statements() -> list[str]:
    """The CREATE VIEW statements of ``sql/views.sql``, one per item."""
    path = resource("sql", "views.sql")
    body = "\n".join(
        line for line in path.read_text().splitlines() if not line.strip().startswith("--")
    )
    return [s.strip() for s in body.split(";") if s.strip()]


def _view_names(statements: Iterable[str]) -> list[str]:
    names = []
    for stmt in statements:
        words = stmt.split()
        if [w.upper() for w in words[:2]] != ["CREATE", "VIEW"]:
            raise DatabaseError(f"sql/views.sql: expected 'CREATE VIEW name AS ...', got {stmt[:40]!r}")
        names.append(words[2])
    return names


def init_db(engine: Engine) -> int:
    """Create or upgrade the schema and (re)create the views; returns the schema version.

    Safe on an existing database: tables are only added, data is kept, and migrations for
    versions between the stored one and ``SCHEMA_VERSION`` run in one transaction.
    """
    with engine.begin() as conn:
        found = current_version(conn)
        if found > SCHEMA_VERSION:
            raise DatabaseError(
                f"database schema version {found} is newer than this cxrlabel's "
                f"({SCHEMA_VERSION}): upgrade cxrlabel"
            )
        statements = view_statements()
        for name in _view_names(statements):
            conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
        metadata.create_all(conn)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS.get(version, []):
                conn.execute(text(stmt))
            conn.execute(schema_version.insert().values(version=version, applied_at=utcnow()))
        for stmt in statements:
            conn.execute(text(stmt))
    return SCHEMA_VERSION


def connect(url: str | None = None) -> Engine:
    """Engine with the schema created or upgraded: the entry point of every stage."""
    engine = make_engine(url)
    init_db(engine)
    return engine


def schema_ddl(dialect_engine: Engine | None = None) -> str:
    """DDL of the metadata for a dialect (SQLite by default): what ``sql/schema.sql`` holds."""
    engine = dialect_engine or create_engine("sqlite://")
    parts = [
        f"-- cxrlabel schema, version {SCHEMA_VERSION}. Generated from pipeline/db.py by\n"
        "-- `cxrlabel db schema > sql/schema.sql`; tests check the two agree.",
    ]
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(engine)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            parts.append(str(CreateIndex(index).compile(engine)).strip() + ";")
    return "\n\n".join(parts) + "\n"


def upsert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str],
           update: Sequence[str] | None = None) -> None:
    """Insert ``rows`` into ``table``; where the keys exist, update ``update`` columns (default:
    every non-key column given).

    Uses the dialect's ON CONFLICT (SQLite and PostgreSQL share the syntax); every row must
    carry the same columns and no two rows the same keys.
    """
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise DatabaseError(f"database {conn.dialect.name!r} is not supported: use SQLite or PostgreSQL")
    columns = list(rows[0])
    stmt = insert(table).values({c: bindparam(c) for c in columns})
    names = update if update is not None else [c for c in columns if c not in keys]
    updates = {c: stmt.excluded[c] for c in names}
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates) if updates \
        else stmt.on_conflict_do_nothing(index_elements=list(keys))
    _executemany(conn, stmt, table, columns, rows)


def _executemany(conn: Connection, stmt: Any, table: Table, columns: list[str],
                 rows: Sequence[dict[str, Any]]) -> None:
    """Execute ``stmt`` for many rows at the driver level.

    The statement is compiled once for the connection's dialect and each column's bind
    processor applied, which is what SQLAlchemy does per row but several times faster for
    bulk loads (catalogues of millions of rows).
    """
    compiled = stmt.compile(dialect=conn.dialect)
    procs = {c: p for c in columns if (p := table.c[c].type.bind_processor(conn.dialect))}
    if procs:
        rows = [{**r, **{c: p(r[c]) for c, p in procs.items()}} for r in rows]
    order = compiled.positiontup  # qmark/format dialects; named ones (psycopg) take the dicts
    params: list = [tuple(map(r.__getitem__, order)) for r in rows] if order is not None else list(rows)
    conn.exec_driver_sql(str(compiled), params)


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
    """One row in ``failures``: the place every stage reports an image it could not process."""
    conn.execute(failures.insert().values(
        stage=stage, uid=uid,
        error_class=error_class or (type(error).__name__ if isinstance(error, BaseException) else "Error"),
        message=str(error)[:2000], created_at=utcnow(),
    ))

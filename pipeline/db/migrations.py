"""A database's schema created or upgraded to :data:`SCHEMA_VERSION` (one migration a version),
its views (re)made from ``sql/views.sql``, and the DDL ``sql/schema.sql`` holds."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from sqlalchemy import (
    create_engine,
    select,
    text,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.schema import CreateIndex, CreateTable

from pipeline.db.engine import DatabaseError, is_read_only_error
from pipeline.db.schema import SCHEMA_VERSION, metadata, schema_version, utcnow
from pipeline.resources import resource

log = logging.getLogger(__name__)


# Upgrades from older schema versions: version -> statements (portable SQL) that bring a
# database of the version before to this one. New tables need no entry (create_all adds
# them); new columns and indexes on existing tables do. A new database skips them.
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE schema_version ADD COLUMN views_sha256 VARCHAR(64)",
        "ALTER TABLE label_runs ADD COLUMN pid INTEGER",
        "ALTER TABLE cache ADD COLUMN bytes INTEGER",
        "ALTER TABLE measurements ADD COLUMN ctr_missing VARCHAR(40)",
        # one row per problem: repeats of earlier runs merged into the first
        "ALTER TABLE failures ADD COLUMN last_seen_at TIMESTAMP",
        "UPDATE failures SET last_seen_at = (SELECT MAX(f.created_at) FROM failures f "
        "WHERE f.stage = failures.stage AND f.uid = failures.uid)",
        "DELETE FROM failures WHERE id NOT IN (SELECT MIN(id) FROM failures GROUP BY stage, uid)",
        "DROP INDEX ix_failures_stage_uid",
        "CREATE UNIQUE INDEX ix_failures_stage_uid ON failures (stage, uid)",
        "ALTER TABLE load_errors ADD COLUMN last_seen_at TIMESTAMP",
        "UPDATE load_errors SET line = 0 WHERE line IS NULL",
        "UPDATE load_errors SET uid = '' WHERE uid IS NULL",
        "UPDATE load_errors SET last_seen_at = created_at",
        "DELETE FROM load_errors WHERE id NOT IN "
        "(SELECT MIN(id) FROM load_errors GROUP BY source_file, line, uid)",
        "CREATE UNIQUE INDEX uq_load_errors_item ON load_errors (source_file, line, uid)",
    ],
    # predicted masks are run-length text: on PostgreSQL stored lz4-compressed (_tune_postgres)
    3: [],
    4: [
        "ALTER TABLE measurements ADD COLUMN quality_heart FLOAT",
        "ALTER TABLE measurements ADD COLUMN quality_left_lung FLOAT",
        "ALTER TABLE measurements ADD COLUMN quality_right_lung FLOAT",
    ],
    5: ["ALTER TABLE images ADD COLUMN report_ctr FLOAT"],
    6: ["ALTER TABLE measurements ADD COLUMN reviewed_ctr FLOAT",
        "ALTER TABLE measurements ADD COLUMN reviewed_heart_width_px INTEGER",
        "ALTER TABLE measurements ADD COLUMN reviewed_thoracic_width_px INTEGER"],
    # `heart` means the heart alone. GeneralBlockchain's only heart class is the
    # cardiomediastinum: its manual masks take that name, and every earlier label run (all by
    # models that learned it as `heart`) is marked with the older definition.
    7: ["ALTER TABLE label_runs ADD COLUMN heart_definition VARCHAR(20)",
        "UPDATE label_runs SET heart_definition = 'cardiomediastinum'",
        "UPDATE masks SET structure = 'cardiomediastinum' WHERE kind = 'manual' AND structure = 'heart' "
        "AND uid IN (SELECT uid FROM images WHERE source = 'generalblockchain')",
        # what masks.source_definitions gives GeneralBlockchain's classes
        "INSERT INTO mask_sources (source, definitions, imported_at) SELECT 'generalblockchain', "
        "'{\"cardiomediastinum\": \"heart and upper mediastinum (the cardiomediastinal silhouette)\", "
        "\"left_lung\": \"the patient''s left lung; drawn on behind the heart\", "
        "\"right_lung\": \"the patient''s right lung; drawn on behind the heart\"}', CURRENT_TIMESTAMP WHERE EXISTS "
        "(SELECT 1 FROM images WHERE source = 'generalblockchain')"],
    # the input check's verdict; quality_scores is a new table
    8: ["ALTER TABLE measurements ADD COLUMN input_check VARCHAR(120)",
        "ALTER TABLE measurements ADD COLUMN mm_calibration VARCHAR(160)",
        "ALTER TABLE images ADD COLUMN spacing_source VARCHAR(80)"],
    # the review worklist's order where a fitted score gives it (pipeline/quality/trust.py)
    9: ["ALTER TABLE measurements ADD COLUMN trust FLOAT",
        "CREATE INDEX ix_measurements_model_trust ON measurements (model, trust)"],
    # ctr_calibrations and pacs_exports are new tables (create_all adds them); label_results shows
    # the calibration. A PACS's
    # films carry their accession number (reports of a RIS export join by it)
    10: ["ALTER TABLE images ADD COLUMN accession VARCHAR(64)"],
}


def stored_state(conn: Connection) -> tuple[int, str | None]:
    """``(schema version, sha256 of the views applied)`` of a database; ``(0, None)`` when new."""
    if not conn.dialect.has_table(conn, "schema_version"):
        return 0, None
    cols = {c["name"] for c in sa_inspect(conn).get_columns("schema_version")}
    q = select(schema_version.c.version, *([schema_version.c.views_sha256] if "views_sha256" in cols else []))
    row = conn.execute(q.order_by(schema_version.c.version.desc()).limit(1)).first()
    if row is None:
        return 0, None
    return row[0], (row[1] if len(row) > 1 else None)


def current_version(conn: Connection) -> int:
    return stored_state(conn)[0]


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


def views_sha256() -> str:
    return hashlib.sha256(resource("sql", "views.sql").read_bytes()).hexdigest()


def init_db(engine: Engine) -> int:
    """Create or upgrade the schema and views when the database is older than this code
    (or new); returns the schema version.

    A database that is up to date is only read, so any number of commands can start at once
    and read-only databases can be queried. Otherwise the upgrade runs in one transaction
    under a lock (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock) and checks again
    inside it: a concurrent start-up finds the work done. Tables are only added and data kept.
    """
    views = views_sha256()
    with engine.connect() as conn:
        found, applied = stored_state(conn)
    _check_not_newer(found)
    if (found, applied) == (SCHEMA_VERSION, views):
        return SCHEMA_VERSION
    try:
        with engine.connect().execution_options(write_lock=True) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _INIT_LOCK})
            found, applied = stored_state(conn)
            _check_not_newer(found)
            if (found, applied) != (SCHEMA_VERSION, views):
                _upgrade(conn, found, views)
    except OperationalError as e:
        if is_read_only_error(e):
            raise DatabaseError(
                f"the database is read-only and needs {'its schema created' if not found else 'an upgrade'} "
                f"(version {found} -> {SCHEMA_VERSION}): run `cxrlabel db init` once on a writable copy") from e
        raise
    return SCHEMA_VERSION


_INIT_LOCK = 0x637872  # the advisory lock key of schema upgrades ("cxr")


def _check_not_newer(found: int) -> None:
    if found > SCHEMA_VERSION:
        raise DatabaseError(f"database schema version {found} is newer than this cxrlabel's "
                            f"({SCHEMA_VERSION}): upgrade cxrlabel")


def _upgrade(conn: Connection, found: int, views: str) -> None:
    statements = view_statements()
    for name in _view_names(statements):
        conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
    metadata.create_all(conn)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        if found:  # a new database is created at the current version
            for stmt in MIGRATIONS.get(version, []):
                conn.execute(text(stmt))
        conn.execute(schema_version.insert().values(version=version, applied_at=utcnow()))
    for stmt in statements:
        conn.execute(text(stmt))
    if conn.dialect.name == "postgresql":
        _tune_postgres(conn)
    conn.execute(schema_version.update().where(schema_version.c.version == SCHEMA_VERSION)
                 .values(views_sha256=views))


def _tune_postgres(conn: Connection) -> None:
    """Compress stored masks with lz4 rather than PostgreSQL's default pglz: run-length text
    compresses well, and pglz made the server the limit of several writers (bench/db_write.py:
    1,100 vs 2,000-2,500 images/s on 2 cores). Needs PostgreSQL 14 built with lz4; otherwise
    the default stays."""
    if int(conn.execute(text("SHOW server_version_num")).scalar() or 0) < 140000:
        return
    try:
        with conn.begin_nested():
            conn.execute(text("ALTER TABLE masks ALTER COLUMN data SET COMPRESSION lz4"))
    except DBAPIError as e:
        log.warning("masks stay compressed with PostgreSQL's default: %s", str(e).splitlines()[0])


def schema_ddl(dialect_engine: Engine | None = None) -> str:
    """DDL of the metadata for a dialect (SQLite by default): what ``sql/schema.sql`` holds."""
    engine = dialect_engine or create_engine("sqlite://")
    parts = [
        f"-- cxrlabel schema, version {SCHEMA_VERSION}. Generated from pipeline/db/schema.py by\n"
        "-- `cxrlabel db schema > sql/schema.sql`; tests check the two agree.",
    ]
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(engine)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            parts.append(str(CreateIndex(index).compile(engine)).strip() + ";")
    return "\n\n".join(parts) + "\n"

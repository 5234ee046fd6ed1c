"""Database: engine from a URL, the schema (SQLAlchemy Core metadata), migrations and views.

The metadata below is the source of truth; ``sql/schema.sql`` is its SQLite rendering, kept
in the repository for readers and checked against it by ``tests/test_db.py``. Everything here
is portable between SQLite (the embedded default) and PostgreSQL; SQLite-only settings are
guarded by the dialect name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
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
    make_url,
    select,
    text,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql import ColumnElement, Select

from pipeline import CxrlabelError
from pipeline.resources import resource

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///data/catalogue.db"
SCHEMA_VERSION = 8
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
    Column("views_sha256", String(64)),  # sql/views.sql as last applied
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
    Column("report_ctr", Float),  # a CTR the report text states (КТИ 0,58), set by `groups assign`
    Column("path", Text),  # source image file
    Column("width", Integer),
    Column("height", Integer),
    Column("spacing_x", Float),  # mm per pixel, column direction
    Column("spacing_y", Float),  # mm per pixel, row direction
    # where the spacing came from (PixelSpacing, ImagerPixelSpacing / magnification 1.1, NIH's
    # OriginalImagePixelSpacing of the original's width and height, a CSV column), or why none
    Column("spacing_source", String(80)),
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
    Column("line", Integer),  # 0: the problem has no line (a DICOM file, a whole source)
    Column("uid", String(200)),  # '': no uid
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),  # first seen
    Column("last_seen_at", DateTime),
    Index("uq_load_errors_item", "source_file", "line", "uid", unique=True),
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
    Column("bytes", Integer),  # the entry file's size: a cheap check that it is whole
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
    Column("created_at", DateTime, nullable=False),  # first seen
    Column("last_seen_at", DateTime),
    Index("ix_failures_stage_uid", "stage", "uid", unique=True),  # one row per problem
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
    Column("pid", Integer),  # with host: whether a 'running' run's process is still alive
    Column("started_at", DateTime, nullable=False),
    Column("ended_at", DateTime),
    Column("n_selected", Integer),
    Column("n_labelled", Integer),
    Column("n_skipped", Integer),
    Column("n_failed", Integer),
    Column("status", String(20), nullable=False),  # running | done | failed | interrupted
    # what the model's `heart` is: 'heart' (the heart alone) or 'cardiomediastinum' (models
    # trained on GeneralBlockchain alone, before 2026-12-05: heart plus upper mediastinum)
    Column("heart_definition", String(20)),
)

# what each annotated source's manual masks mean (masks import records it)
mask_sources = Table(
    "mask_sources",
    metadata,
    Column("source", String(100), primary_key=True),
    Column("definitions", Text, nullable=False),  # JSON: {structure: definition}
    Column("imported_at", DateTime, nullable=False),
)

masks = Table(
    "masks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), nullable=False),
    Column("structure", String(20), nullable=False),  # heart, left_lung, right_lung
    Column("kind", String(10), nullable=False),  # manual | predicted | reviewed (a person's correction)
    Column("model", String(100), nullable=False, default=""),  # '' for manual masks
    Column("run_id", Integer, ForeignKey("label_runs.id")),
    Column("encoding", String(10), nullable=False),  # png: 1-bit PNG; rle: CheXmask run-length text
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
    Column("ctr_missing", String(40)),  # why ctr is NULL: the structures not found, e.g. 'left_lung'
    Column("heart_x0", Integer),
    Column("heart_y0", Integer),
    Column("heart_x1", Integer),
    Column("heart_y1", Integer),
    Column("lungs_x0", Integer),
    Column("lungs_y0", Integer),
    Column("lungs_x1", Integer),
    Column("lungs_y1", Integer),
    Column("quality", Float),  # estimated mean Dice (pipeline/quality.py); heuristic without a fit
    Column("quality_heart", Float),  # estimated Dice per structure, when the model has a fitted score
    Column("quality_left_lung", Float),
    Column("quality_right_lung", Float),
    Column("labelled_at", DateTime, nullable=False),
    # is this a frontal chest radiograph the model can read (pipeline/quality/inputs.py)? 'ok',
    # or why not ('not a chest film: ...', 'lateral view', 'flipped', ...); NULL: not checked
    Column("input_check", String(120)),
    # the millimetres' calibration: the spacing's source, scaled to the file's pixels where the
    # file is a resized copy of the catalogued original; or none and why
    Column("mm_calibration", String(160)),
    # from the masks a person reviewed (their corrections, the model's masks elsewhere)
    Column("reviewed_ctr", Float),
    Column("reviewed_heart_width_px", Integer),
    Column("reviewed_thoracic_width_px", Integer),
    Index("ix_measurements_model_quality", "model", "quality"),
)

# A model's fitted quality score (`cxrlabel quality fit`), by the sha256 of the checkpoint it
# scores: labelling uses it before the file beside the checkpoint (pipeline/quality/score.py).
quality_scores = Table(
    "quality_scores",
    metadata,
    Column("model_sha256", String(64), primary_key=True),
    Column("tta", Boolean, primary_key=True),  # the score that also reads test-time augmentation
    Column("model", String(100), nullable=False),  # the name it was fitted under
    Column("score", Text, nullable=False),  # JSON: pipeline.quality.QualityModel.to_json
    Column("origin", Text),  # what it was fitted on, in words
    Column("fitted_at", DateTime, nullable=False),
)

# What people decided about a model's masks (`cxrlabel review`): one row per decision, never
# updated. `version` counts an image's decisions for that model; a save names the version it
# saw, so the second of two browsers saving from the same version is refused (unique key).
reviews = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("uid", String(200), ForeignKey("images.uid", ondelete="CASCADE"), nullable=False),
    Column("model", String(100), nullable=False),  # whose masks were reviewed
    Column("version", Integer, nullable=False),
    Column("structure", String(20), nullable=False, default=""),  # '' = the whole image
    Column("decision", String(10), nullable=False),  # accepted | rejected | corrected
    Column("reviewer", String(100), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("note", Text),
    UniqueConstraint("uid", "model", "version", "structure", name="uq_reviews_version"),
)

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
}


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


def is_read_only_error(e: BaseException) -> bool:
    """Whether a database error says the database cannot be written (SQLite, PostgreSQL)."""
    text_ = str(e).lower()
    return "readonly" in text_ or "read-only" in text_ or "read only" in text_


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


def connect(url: str | None = None) -> Engine:
    """Engine with the schema created or upgraded: the entry point of every stage."""
    engine = make_engine(url)
    init_db(engine)
    return engine


def connect_read_only(url: str | None = None) -> Engine:
    """Engine of a database as it is, for reading only (``query``): never created, upgraded
    nor otherwise written. An older schema is read as it is; a newer one, or none, refused."""
    engine = make_engine(url, read_only=True)
    try:
        with engine.connect() as conn:
            found, _ = stored_state(conn)
    except BaseException:
        engine.dispose()
        raise
    if not found:
        engine.dispose()
        raise DatabaseError(f"{display_url(url)} holds no cxrlabel catalogue yet: `cxrlabel catalogue load` "
                            "creates one (or check --db / CXRLABEL_DB)")
    if found < SCHEMA_VERSION:
        log.warning("the database's schema is version %d, older than this cxrlabel's %d: read as it is "
                    "(`cxrlabel db init` upgrades it)", found, SCHEMA_VERSION)
    _check_not_newer(found)
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
    insert: Any
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[no-redef]
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

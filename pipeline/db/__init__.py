"""Database: engines from a URL, the schema (SQLAlchemy Core metadata), migrations, views and rows.

* :mod:`~pipeline.db.schema`: the tables (the source of truth; ``sql/schema.sql`` is their
  SQLite rendering, kept in the repository for readers and checked against them by
  ``tests/test_db.py``) and :data:`SCHEMA_VERSION`;
* :mod:`~pipeline.db.engine`: URLs and engines (SQLite's settings, PostgreSQL's timeouts);
* :mod:`~pipeline.db.opening`: :func:`connect` (the entry point of every stage: the schema
  created or upgraded) and :func:`connect_read_only`;
* :mod:`~pipeline.db.migrations`: creating or upgrading a database's schema, its views;
* :mod:`~pipeline.db.rows`: the portable upsert, looking rows up by a list of keys
  (:func:`rows_in`, :func:`chunks`), failures written and cleared.

Everything here is portable between SQLite (the embedded default) and PostgreSQL;
SQLite-only settings are guarded by the dialect name.
"""

from pipeline.db.engine import (  # noqa: F401
    CONNECT_TIMEOUT,
    DEFAULT_URL,
    DatabaseError,
    _sqlite_begin,
    _sqlite_connect,
    _sqlite_connect_read_only,
    display_url,
    first_line,
    is_read_only_error,
    make_engine,
    resolve_url,
    sqlite_path,
)
from pipeline.db.migrations import (  # noqa: F401
    _INIT_LOCK,
    MIGRATIONS,
    _check_not_newer,
    _tune_postgres,
    _upgrade,
    _view_names,
    current_version,
    init_db,
    schema_ddl,
    stored_state,
    view_statements,
    views_sha256,
)
from pipeline.db.opening import connect, connect_read_only  # noqa: F401
from pipeline.db.rows import (  # noqa: F401
    IN_CHUNK,
    T,
    _executemany,
    chunks,
    clear_failures,
    record_failure,
    rows_in,
    upsert,
)
from pipeline.db.schema import (  # noqa: F401
    SCHEMA_VERSION,
    cache,
    ctr_calibrations,
    failures,
    groups,
    images,
    label_runs,
    load_errors,
    mask_sources,
    masks,
    measurements,
    metadata,
    models,
    pacs_exports,
    quality_scores,
    reviews,
    samples,
    schema_version,
    utcnow,
)

"""Opening a database: :func:`connect` (its schema created or upgraded: the entry point of every
stage) and :func:`connect_read_only` (as it is, for ``query``)."""

from __future__ import annotations

import logging

from sqlalchemy.engine import Engine

from pipeline.db.engine import DatabaseError, display_url, make_engine
from pipeline.db.migrations import _check_not_newer, init_db, stored_state
from pipeline.db.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)


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

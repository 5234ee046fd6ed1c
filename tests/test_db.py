from sqlalchemy import inspect, text

from pipeline import db as D
from tests.conftest import REPO


def test_schema_sql_matches_metadata():
    assert (REPO / "sql" / "schema.sql").read_text() == D.schema_ddl(), \
        "regenerate with `cxrlabel db schema > sql/schema.sql`"


def test_init_creates_tables_views_and_version(engine):
    names = set(inspect(engine).get_table_names())
    assert {t.name for t in D.metadata.sorted_tables} <= names
    assert {"catalogue", "label_results"} <= set(inspect(engine).get_view_names())
    with engine.connect() as c:
        assert D.current_version(c) == D.SCHEMA_VERSION


def test_sqlite_runs_with_wal_and_foreign_keys(sqlite_engine):
    with sqlite_engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_upgrade_adds_missing_tables_and_keeps_data(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    eng = D.connect(url)
    with eng.begin() as c:
        c.execute(D.images.insert().values(uid="a", source="csv", text="kept", loaded_at=D.utcnow()))
        c.execute(text("DROP VIEW label_results"))
        c.execute(text("DROP TABLE measurements"))
        c.execute(text("DELETE FROM schema_version"))  # an older database: version 0
    eng.dispose()
    eng = D.connect(url)
    with eng.connect() as c:
        assert c.execute(text("SELECT text FROM images WHERE uid='a'")).scalar() == "kept"
        assert "measurements" in inspect(c).get_table_names()
        assert D.current_version(c) == D.SCHEMA_VERSION
    # and again: nothing changes, nothing duplicates
    D.init_db(eng)
    with eng.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM schema_version")).scalar() == D.SCHEMA_VERSION


def test_newer_database_is_refused(sqlite_engine):
    with sqlite_engine.begin() as c:
        c.execute(D.schema_version.insert().values(version=D.SCHEMA_VERSION + 1,
                                                   applied_at=D.utcnow()))
    try:
        D.init_db(sqlite_engine)
    except D.DatabaseError as e:
        assert "upgrade cxrlabel" in str(e)
    else:
        raise AssertionError("a newer schema must be refused")


def test_url_from_environment(monkeypatch):
    monkeypatch.setenv("CXRLABEL_DB", "sqlite:///x.db")
    assert D.resolve_url() == "sqlite:///x.db"
    assert D.resolve_url("sqlite:///y.db") == "sqlite:///y.db"
    monkeypatch.delenv("CXRLABEL_DB")
    assert D.resolve_url() == D.DEFAULT_URL

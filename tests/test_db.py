import pytest
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


def test_version_1_database_upgrades_and_merges_repeated_logs(tmp_path):
    import sqlite3
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript((REPO / "tests" / "fixtures" / "schema_v1.sql").read_text())
    con.executescript("""
        INSERT INTO schema_version VALUES (1, '2026-11-01 00:00:00');
        INSERT INTO failures (stage, uid, error_class, message, created_at) VALUES
            ('collect', 'a', 'DecodeError', 'bad', '2026-11-01 00:00:00'),
            ('collect', 'a', 'DecodeError', 'bad', '2026-11-02 00:00:00'),
            ('label', 'a', 'LabelError', 'x', '2026-11-02 00:00:00');
        INSERT INTO load_errors (source_file, line, uid, reason, created_at) VALUES
            ('f.csv', 3, NULL, 'r', '2026-11-01 00:00:00'), ('f.csv', 3, NULL, 'r', '2026-11-02 00:00:00'),
            ('d', NULL, 'u', 'r', '2026-11-01 00:00:00');
    """)
    con.commit()
    con.close()
    eng = D.connect(f"sqlite:///{path}")
    with eng.connect() as c:
        assert D.stored_state(c) == (D.SCHEMA_VERSION, D.views_sha256())
        fails = c.execute(text("SELECT stage, uid, created_at, last_seen_at FROM failures ORDER BY stage")).all()
        errors = c.execute(text("SELECT source_file, line, uid FROM load_errors ORDER BY id")).all()
        cols = {col["name"] for col in inspect(c).get_columns("measurements")}
    assert [(f[0], f[1]) for f in fails] == [("collect", "a"), ("label", "a")]
    assert str(fails[0][2]).startswith("2026-11-01") and str(fails[0][3]).startswith("2026-11-02")
    assert errors == [("f.csv", 3, ""), ("d", 0, "u")] and "ctr_missing" in cols
    with eng.begin() as c:  # the merged log keeps one row per problem from now on
        D.record_failure(c, "collect", "a", "bad again", "DecodeError")
        assert c.execute(text("SELECT COUNT(*), MAX(message) FROM failures WHERE stage='collect'")).one() \
            == (1, "bad again")
    eng.dispose()


def test_an_older_database_learns_that_its_heart_was_the_cardiomediastinum(tmp_path):
    """Schema 7: GeneralBlockchain's manual `heart` becomes `cardiomediastinum`, another
    source's heart stays, and every earlier label run is marked with the older definition,
    which `label_results`, `status` and `evaluate` then show."""
    import json
    import sqlite3

    from click.testing import CliRunner

    from pipeline.cli import cli
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript((REPO / "tests" / "fixtures" / "schema_v1.sql").read_text())
    con.executescript("""
        INSERT INTO schema_version VALUES (1, '2026-11-01 00:00:00');
        INSERT INTO images (uid, source, loaded_at) VALUES ('gb1', 'generalblockchain', '2026-11-01'),
                                                           ('w1', 'wingspan', '2026-11-01');
        INSERT INTO masks (uid, structure, kind, model, encoding, height, width, area, data, created_at) VALUES
            ('gb1', 'heart', 'manual', '', 'rle', 4, 4, 1, '1 1', '2026-11-01'),
            ('w1', 'heart', 'manual', '', 'rle', 4, 4, 1, '1 1', '2026-11-01'),
            ('gb1', 'heart', 'predicted', 'default', 'rle', 4, 4, 1, '1 1', '2026-11-01');
        INSERT INTO label_runs (id, model, selection, started_at, status) VALUES
            (1, 'default', 'all', '2026-11-02', 'done');
        INSERT INTO measurements (uid, model, run_id, labelled_at) VALUES ('gb1', 'default', 1, '2026-11-02');
    """)
    con.commit()
    con.close()
    eng = D.connect(f"sqlite:///{path}")
    with eng.connect() as c:
        masks = set(c.execute(text("SELECT uid, structure, kind FROM masks")).all())
        definitions = json.loads(c.execute(text("SELECT definitions FROM mask_sources")).scalar())
        shown = c.execute(text("SELECT heart_definition FROM label_results")).scalar()
    assert masks == {("gb1", "cardiomediastinum", "manual"), ("w1", "heart", "manual"),
                     ("gb1", "heart", "predicted")}  # the model's own masks keep their name, marked by its run
    assert shown == "cardiomediastinum" and "behind the heart" in definitions["left_lung"]
    eng.dispose()
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{path}", "status"])
    assert r.exit_code == 0 and "1 images labelled by default carry the older heart" in r.output


def test_start_up_writes_nothing_and_read_only_databases_answer(tmp_path):
    import os
    path = tmp_path / "c.db"
    D.connect(f"sqlite:///{path}").dispose()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ro = D.connect(f"sqlite:///file:{path}?mode=ro&uri=true")
    with ro.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM catalogue")).scalar() == 0
    ro.dispose()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    # a read-only database that would need an upgrade says so, in one line
    with D.connect(f"sqlite:///{path}").begin() as c:
        c.execute(text("UPDATE schema_version SET views_sha256 = 'old'"))
    os.chmod(path, 0o444)
    try:
        with pytest.raises(D.DatabaseError, match="read-only and needs an upgrade"):
            D.connect(f"sqlite:///file:{path}?mode=ro&uri=true")
    finally:
        os.chmod(path, 0o644)


def test_many_commands_may_start_at_once_on_a_new_database(db_url):
    import threading
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            eng = D.connect(db_url)
            with eng.connect() as c:
                c.execute(text("SELECT COUNT(*) FROM catalogue")).scalar()
            eng.dispose()
        except BaseException as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    eng = D.connect(db_url)
    with eng.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM schema_version")).scalar() == D.SCHEMA_VERSION
    eng.dispose()


def test_home_folder_in_a_sqlite_url_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "sub").mkdir()  # a folder named in --db must exist (a mistyped one is not created)
    eng = D.connect("sqlite:///~/sub/x.db")
    eng.dispose()
    assert (tmp_path / "sub" / "x.db").exists() and not (tmp_path / "~").exists()


def test_postgresql_stores_masks_lz4_compressed(engine):
    """Run-length text compresses well; PostgreSQL's default pglz made the server the
    writers' limit, so masks are stored lz4-compressed where the server can."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL storage setting")
    with engine.connect() as c:
        if int(c.execute(text("SHOW server_version_num")).scalar()) < 140000:
            pytest.skip("column compression needs PostgreSQL 14")
        method = c.execute(text("SELECT attcompression FROM pg_attribute WHERE attrelid = 'masks'::regclass "
                                "AND attname = 'data'")).scalar()
    assert method == "l"

"""Closed doors: what an attacker on the same machine tried (issue 28), each a test.

`query` cannot write on either database whatever the text; the review app answers only its
own host and keeps its token out of the log; concurrent review saves stay consistent; no
input hangs a run; exports write only what is theirs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from pipeline import db as D
from pipeline.cli import cli
from pipeline.results import QueryError, check_postgres_statement, read_only_query
from tests.conftest import REPO


def _query(url: str, sql: str):
    return CliRunner().invoke(cli, ["--db", url, "query", "--", sql])


@pytest.fixture
def drop_box(tmp_path):
    """A folder anybody may write to (the PostgreSQL server runs as another user): an attack
    that got through would leave its file here."""
    box = tmp_path / "box"
    box.mkdir()
    box.chmod(0o777)
    return box


# (statement, what the refusal says); {box} is a folder the server could write to
HOSTILE_POSTGRES = [
    ("COPY images TO '{box}/a.csv'", "not COPY"),
    ("/* c */ COPY (select uid from images) TO '{box}/b.csv'", "not COPY"),
    ("/**/COPY (select 1) TO PROGRAM 'touch {box}/c'", "not COPY"),
    ("-- a comment\n  copy (SELECT 1) to program 'touch {box}/d'", "not COPY"),
    ("/* nested /* twice */ */ CoPy images TO '{box}/e.csv'", "not COPY"),
    ("SELECT 1; COPY (select 1) TO PROGRAM 'touch {box}/f'", "one statement"),
    ("SELECT ';'; COPY (select 1) TO '{box}/g'", "one statement"),
    ("SELECT lo_export(lo_from_bytea(0, 'x'), '{box}/h')", "lo_"),
    ('SELECT "lo_export"(1, \'{box}/i\')', "lo_export"),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", "pg_read_file"),
    ("SELECT pg_read_binary_file('/etc/passwd')", "pg_read_binary_file"),
    ("SELECT * FROM pg_ls_dir('/')", "pg_ls_dir"),
    ("SELECT dblink_exec('dbname=postgres', 'CREATE TABLE x (a int)')", "dblink"),
    ("SELECT query_to_xml('COPY (select 1) TO PROGRAM ''touch {box}/j''', true, true, '')", "query_to_xml"),
    ("SELECT set_config('role', 'postgres', true)", "set_config"),
    ('SELECT U&"lo\\005fexport"(1, \'{box}/k\')', "Unicode-escaped"),
    ("DO $$ BEGIN EXECUTE 'COPY (select 1) TO PROGRAM ''touch {box}/l'''; END $$", "not DO"),
    ("DELETE FROM images", "not DELETE"),
    ("WITH gone AS (DELETE FROM images RETURNING uid) SELECT * FROM gone", "data-modifying"),
    ("SELECT nextval('failures_id_seq')", "read-only"),
    ("SELECT pg_terminate_backend(pg_backend_pid())", "pg_terminate_backend"),
    ("CREATE TABLE t AS SELECT 1", "not CREATE"),
    ("SET ROLE postgres", "not SET"),
    ("SELECT 'x' /* unterminated", "not closed"),
]


def test_postgres_statements_are_read_after_comments_and_literals_are_set_aside():
    assert check_postgres_statement("SELECT ';' AS s") == "select"
    assert check_postgres_statement("SELECT $tag$ ; COPY $tag$, E'\\'; COPY' AS s") == "select"
    assert check_postgres_statement("/* COPY */ -- COPY\n (SELECT 1)") == "select"
    assert check_postgres_statement('SELECT "copy;" FROM t') == "select"
    assert check_postgres_statement("EXPLAIN SELECT 1") == "explain"
    for sql, words in HOSTILE_POSTGRES:
        if words in ("data-modifying", "read-only"):
            continue  # refused by the server, not by reading
        with pytest.raises(QueryError, match=words.replace("(", r"\(")):
            check_postgres_statement(sql.format(box="/tmp"))


postgres_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@postgres_only
@pytest.mark.parametrize(("sql", "words"), HOSTILE_POSTGRES)
def test_query_refuses_every_hostile_statement_on_postgres_as_a_superuser(engine, drop_box, sql, words):
    url = engine.url.render_as_string(hide_password=False)
    with engine.begin() as c:
        c.execute(D.images.insert(), [{"uid": "u1", "source": "csv", "loaded_at": D.utcnow()}])
        assert c.execute(text("SELECT current_setting('is_superuser')")).scalar() == "on"
    r = _query(url, sql.format(box=drop_box))
    assert r.exit_code == 1 and words in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert list(drop_box.iterdir()) == []
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM images")).scalar() == 1


@postgres_only
def test_a_superusers_query_runs_without_the_rights_to_write_files(engine, drop_box):
    """The second door: were a statement to get past the reading, the transaction `query`
    runs it in can neither write a server file nor start a program."""
    from pipeline.results import _postgres_read_only
    for sql in (f"COPY (SELECT 1) TO '{drop_box}/x'", f"COPY (SELECT 1) TO PROGRAM 'touch {drop_box}/y'",
                f"SELECT lo_export(lo_from_bytea(0, 'x'), '{drop_box}/z')", "SELECT pg_read_file('/etc/passwd')"):
        raw = engine.raw_connection()
        try:
            _postgres_read_only(raw)
            with pytest.raises(Exception, match="permission denied|must be superuser|read-only|privilege"):
                raw.cursor().execute(sql)
        finally:
            raw.rollback()
            raw.close()
    assert list(drop_box.iterdir()) == []
    # reading every table and view still works as that role
    r = read_only_query(engine, "SELECT COUNT(*) AS n FROM label_results")
    assert list(r.rows) == [{"n": 0}]


HOSTILE_SQLITE = [
    "SELECT fts3_tokenizer('simple')",
    "SELECT fts3_tokenizer('x', zeroblob(8))",
    "SELECT load_extension('/tmp/evil')",
    "SELECT writefile('{box}/w', 'x')",
    "ATTACH '{box}/a.db' AS a",
    "VACUUM INTO '{box}/v.db'",
    "PRAGMA journal_mode=WAL",
    "PRAGMA user_version=7",
    "PRAGMA query_only=OFF",
    "DELETE FROM images",
    "CREATE TEMP TABLE t (a)",
    "SELECT 1; DELETE FROM images",
]


def test_sqlite_query_leaves_the_file_byte_for_byte_whatever_the_text(tmp_path, drop_box):
    """A DELETE-journal catalogue stays one, and no statement of the table changes a byte."""
    path = tmp_path / "c.db"
    D.connect(f"sqlite:///{path}").dispose()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    con.execute("INSERT INTO images (uid, source, loaded_at) VALUES ('u1', 'csv', '2026-12-05')")
    con.commit()
    con.close()
    before = path.read_bytes()
    url = f"sqlite:///{path}"
    assert _query(url, "SELECT uid FROM images").exit_code == 0
    for sql in HOSTILE_SQLITE:
        r = _query(url, sql.format(box=drop_box))
        # refused as it is prepared, or a function this build does not have at all
        refused = ("read-only", "no such function", "one statement")
        assert r.exit_code == 1 and any(w in r.output for w in refused), (sql, r.output)
        assert "Traceback" not in r.output
    assert path.read_bytes() == before and list(drop_box.iterdir()) == []
    assert not (tmp_path / "c.db-wal").exists()
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_sqlite_query_reads_an_older_schema_as_it_is_and_creates_no_database(tmp_path):
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript((REPO / "tests" / "fixtures" / "schema_v1.sql").read_text())
    con.execute("INSERT INTO schema_version VALUES (1, '2026-11-01 00:00:00')")
    con.commit()
    con.close()
    before = path.read_bytes()
    r = _query(f"sqlite:///{path}", "SELECT MAX(version) AS v FROM schema_version")
    assert r.exit_code == 0 and "1" in r.output, r.output
    assert path.read_bytes() == before
    r = _query(f"sqlite:///{tmp_path / 'none.db'}", "SELECT 1")
    assert r.exit_code == 1 and "no database at" in r.output
    assert not (tmp_path / "none.db").exists()


def test_a_database_in_a_folder_that_does_not_exist_is_refused_not_created(tmp_path):
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path}/no/such/dir/x.db", "db", "init"])
    assert r.exit_code == 1 and "does not exist" in r.output and "mkdir -p" in r.output
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path}/no/such/dir/x.db", "groups", "list"])
    assert r.exit_code == 1 and "no database at" in r.output
    assert not (tmp_path / "no").exists()


def test_an_unreachable_postgres_server_is_one_line_naming_it():
    r = CliRunner().invoke(cli, ["--db", "postgresql+psycopg://me:secret@127.0.0.1:1/cxr", "groups", "list"])
    assert r.exit_code == 1 and "127.0.0.1:1" in r.output and "secret" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- review saves and the app


def _one_labelled_image(engine, uid: str = "p1") -> None:
    import numpy as np

    from pipeline.masks import STRUCTURES, mask_row
    from pipeline.measure import measure
    masks = {}
    for k, s in enumerate(STRUCTURES):
        m = np.zeros((60, 80), bool)
        m[10:50, 5 + 25 * k:25 + 25 * k] = True
        masks[s] = m
    with engine.begin() as c:
        c.execute(D.images.insert().values(uid=uid, source="csv", loaded_at=D.utcnow()))
        D.upsert(c, D.masks, [mask_row(uid, s, masks[s].astype(np.uint8), kind="predicted", model="m")
                              for s in STRUCTURES], ("uid", "structure", "kind", "model"))
        c.execute(D.measurements.insert().values(uid=uid, model="m", ctr=measure(masks)["ctr"], quality=0.9,
                                                 labelled_at=D.utcnow()))


def _stored_agrees_with_final_masks(engine, uid: str = "p1") -> None:
    from pipeline import review as R
    from pipeline.measure import measure
    with engine.connect() as c:
        masks, _ = R.final_masks(c, uid, "m")
        standing = R.latest_reviews(c, "m", [uid]).get(uid, {})
        stored = c.execute(text("SELECT reviewed_ctr FROM measurements WHERE uid = :u"), {"u": uid}).scalar()
    if any(x.decision == "rejected" for x in standing.values()):
        assert stored is None
    else:
        assert stored == pytest.approx(measure(masks)["ctr"])


def _race(engine, version: int, jobs: list[dict]) -> list[str]:
    """Each job a save from ``version`` in its own thread, started together: 'saved', or
    'conflict' when the conflict names another reviewer's save."""
    import threading

    from pipeline import review as R
    barrier, outcomes = threading.Barrier(len(jobs)), []

    def run(job, who):
        barrier.wait()
        try:
            R.save(engine, "p1", "m", who, version, **job)
            outcomes.append("saved")
        except R.ReviewConflict as e:
            outcomes.append("conflict" if e.changed and e.changed[0]["reviewer"] != who else "bad conflict")

    threads = [threading.Thread(target=run, args=(j, f"r{k}")) for k, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_concurrent_review_saves_of_one_image_either_merge_or_conflict(engine):
    """A whole-image reject and a heart correction from the same version at once: one wins,
    the other gets a conflict naming what changed, and the stored CTR is the final masks'.
    Saves of different structures merge. Run on SQLite and PostgreSQL (no 'database is
    locked')."""
    from pipeline import review as R
    _one_labelled_image(engine)
    heart = {"heart": [[[5, 10], [50, 10], [50, 49], [5, 49]]]}
    for round_ in range(3):
        v = R.image_view(engine, "p1", "m")["version"]
        jobs = [dict(decision="rejected"), dict(decision="corrected", polygons=heart)]
        if round_ == 2:  # other structures: both stand
            jobs = [dict(decision="accepted", structure="left_lung"), dict(decision="corrected", polygons=heart)]
        outcomes = _race(engine, v, jobs)
        expected = ["saved", "saved"] if round_ == 2 else ["conflict", "saved"]
        assert sorted(outcomes) == expected, outcomes
        _stored_agrees_with_final_masks(engine)


def _app(engine, **kw):
    from pipeline.webapp import create_app
    return create_app(engine, "m", **kw).test_client()


def test_the_review_app_answers_only_its_own_host(sqlite_engine):
    engine = sqlite_engine
    _one_labelled_image(engine)
    client = _app(engine)
    assert client.get("/", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    for host in ("attacker.example:8765", "attacker.example", "127.0.0.1.nip.io:8765", "10.0.0.5:8765"):
        r = client.get("/api/image/p1", headers={"Host": host})
        assert r.status_code == 421 and "--allow-host" in r.get_json()["error"], host
    proxied = _app(engine, allow_hosts=["review.lab.example"])
    assert proxied.get("/", headers={"Host": "review.lab.example"}).status_code == 200
    everywhere = _app(engine, bind="0.0.0.0", token="s3cret-token")
    assert everywhere.get("/", headers={"Host": "192.168.1.7:8765", "X-Review-Token": "s3cret-token"}) \
        .status_code == 200
    assert everywhere.get("/", headers={"Host": "evil.example", "X-Review-Token": "s3cret-token"}) \
        .status_code == 421
    # writes: the Origin must be this host, whatever scheme a proxy adds
    body = {"decision": "accepted", "version": 0, "reviewer": "x"}
    for origin in ("http://attacker.example", "null", "http://127.0.0.1:9999"):
        r = client.post("/api/review/p1", json=body, headers={"Host": "127.0.0.1:8765", "Origin": origin})
        assert r.status_code == 403, origin
    r = client.post("/api/review/p1", json=body,
                    headers={"Host": "127.0.0.1:8765", "Origin": "http://127.0.0.1:8765"})
    assert r.status_code == 200


@pytest.mark.parametrize(("body", "status"), [
    (b'{"decision": "accepted", "version": 99999999999999999999, "reviewer": "x"}', 400),
    (b'{"decision": "accepted", "version": -1, "reviewer": "x"}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": "x", "note": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     400),
    (b"[" * 100_000 + b"]" * 100_000, 400),
    (b'{"decision": "corrected", "version": 0, "reviewer": "x", "polygons": {"heart": [[1e400, 2]]}}', 400),
    (b'{"decision": "corrected", "version": 0, "reviewer": "x", "polygons": {"heart": "x"}}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": "x", "structure": ["heart"]}', 400),
    (b"\xff\xfe not json", 400),
    # the red team's 500s (2026-12-07) and the coercions around them
    (b'{"decision": "corrected", "version": 0, "reviewer": "x", "polygons": {"heart": [[1' + b"0" * 400
     + b', 2], [5, 6], [7, 9]]}}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": "\\ud800"}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": "x", "note": "a\\udfffb"}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": "x\\u0000y"}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": 7}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": ["x"]}', 400),
    (b'{"decision": "accepted", "version": 0, "reviewer": "x", "note": 5}', 400),
    (b'{"decision": true, "version": 0, "reviewer": "x"}', 400),
    (b'{"decision": "accepted", "version": true, "reviewer": "x"}', 400),
    (b'{"decision": "corrected", "version": 0, "reviewer": "x", "polygons": {"heart": [["1", "2"], [5, 6], [7, 9]]}}',
     400),
    (b'{"decision": "corrected", "version": 0, "reviewer": "x", "polygons": {"heart": [[true, 2], [5, 6], [7, 9]]}}',
     400),
    (b'{"decision": "accepted", "version": 2147483646, "reviewer": "x"}', 409),
])
def test_every_bad_review_request_is_a_4xx(sqlite_engine, body, status):
    _one_labelled_image(sqlite_engine)
    r = _app(sqlite_engine).post("/api/review/p1", data=body, content_type="application/json")
    assert r.status_code == status, r.get_data(as_text=True)[:200]
    with sqlite_engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM reviews")).scalar() == 0


def test_out_of_range_pages_and_filters_are_4xx_not_500(sqlite_engine):
    _one_labelled_image(sqlite_engine)
    client = _app(sqlite_engine)
    assert client.get("/?page=99999999999999999999999").status_code in (200, 400)
    assert client.get("/?page=100001").status_code == 400
    assert client.get("/?ctr_min=abc").status_code == 400
    assert client.get("/?ctr_min=1e999").status_code == 400
    assert client.get("/?ctr_min=nan").status_code == 400 and client.get("/?quality_max=-inf").status_code == 400
    assert client.get("/api/image/nosuch").status_code == 400


def test_the_token_never_reaches_the_access_log(sqlite_engine, caplog):
    import io
    import logging

    from pipeline.webapp import RequestLog

    class Fake(RequestLog):
        def __init__(self):  # only what log() reads
            self.client_address = ("127.0.0.1", 5)
            self.requestline = ""

        def address_string(self):
            return "127.0.0.1"

    with caplog.at_level(logging.INFO, logger="werkzeug"):
        Fake().log("info", '"%s" %s %s', "GET /?token=s3cret-token&page=2 HTTP/1.1", "200", "-")
    logged = caplog.text + io.StringIO().getvalue()
    assert "s3cret-token" not in logged and "token=***" in logged and "page=2" in logged


# ---------------------------------------------------------------- inputs that could hang a run


def test_a_fifo_among_the_files_is_a_per_item_failure_never_a_hang(engine, tmp_path):
    import shutil

    from pipeline import catalogue as C
    from pipeline.collect import Settings, collect
    from tests.conftest import DICOM
    folder = tmp_path / "archive"
    folder.mkdir()
    shutil.copy(DICOM / "RG1_UNCR.dcm", folder / "good.dcm")
    os.mkfifo(folder / "pipe.dcm")
    s = C.load_dicom(engine, folder, workers=1, progress=False)
    with engine.connect() as c:
        errors = c.execute(text("SELECT uid, reason FROM load_errors")).all()
        assert c.execute(text("SELECT uid FROM images")).scalars().all() == ["good"]
    assert s.loaded == 1 and [e.uid for e in errors] == ["pipe.dcm"] and "FIFO" in errors[0].reason
    # a catalogued path that became a FIFO: the stage records it and goes on
    os.remove(folder / "good.dcm")
    os.mkfifo(folder / "good.dcm")
    summary = collect(engine, [("good", str(folder / "good.dcm"))], Settings(size=64), tmp_path / "cache",
                      workers=1, progress=False)
    with engine.connect() as c:
        message = c.execute(text("SELECT message FROM failures WHERE uid = 'good'")).scalar()
    assert summary.failed == 1 and "FIFO" in message and "not a regular file" in message


def test_a_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path):
    import pydicom

    from pipeline.imaging import DecodeError, decode
    from tests.conftest import DICOM
    ds = pydicom.dcmread(DICOM / "RG1_J2KR.dcm")  # 1841 x 1955 in its codestream
    ds.Rows, ds.Columns = 512, 480
    ds.save_as(tmp_path / "liar.dcm")
    with pytest.raises(DecodeError, match="codestream is 1841 x 1955 pixels but the DICOM header says 480 x 512"):
        decode(tmp_path / "liar.dcm", target=256)
    arr, (h, w), _ = decode(DICOM / "RG1_J2KR.dcm", target=256)  # the honest files still decode
    assert (h, w) == (1955, 1841)
    assert decode(DICOM / "cr_chest_pa_jpeg_baseline.dcm", target=256)[1] == (1024, 1024)
    from pydicom.uid import RLELossless
    rle = pydicom.dcmread(DICOM / "RG1_UNCR.dcm")  # RLE carries no size of its own: nothing to compare
    rle.compress(RLELossless)
    rle.save_as(tmp_path / "rle.dcm")
    assert decode(tmp_path / "rle.dcm", target=256)[1] == (1955, 1841)


def test_a_decode_that_runs_too_long_is_a_per_item_failure(engine, tmp_path, monkeypatch):
    import pipeline.collect as K
    from pipeline.collect import Settings, collect
    from tests.conftest import DICOM

    def endless(*_args, **_kw):  # a decoder stuck in a loop
        while True:
            pass

    monkeypatch.setattr(K, "DECODE_TIMEOUT", 0.5)
    monkeypatch.setattr(K, "preprocess", endless)
    summary = collect(engine, [("stuck", str(DICOM / "RG1_UNCR.dcm"))], Settings(size=64), tmp_path / "cache",
                      workers=1, progress=False)
    with engine.connect() as c:
        row = c.execute(text("SELECT error_class, message FROM failures WHERE uid = 'stuck'")).one()
    assert summary.failed == 1 and row.error_class == "DecodeTimeout" and "longer than 0.5 s" in row.message


# ---------------------------------------------------------------- exports write only what is theirs


@pytest.fixture
def labelled_default(annotated_engine):
    from tests.test_review import pretend_labelled
    return annotated_engine, pretend_labelled(annotated_engine, 3, model="default")


def _everything(engine):
    from pipeline.groups import select_images
    with engine.connect() as c:
        return select_images(c, all_images=True, labelled_by="default")


def _partials(folder: Path) -> list[Path]:
    return list(folder.rglob("*.partial"))


def test_export_never_overwrites_what_it_did_not_write(labelled_default, tmp_path):
    from pipeline.export import ExportError, export
    engine, _ = labelled_default
    precious = tmp_path / "precious.txt"
    precious.write_text("a thesis chapter\n")
    with pytest.raises(ExportError, match="not a cxrlabel rle export"):
        export(engine, "rle", precious, _everything(engine), progress=False)
    assert precious.read_text() == "a thesis chapter\n"
    for device in ("/dev/full", "/dev/null"):
        with pytest.raises(ExportError, match="not a regular file"):
            export(engine, "rle", Path(device), _everything(engine), progress=False)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.png").write_bytes(b"x")
    for fmt in ("png", "seg"):
        with pytest.raises(ExportError, match="never writes into a folder it did not make"):
            export(engine, fmt, tmp_path / "photos", _everything(engine), progress=False)
    assert os.listdir(tmp_path / "photos") == ["holiday.png"]
    # a FIFO where an earlier export's file would be: not taken as ours, and never waited on
    (tmp_path / "pipes").mkdir()
    os.mkfifo(tmp_path / "pipes" / "index.csv")
    os.mkfifo(tmp_path / "pipes" / "x.dcm")
    for fmt in ("png", "seg"):
        with pytest.raises(ExportError, match="never writes into a folder it did not make"):
            export(engine, fmt, tmp_path / "pipes", _everything(engine), progress=False)
    # its own output: written, recognised, written again; another format's folder is refused
    export(engine, "png", tmp_path / "png", _everything(engine), progress=False)
    assert (tmp_path / "png" / ".cxrlabel-export").read_text() == "png\n"
    assert export(engine, "png", tmp_path / "png", _everything(engine), progress=False).kept == 9
    with pytest.raises(ExportError, match="holds a cxrlabel png export, not seg"):
        export(engine, "seg", tmp_path / "png", _everything(engine), progress=False)
    (tmp_path / "empty.csv").touch()
    assert export(engine, "rle", tmp_path / "empty.csv", _everything(engine), progress=False).written == 3


def test_export_files_are_owner_only_whatever_the_umask(labelled_default, tmp_path):
    from pipeline.export import export
    engine, _ = labelled_default
    old = os.umask(0o022)
    try:
        export(engine, "rle", tmp_path / "m.csv", _everything(engine), progress=False)
        export(engine, "png", tmp_path / "png", _everything(engine), progress=False)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "m.csv") == 0o600 and _mode(tmp_path / "png") == 0o700
    assert {_mode(p) for p in (tmp_path / "png").rglob("*.png")} == {0o600}


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "disk full"])
def test_an_interrupted_or_failed_export_leaves_no_partial_and_keeps_the_old_file(labelled_default, tmp_path,
                                                                                  monkeypatch, how):
    import errno
    import signal

    import pipeline.export as E
    import pipeline.export.rle as rle_writer
    engine, _ = labelled_default
    out = tmp_path / "m.csv"
    E.export(engine, "rle", out, _everything(engine), progress=False)
    before, handler = out.read_bytes(), signal.getsignal(signal.SIGTERM)
    real_row, calls = rle_writer._rle_row, []

    def failing_row(it):
        calls.append(it.uid)
        if len(calls) == 2:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_row(it)

    monkeypatch.setattr(rle_writer, "_rle_row", failing_row)
    expected = E.ExportError if how == "disk full" else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        E.export(engine, "rle", out, _everything(engine), progress=False)
    if how == "disk full":
        assert str(out) in str(caught.value) and "No space left" in str(caught.value)
    assert _partials(tmp_path) == [] and out.read_bytes() == before
    assert signal.getsignal(signal.SIGTERM) == handler  # the process's own handler back


def test_environment_failures_are_one_line_naming_the_path(tmp_path, monkeypatch):
    import errno

    from pipeline.cli import environment_error
    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert environment_error(e, None) == f"cannot write {tmp_path / 'x'}: No space left on device: free space " \
                                         "there or choose another place"
    e = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/cache")
    assert "/mnt/ro/cache" in environment_error(e, None) and "read-only" in environment_error(e, None)
    assert "disk is full" in environment_error(Exception("(sqlite3.OperationalError) database or disk is full"),
                                               "sqlite:///x.db")
    assert environment_error(ValueError("a bug"), None) is None


def test_an_unreachable_ray_address_fails_within_seconds():
    from pipeline.distributed import RayError, _check_reachable
    with pytest.raises(RayError, match="127.0.0.1:1: nothing answers there"):
        _check_reachable("127.0.0.1:1")


def test_nul_in_an_address_is_a_400_on_both_databases(engine):
    _one_labelled_image(engine)
    client = _app(engine)
    assert client.get("/api/image/p1%00x").status_code == 400
    assert client.get("/?group=a%00b").status_code == 400
    assert client.get("/api/image/p1").status_code == 200


def test_a_uid_that_ends_like_a_route_is_its_own_image(sqlite_engine):
    """A uid ``sub/png`` is answered as itself, never as the pixels of the image ``sub``."""
    _one_labelled_image(sqlite_engine, "sub")
    _one_labelled_image(sqlite_engine, "sub/png")
    client = _app(sqlite_engine)
    assert client.get("/api/image/sub/png").get_json()["uid"] == "sub/png"
    assert client.get("/api/image/sub").get_json()["uid"] == "sub"
    assert "'sub/png' has no file" in client.get("/api/png/sub/png").get_json()["error"]  # its own, not sub's


def test_a_fifo_among_annotated_images_is_left_out_not_waited_on(engine, tmp_path):
    import numpy as np
    from PIL import Image

    from pipeline.masks import import_png_dirs
    for sub in ("images", "masks/heart", "masks/left_lung", "masks/right_lung"):
        (tmp_path / sub).mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 255, 100, dtype=np.uint8), (100, 1))
    Image.fromarray(ramp).save(tmp_path / "images" / "good.png")
    for s in ("heart", "left_lung", "right_lung"):
        Image.fromarray((ramp > 128).astype(np.uint8) * 255).save(tmp_path / "masks" / s / "good.png")
    os.mkfifo(tmp_path / "images" / "pipe.png")
    os.mkfifo(tmp_path / "masks" / "heart" / "pipe.png")
    s = import_png_dirs(engine, tmp_path)
    assert (s.images, s.masks, s.skipped) == (1, 3, 1)


def test_text_a_database_cannot_store_is_refused_before_the_write_on_both_databases(engine):
    """NUL and lone surrogates in a reviewer's name or note answered 500 on PostgreSQL; a
    version sent ahead of the stored one locked the image against every later save. Both are
    4xx now, on both databases, and the image takes the next save."""
    _one_labelled_image(engine)
    client = _app(engine)
    for field in ("reviewer", "note"):
        for bad in ("a\x00b", "a\ud800b"):
            body = {"decision": "accepted", "version": 0, "reviewer": "x", field: bad}
            r = client.post("/api/review/p1", data=json.dumps(body), content_type="application/json")
            assert r.status_code == 400 and field in r.get_json()["error"], (field, bad, r.get_data(as_text=True))
    r = client.post("/api/review/p1", json={"decision": "accepted", "version": 2147483646, "reviewer": "x"})
    assert r.status_code == 409 and "reload" in r.get_json()["error"]
    r = client.post("/api/review/p1", json={"decision": "accepted", "version": 0, "reviewer": "x"})
    assert r.status_code == 200 and r.get_json()["version"] == 1


@pytest.mark.parametrize("name", ["../../x", "a/b", "model.pt", "x@abc", "", "."])
def test_a_model_name_is_a_plain_name(sqlite_engine, tmp_path, name):
    """`train --name ../../x` wrote outside runs/; a name ending .pt or holding '@' could not
    be reached by `label --model`. Each is refused before anything is trained or written."""
    from pipeline.model import ModelError
    from pipeline.model.registry import check_model_name

    with pytest.raises(ModelError, match="plain name"):
        check_model_name(name)
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'c.db'}", "train", "--name", name or "''"])
    assert r.exit_code != 0 and not (tmp_path / "runs").exists()
    assert check_model_name("clinic_a-v2.1") == "clinic_a-v2.1"


# ---------------------------------------------------------------- red team 2026-12-07, the rest


def _dicom_with(tmp_path, name: str, **attrs) -> Path:
    import warnings

    import pydicom
    ds = pydicom.dcmread(REPO.parent / "shared" / "data" / "dicom" / "cr_chest_pa_jpeg_baseline.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, v in attrs.items():
            setattr(ds, k, v)
    folder = tmp_path / "dicom"
    folder.mkdir(exist_ok=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / f"{name}.dcm")
    return folder


def test_junk_header_fields_are_left_out_with_a_note_and_the_film_kept(tmp_path, db_url):
    folder = _dicom_with(tmp_path, "junk", PatientAge="999Y", PatientSex="Q", StudyDate="20231399",
                         PixelSpacing=["1e300", "1e300"])
    _dicom_with(tmp_path, "inf", PixelSpacing=["inf", "0.1"])
    _dicom_with(tmp_path, "negative", PixelSpacing=["-0.1", "0.1"])
    r = CliRunner().invoke(cli, ["--db", db_url, "catalogue", "load", "dicom", str(folder)])
    assert r.exit_code == 0 and "3 rows loaded, 0 rows left out" in r.output, r.output
    assert "3 junk fields left out of rows that loaded" in r.output
    eng = D.connect(db_url)
    with eng.connect() as c:
        rows = {x.uid: x for x in c.execute(text("SELECT uid, age, sex, study_date, spacing_x, spacing_source "
                                                 "FROM images"))}
        notes = c.execute(text("SELECT uid, reason FROM load_errors")).all()
    junk = rows["junk"]
    assert (junk.age, junk.sex, junk.study_date, junk.spacing_x) == (None, None, None, None)
    assert "mm is not a film's" in junk.spacing_source
    assert rows["inf"].spacing_x is None and "is not a positive number" in rows["inf"].spacing_source
    assert "-0.1" in rows["negative"].spacing_source and "is 0" not in rows["negative"].spacing_source
    (uid, reason), = notes
    assert uid == "junk" and all(k in reason for k in ("PatientAge left out", "PatientSex left out",
                                                        "StudyDate left out"))


def test_a_window_that_is_not_a_number_is_left_out_not_read_as_a_blank_film(tmp_path):
    from pipeline.imaging.decoders import decode_dicom
    folder = _dicom_with(tmp_path, "nan", WindowCenter="nan", WindowWidth="400")
    unit, facts = decode_dicom(folder / "nan.dcm", 256)
    assert unit.std() > 0.05 and "left out" in facts["window"]


def test_an_unterminated_quote_is_a_malformed_row_not_a_field(tmp_path, db_url):
    csv_file = tmp_path / "export.csv"
    csv_file.write_text('uid,text\na,"cardiomegaly"\nb,"never closed\nc,normal\n')
    r = CliRunner().invoke(cli, ["--db", db_url, "catalogue", "load", "csv", str(csv_file), "--map", "uid=uid",
                                 "--map", "text=text"])
    assert "1 rows loaded, 1 rows left out" in r.output
    eng = D.connect(db_url)
    with eng.connect() as c:
        assert c.execute(text("SELECT uid FROM images")).scalars().all() == ["a"]
        assert "quote opened on line 3 never closes" in c.execute(text("SELECT reason FROM load_errors")).scalar()


def test_a_uid_repeated_in_a_later_batch_of_one_load_is_reported(sqlite_engine):
    from pipeline.catalogue.records import store
    items = [{"uid": u, "source": "csv", "text": t} for u, t in (("a", "first"), ("b", "x"), ("a", "again"))]
    s = store(sqlite_engine, iter(items), "export.csv", batch_size=2, progress=False)
    assert s.errors == 1 and s.reasons == {"duplicate uid": 1}
    with sqlite_engine.connect() as c:
        assert "also earlier in this load" in c.execute(text("SELECT reason FROM load_errors")).scalar()
        assert c.execute(text("SELECT text FROM images WHERE uid = 'a'")).scalar() == "again"
    again = store(sqlite_engine, iter(items[:2]), "export.csv", batch_size=2, progress=False)
    assert again.errors == 0  # loading the file again is an update, not a duplicate


def test_a_group_name_longer_than_its_column_is_refused_on_loading_the_rules(tmp_path):
    from pipeline.groups import GroupsError
    from pipeline.groups.rules import load_rules
    rules = tmp_path / "rules.toml"
    rules.write_text(f'[[group]]\nname = "{"x" * 41}"\nmatch = ["heart"]\n')
    with pytest.raises(GroupsError, match="1 to 40 characters"):
        load_rules(rules)


def test_models_export_writes_only_a_new_file_or_one_of_its_own(tmp_path, tiny_model):
    from pipeline.model import ModelError, export_checkpoint
    outside = tmp_path / "outside.txt"
    outside.write_text("someone's notes")
    link = tmp_path / "model.pt"
    link.symlink_to(outside)
    with pytest.raises(ModelError, match="a symbolic link"):
        export_checkpoint(tiny_model, link)
    assert outside.read_text() == "someone's notes"
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("not ours")
    with pytest.raises(ModelError, match="a file cxrlabel did not write"):
        export_checkpoint(tiny_model, foreign)
    with pytest.raises(ModelError, match="does not exist"):
        export_checkpoint(tiny_model, tmp_path / "no" / "such" / "model.pt")
    mine = tmp_path / "mine.pt"
    export_checkpoint(tiny_model, mine)
    export_checkpoint(tiny_model, mine, half=False)  # replacing one of its own is fine


def test_quality_fit_outputs_are_guarded_as_exports_are(tmp_path):
    from pipeline.quality.films import FitError
    from pipeline.quality.fit import _is_our_figure, _is_score_file
    from pipeline.regular import check_output_file
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\n someone else's")
    (tmp_path / "fig.png").symlink_to(outside)
    with pytest.raises(FitError, match="a symbolic link"):
        check_output_file(tmp_path / "fig.png", _is_our_figure, FitError, "figure")
    with pytest.raises(FitError, match="did not write"):
        check_output_file(outside, _is_our_figure, FitError, "figure")
    (tmp_path / "score.json").write_text('{"not": "a score"}')
    with pytest.raises(FitError, match="did not write"):
        check_output_file(tmp_path / "score.json", _is_score_file, FitError, "score file")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(FitError, match="FIFO"):
        check_output_file(fifo, _is_score_file, FitError, "score file")
    assert check_output_file(tmp_path / "new.json", _is_score_file, FitError) == tmp_path / "new.json"

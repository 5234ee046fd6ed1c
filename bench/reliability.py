"""Reliability: hostile inputs, faults and races against a fresh catalogue.

For each group of cases, prints how many were tried, how many the run survived (the bad
item refused with a recorded, named reason and everything around it processed; a fault
stopped cleanly with one line), and how many stored rows were lost or changed that the case
should not have touched (the goal: 0). The hostile files come from the same generator as
`tests/test_reliability.py`, built fresh in a temporary folder.

The hostile SQL of `tests/test_security.py` runs against SQLite always, and against a
PostgreSQL server as its superuser with `--pg postgresql+psycopg://postgres@127.0.0.1:5432`
(a database of its own is created there and dropped).

Usage: python bench/reliability.py [--data ../shared/data] [--pg SERVER_URL]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

import torch
from sqlalchemy import text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import CxrlabelError  # noqa: E402
from pipeline import catalogue as C  # noqa: E402
from pipeline import db as D  # noqa: E402
from pipeline.collect import Settings, collect  # noqa: E402
from pipeline.groups import select_images  # noqa: E402
from pipeline.label import LabelOptions, label  # noqa: E402
from pipeline.model import ModelError, resolve_model  # noqa: E402
from pipeline.results import QueryError, read_only_query  # noqa: E402
from tests.test_reliability import full_disk_open, hostile_corpus  # noqa: E402
from tests.test_security import HOSTILE_POSTGRES, HOSTILE_SQLITE  # noqa: E402


def snapshot(engine) -> dict[str, str]:
    """A digest per stored row of the tables users' results live in."""
    out = {}
    with engine.connect() as c:
        for table, key in (("images", "uid"), ("measurements", "uid || '/' || model"),
                           ("masks", "uid || '/' || structure || '/' || kind || '/' || model")):
            for k, *rest in c.execute(text(f"SELECT {key}, * FROM {table}")):
                out[f"{table}:{k}"] = hashlib.sha256(repr(rest).encode()).hexdigest()
    return out


def lost(before: dict[str, str], after: dict[str, str]) -> int:
    return sum(1 for k, v in before.items() if after.get(k) != v)


def _refused(fn, *args, **kwargs) -> bool:
    """Whether ``fn`` refused with one of cxrlabel's own errors."""
    try:
        fn(*args, **kwargs)
    except CxrlabelError:
        return True
    return False


def sqlite_file_untouched(tmp: Path) -> tuple:
    """tests/test_security.py's hostile statements on a DELETE-journal SQLite file: each
    refused, and the file byte for byte as it was (no WAL switch, nothing attached)."""
    import sqlite3
    path = tmp / "journal.db"
    D.connect(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA journal_mode=DELETE")
    before, box = path.read_bytes(), tmp / "box_sqlite"
    box.mkdir()
    engine = D.connect_read_only(f"sqlite:///{path}")
    n = sum(_refused(lambda q: list(read_only_query(engine, q).rows), sql.format(box=box)) for sql in HOSTILE_SQLITE)
    engine.dispose()
    clean = path.read_bytes() == before and not any(box.iterdir())
    return ("hostile SQL, SQLite file byte for byte", len(HOSTILE_SQLITE), n if clean else 0, 0)


def postgres_statements(server: str, tmp: Path) -> tuple:
    """tests/test_security.py's hostile statements on PostgreSQL, connected as a superuser."""
    from sqlalchemy import create_engine
    name = f"cxr_reliability_{os.getpid()}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    box = tmp / "box_pg"
    box.mkdir()
    box.chmod(0o777)
    try:
        engine = D.connect(f"{server}/{name}")
        with engine.begin() as c:
            c.execute(D.images.insert(), [{"uid": "u1", "source": "csv", "loaded_at": D.utcnow()}])
        before = snapshot(engine)
        ro = D.connect_read_only(f"{server}/{name}")
        n = sum(_refused(lambda q: list(read_only_query(ro, q).rows), sql.format(box=box))
                for sql, _ in HOSTILE_POSTGRES)
        gone = lost(before, snapshot(engine))
        ro.dispose()
        engine.dispose()
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
    return ("hostile SQL, PostgreSQL as a superuser", len(HOSTILE_POSTGRES), n if not any(box.iterdir()) else 0,
            gone)


def inputs_that_hang(engine, data: Path, tmp: Path) -> tuple:
    """A FIFO among the files and as a catalogued path, a codestream larger than its header,
    and a decoder stuck in a loop: each a recorded failure, none a hang."""
    import shutil

    import pydicom

    import pipeline.collect as K
    folder = tmp / "fifo_archive"
    folder.mkdir()
    shutil.copy(data / "dicom" / "RG1_UNCR.dcm", folder / "good.dcm")
    os.mkfifo(folder / "pipe.dcm")
    before = snapshot(engine)
    s = C.load_dicom(engine, folder, workers=1, progress=False)
    n = int(s.loaded == 1 and s.errors == 1)
    ds = pydicom.dcmread(data / "dicom" / "RG1_J2KR.dcm")
    ds.Rows, ds.Columns = 512, 480
    ds.save_as(tmp / "liar.dcm")
    stuck = str(data / "dicom" / "RG1_UNCI.dcm")
    items = [("fifo", str(folder / "pipe.dcm")), ("liar", str(tmp / "liar.dcm"))]
    collect(engine, items, Settings(64), tmp / "cache_hang", workers=1, progress=False)
    real, timeout = K.preprocess, K.DECODE_TIMEOUT

    def endless(*_args, **_kw):
        while True:
            pass

    K.preprocess, K.DECODE_TIMEOUT = endless, 0.5
    try:
        collect(engine, [("stuck", stuck)], Settings(64), tmp / "cache_hang", workers=1, progress=False)
    finally:
        K.preprocess, K.DECODE_TIMEOUT = real, timeout
    with engine.connect() as c:
        why = dict(c.execute(text("SELECT uid, message FROM failures WHERE stage = 'collect'")).all())
    n += "FIFO" in why.get("fifo", "")
    n += "codestream is 1841 x 1955" in why.get("liar", "")
    n += "longer than 0.5 s" in why.get("stuck", "")
    return ("inputs that could hang (FIFO in a folder and as a path, lying codestream, stuck decoder)", 4, n,
            lost(before, snapshot(engine)))


def review_app(engine, tmp: Path) -> tuple:
    """A rebinding page's Host, a cross-origin write, deep and out-of-range bodies, and two
    overlapping saves at once: refused with a 4xx or merged, never a 500 nor a stored CTR
    that disagrees with the masks."""
    from pipeline import review as R
    from pipeline.webapp import create_app
    from tests.test_security import _one_labelled_image, _race, _stored_agrees_with_final_masks
    review_db = D.connect(f"sqlite:///{tmp / 'review.db'}")
    _one_labelled_image(review_db)
    client = create_app(review_db, "m").test_client()
    post = "/api/review/p1"
    body = {"decision": "accepted", "version": 0, "reviewer": "x"}
    n = int(client.get("/", headers={"Host": "attacker.example:8765"}).status_code == 421)
    n += client.post(post, json=body, headers={"Origin": "http://attacker.example"}).status_code == 403
    n += client.post(post, data=b"[" * 100_000 + b"]" * 100_000, content_type="application/json").status_code == 400
    n += client.post(post, json={**body, "version": 10**20}).status_code == 400
    n += client.get("/?page=100001").status_code == 400
    heart = {"heart": [[[5, 10], [50, 10], [50, 49], [5, 49]]]}
    version = R.image_view(review_db, "p1", "m")["version"]
    outcomes = _race(review_db, version, [dict(decision="rejected"), dict(decision="corrected", polygons=heart)])
    try:
        _stored_agrees_with_final_masks(review_db)
        n += sorted(outcomes) == ["conflict", "saved"]
    except AssertionError:
        pass
    review_db.dispose()
    return ("review app (rebinding Host, cross-origin write, bad bodies, page, concurrent saves)", 6, n, 0)


def exports(engine, tmp: Path) -> tuple:
    """An unrelated file, a device and a foreign folder as --out; Ctrl-C and a full disk in the
    middle of an export: refused or stopped, nothing overwritten, no .partial left."""
    import errno

    import pipeline.export as E
    with engine.connect() as c:
        chosen = select_images(c, all_images=True, labelled_by="default")
    precious = tmp / "precious.txt"
    precious.write_text("a thesis chapter\n")
    (tmp / "photos").mkdir()
    (tmp / "photos" / "holiday.png").write_bytes(b"x")
    n = _refused(E.export, engine, "rle", precious, chosen, progress=False)
    n += _refused(E.export, engine, "rle", Path("/dev/full"), chosen, progress=False)
    n += _refused(E.export, engine, "png", tmp / "photos", chosen, progress=False)
    out = tmp / "exports" / "m.csv"
    E.export(engine, "rle", out, chosen, progress=False)
    kept = out.read_bytes()
    import pipeline.export.rle as writer  # the writer's own name for it (the package re-exports it)
    real = writer._rle_row
    for fault in (KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        def failing(*_, fault=fault):
            raise fault

        writer._rle_row = failing
        try:
            E.export(engine, "rle", out, chosen, progress=False)
        except (KeyboardInterrupt, E.ExportError) as e:
            n += (isinstance(e, KeyboardInterrupt) or str(out) in str(e)) and out.read_bytes() == kept \
                and not list(out.parent.glob("*.partial"))
        finally:
            writer._rle_row = real
    clean = precious.read_text() == "a thesis chapter\n" and os.listdir(tmp / "photos") == ["holiday.png"]
    return ("exports (unrelated file, device, foreign folder, Ctrl-C, full disk)", 5, n if clean else 0, 0)


def red_team_2026_12(engine, tmp: Path) -> tuple:
    """The red team of 2026-12-07 (issue 41), points 1-5: a FIFO as a rules file, a CSV and a
    .sql file; a report with a 300 kB run of spaces and one that meets a backtracking rules
    pattern; a png-dirs file named as a catalogued DICOM, and two files of one stem; a mask
    that claims 100 megapixels; a 400-digit coordinate, a lone surrogate, a NUL and a version
    ahead of the stored one sent to the review app. Each refused with one line or recorded
    as one failure, the rest done, nothing stored changed."""
    import struct
    import zlib

    import cv2
    import numpy as np

    from pipeline import groups as G
    from pipeline import masks as M
    from pipeline.groups import reading
    from pipeline.results import statement
    from pipeline.webapp import create_app
    from tests.test_security import _one_labelled_image
    before = snapshot(engine)
    fifo = tmp / "red.sql"
    os.mkfifo(fifo)
    n = sum(_refused(fn) for fn in (lambda: G.load_rules(fifo), lambda: statement(str(fifo)),
                                    lambda: C.load_csv(engine, fifo, {"uid": "id"}, progress=False)))
    side = D.connect(f"sqlite:///{tmp / 'red.db'}")
    rules = tmp / "red.toml"
    rules.write_text('[[group]]\nname = "cardiomegaly"\nmatch = ["cardiomegaly", "(a+)+$"]\n')
    with side.begin() as c:
        c.execute(D.images.insert(), [{"uid": u, "source": "csv", "text": t, "loaded_at": D.utcnow()} for u, t in
                                      (("spaces", "Cardiomegaly" + " " * 300_000 + "."), ("stall", "a" * 60 + "b"))])
    timeout, reading.REPORT_TIMEOUT = reading.REPORT_TIMEOUT, 0.5
    try:
        counts = G.assign(side, G.load_rules(rules), progress=False)
    finally:
        reading.REPORT_TIMEOUT = timeout
    with side.connect() as c:
        failed = c.execute(text("SELECT uid FROM failures WHERE stage = 'groups'")).scalars().all()
    n += counts.get("cardiomegaly") == 1
    n += failed == ["stall"]
    folder = tmp / "red_png"
    (folder / "png").mkdir(parents=True)
    (folder / "mask" / "heart").mkdir(parents=True)
    film = np.full((300, 300), 90, np.uint8)
    for name in ("RG1_UNCR.png", "coll.png", "coll.jpg", "big.png"):
        cv2.imwrite(str(folder / "png" / name), film)
        cv2.imwrite(str(folder / "mask" / "heart" / name.replace(".jpg", ".png")), (film > 0).astype(np.uint8) * 255)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    packer = zlib.compressobj(9)
    rows = packer.compress((b"\0" * (1 + 2 * 10_000)) * 10_000) + packer.flush()
    (folder / "mask" / "heart" / "big.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 16, 0, 0, 0, 0))
        + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    s = M.import_png_dirs(engine, folder, images="png", masks={"heart": "mask/heart"}, source="red")
    with engine.connect() as c:
        stored = set(c.execute(text("SELECT uid FROM masks WHERE kind = 'manual'")).scalars())
    n += "RG1_UNCR" not in stored and "coll" not in stored
    n += s.skipped == 4 and "big" not in stored
    review_db = D.connect(f"sqlite:///{tmp / 'red_review.db'}")
    _one_labelled_image(review_db)
    client = create_app(review_db, "m").test_client()
    post = "/api/review/p1"
    bad = [b'{"decision": "corrected", "version": 0, "reviewer": "x", "polygons": {"heart": [[1' + b"0" * 400
           + b', 2], [5, 6], [7, 9]]}}', b'{"decision": "accepted", "version": 0, "reviewer": "\\ud800"}',
           b'{"decision": "accepted", "version": 0, "reviewer": "x", "note": "a\\u0000b"}']
    n += sum(client.post(post, data=b, content_type="application/json").status_code == 400 for b in bad)
    n += client.post(post, json={"decision": "accepted", "version": 2147483646, "reviewer": "x"}).status_code == 409
    n += client.post(post, json={"decision": "accepted", "version": 0, "reviewer": "x"}).status_code == 200
    review_db.dispose()
    side.dispose()
    gone = lost(before, snapshot(engine))  # the import touched none of the stored images
    return ("the red team of 2026-12-07 (FIFO paths, stalling reports, png-dirs names, mask bomb, review fields)",
            12, n, gone)


def red_team_2026_12_rest(engine, tmp: Path) -> tuple:
    """The red team of 2026-12-07 (issue 41), the rest of points 6, 9 and 12: a checkpoint export
    through a link and over a foreign file; a fitted score's file over someone else's; junk DICOM
    header fields and spacing; an unterminated CSV quote; a uid repeated in a later batch; a
    41-character group name; a uid ``sub/png`` in the review app; a NaN window. Each refused with
    one line, or left out with a note while the rest loads."""
    from pipeline.catalogue.records import store
    from pipeline.groups.rules import load_rules
    from pipeline.imaging.decoders import decode_dicom
    from pipeline.model import export_checkpoint
    from pipeline.quality.films import FitError
    from pipeline.quality.fit import _is_score_file
    from pipeline.regular import check_output_file
    from pipeline.webapp import create_app
    from tests.test_security import _dicom_with, _one_labelled_image
    before = snapshot(engine)
    outside = tmp / "rest_outside.txt"
    outside.write_text("someone's notes")
    link = tmp / "rest_link.pt"
    link.symlink_to(outside)
    default = REPO / "models" / "default" / "model.pt"
    n = sum(_refused(fn) for fn in (lambda: export_checkpoint(default, link),
                                                  lambda: export_checkpoint(default, outside)))
    n += _refused(lambda: check_output_file(outside, _is_score_file, FitError))
    n += outside.read_text() == "someone's notes"
    (tmp / "rest").mkdir(exist_ok=True)
    (tmp / "rest_nan").mkdir(exist_ok=True)
    folder = _dicom_with(tmp / "rest", "junk", PatientAge="999Y", PatientSex="Q", StudyDate="20231399",
                         PixelSpacing=["1e300", "1e300"])
    side = D.connect(f"sqlite:///{tmp / 'rest.db'}")
    s = C.load_dicom(side, folder, progress=False)
    with side.connect() as c:
        row = c.execute(text("SELECT age, sex, study_date, spacing_x FROM images WHERE uid = 'junk'")).first()
    n += s.loaded == 1 and row is not None and tuple(row) == (None, None, None, None) and sum(s.notes.values()) == 3
    csv_file = tmp / "rest.csv"
    csv_file.write_text('uid,text\na,"cardiomegaly"\nb,"never closed\nc,normal\n')
    s = C.load_csv(side, csv_file, {"uid": "uid", "text": "text"}, progress=False)
    n += s.loaded == 1 and s.errors == 1
    items = [{"uid": u, "source": "csv"} for u in ("x", "y", "x")]
    n += store(side, iter(items), "rest.csv", batch_size=2, progress=False).errors == 1
    rules = tmp / "rest.toml"
    rules.write_text(f'[[group]]\nname = "{"x" * 41}"\nmatch = ["heart"]\n')
    n += _refused(lambda: load_rules(rules))
    review_db = D.connect(f"sqlite:///{tmp / 'rest_review.db'}")
    _one_labelled_image(review_db, "sub")
    _one_labelled_image(review_db, "sub/png")
    n += create_app(review_db, "m").test_client().get("/api/image/sub/png").get_json()["uid"] == "sub/png"
    nan = _dicom_with(tmp / "rest_nan", "nan", WindowCenter="nan", WindowWidth="400")
    n += float(decode_dicom(nan / "nan.dcm", 128)[0].std()) > 0.05
    review_db.dispose()
    side.dispose()
    return ("the red team of 2026-12-07, the rest (write guards, junk headers, CSV quote, batches, names, routes)",
            10, n, lost(before, snapshot(engine)))


def environment(tmp: Path) -> tuple:
    """An unreachable database and Ray address, and a database folder that does not exist:
    one-line errors within seconds, nothing created."""
    import time

    from pipeline.distributed import RayError, _check_reachable
    t0 = time.monotonic()
    n = 0
    try:
        D.connect("postgresql+psycopg://me@127.0.0.1:1/cxr")
    except Exception as e:  # the CLI turns the driver's error into one line naming the address
        n += "127.0.0.1" in str(e)
    try:
        _check_reachable("127.0.0.1:1")
    except RayError as e:
        n += "127.0.0.1:1" in str(e)
    n += _refused(D.connect, f"sqlite:///{tmp}/no/such/dir/x.db") and not (tmp / "no").exists()
    quick = time.monotonic() - t0 < 30
    return ("environment (unreachable database and Ray address, missing database folder)", 3, n if quick else 0, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--pg", metavar="SERVER_URL", help="also try the hostile SQL on this PostgreSQL server (superuser)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        url = f"sqlite:///{tmp / 'c.db'}"
        engine = D.connect(url)
        C.load_dicom(engine, args.data / "dicom", workers=1, progress=False)
        with engine.connect() as c:
            good = select_images(c, all_images=True)
        label(engine, good, LabelOptions(model="default", device="cpu", batch_size=4, cache_dir=str(tmp / "cache"),
                                         workers=1, progress=False))

        # hostile files through collect and label
        cases = hostile_corpus(tmp / "hostile")
        before = snapshot(engine)
        with engine.begin() as c:
            c.execute(D.images.insert(), [{"uid": u, "source": "hostile", "path": str(p), "loaded_at": D.utcnow()}
                                          for u, (p, _) in cases.items()])
        with engine.connect() as c:
            everything = select_images(c, all_images=True)
        collect(engine, everything.pairs(), Settings(256), tmp / "cache", workers=2, progress=False)
        label(engine, everything, LabelOptions(model="default", device="cpu", batch_size=4,
                                               cache_dir=str(tmp / "cache"), workers=2, progress=False))
        with engine.connect() as c:
            reasons = dict(c.execute(text("SELECT uid, message FROM failures WHERE stage = 'label'")).all())
        survived = sum(1 for u, (_, why) in cases.items() if why in reasons.get(u, ""))
        rows.append(("hostile image files (collect, label)", len(cases), survived, lost(before, snapshot(engine))))

        # hostile catalogue rows
        csv_path = tmp / "clinic.csv"
        csv_path.write_bytes(b"id,report\n"
                             b"\"x'); DROP TABLE images;--\",a\n" b"nul\x00uid,b\n" + b"u" * 300 + b",c\n"
                             b"cyr,\xcf\xf0\xe8\xe2\xe5\xf2\n" b"q,\"multi\nline, \"\"quoted\"\"\"\n"
                             b"q,duplicate\n" b"short\n" b",no uid\n")
        before = snapshot(engine)
        s = C.load_csv(engine, csv_path, {"uid": "id", "text": "report"}, progress=False)
        expected_problems = 6  # NUL, 300 chars, bad bytes, duplicate, short row, no uid
        ok = s.errors == expected_problems and s.loaded == 2
        rows.append(("hostile catalogue rows (CSV)", 8, 8 if ok else 8 - abs(s.errors - expected_problems),
                     lost(before, snapshot(engine))))

        # hostile SQL through query
        before = snapshot(engine)
        db_bytes = (tmp / "c.db").read_bytes()
        refused = [f"ATTACH '{tmp / 'a.db'}' AS a", f"VACUUM INTO '{tmp / 'v.db'}'", "PRAGMA journal_mode=DELETE",
                   "DELETE FROM images", "DROP TABLE masks", "UPDATE measurements SET ctr = 0",
                   "SELECT load_extension('x')"]
        answered = ["SELECT ';' AS s", "SELECT COUNT(*) FROM images WHERE text LIKE '%:x%'"]
        n = 0
        for sql in refused:
            try:
                list(read_only_query(engine, sql).rows)
            except QueryError as e:
                n += "read-only" in str(e)
        for sql in answered:
            n += len(list(read_only_query(engine, sql).rows)) == 1
        clean = not (tmp / "a.db").exists() and not (tmp / "v.db").exists() and (tmp / "c.db").read_bytes() == db_bytes
        rows.append(("hostile SQL (query)", len(refused) + len(answered), n if clean else 0,
                     lost(before, snapshot(engine))))

        rows.append(sqlite_file_untouched(tmp))
        if args.pg:
            rows.append(postgres_statements(args.pg, tmp))
        rows.append(inputs_that_hang(engine, args.data, tmp))
        rows.append(review_app(engine, tmp))
        rows.append(exports(engine, tmp))
        rows.append(environment(tmp))
        rows.append(red_team_2026_12(engine, tmp))
        rows.append(red_team_2026_12_rest(engine, tmp))

        # crafted checkpoints
        marker = tmp / "ran"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        n = 0
        for i, body in enumerate(({"format": "cxrlabel-2", "spec": Payload()}, Payload(), {"config": Payload()})):
            torch.save(body, tmp / f"evil{i}.pt")
            try:
                resolve_model(engine, str(tmp / f"evil{i}.pt"), "cpu")
            except ModelError:
                n += 1
        rows.append(("crafted checkpoints", 3, n if not marker.exists() else 0, 0))

        # races: many start-ups on a new database, two label runs at once
        race_url = f"sqlite:///{tmp / 'race.db'}"
        errors: list[BaseException] = []
        barrier = threading.Barrier(10)

        def start() -> None:
            barrier.wait()
            try:
                D.connect(race_url).dispose()
            except BaseException as e:  # noqa: BLE001 - counted below
                errors.append(e)

        threads = [threading.Thread(target=start) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with engine.begin() as c:  # the DICOM images unlabelled again, for two runs to race over
            c.execute(text("DELETE FROM masks WHERE uid IN (SELECT uid FROM images WHERE source = 'dicom')"))
            c.execute(text("DELETE FROM measurements WHERE uid IN (SELECT uid FROM images WHERE source = 'dicom')"))
        before = snapshot(engine)
        with engine.connect() as c:
            dicom = select_images(c, source="dicom")
        options = LabelOptions("default", "cpu", 2, str(tmp / "cache"), 1, progress=False)
        runs = [threading.Thread(target=label, args=(engine, dicom, options)) for _ in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join()
        with engine.connect() as c:
            once = c.execute(text("SELECT COUNT(*) FROM measurements WHERE uid IN "
                                  "(SELECT uid FROM images WHERE source = 'dicom')")).scalar()
        rows.append(("races (10 start-ups, 2 label runs at once)", 2,
                     int(not errors) + int(once == len(dicom.items)), lost(before, snapshot(engine))))

        # faults: a full cache folder, a killed run, a read-only database
        import pipeline.collect as K
        before = snapshot(engine)
        n = 0
        K.open = full_disk_open
        try:
            collect(engine, everything.pairs(), Settings(128), tmp / "cache_full", workers=1, progress=False)
        except CxrlabelError as e:
            n += "No space left" in str(e) and not list((tmp / "cache_full").rglob("*.tmp*"))
        finally:
            del K.open
        with engine.begin() as c:
            c.execute(D.label_runs.insert().values(model="default", selection="killed", host=socket.gethostname(),
                                                   pid=2**22 + 12345, started_at=D.utcnow(), status="running"))
        label(engine, dicom, LabelOptions(model="default", device="cpu", batch_size=4, cache_dir=str(tmp / "cache"),
                                          workers=1, progress=False))
        with engine.connect() as c:
            n += c.execute(text("SELECT status FROM label_runs WHERE selection = 'killed'")).scalar() == "interrupted"
        engine.dispose()
        ro = D.connect(f"sqlite:///file:{tmp / 'c.db'}?mode=ro&uri=true")
        n += len(list(read_only_query(ro, "SELECT uid FROM catalogue").rows)) > 0
        ro.dispose()
        rows.append(("faults (full cache, killed run, read-only database)", 3, n, lost(before, snapshot(engine))))

    print("| cases | tried | survived | stored rows lost |")
    print("|---|---|---|---|")
    for name, tried, ok, gone in rows:
        print(f"| {name} | {tried} | {ok} | {gone} |")
    total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"| **all** | {total[0]} | {total[1]} | {total[2]} |")
    return 0 if total[0] == total[1] and total[2] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

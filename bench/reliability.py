"""Reliability: hostile inputs, faults and races against a fresh catalogue.

For each group of cases, prints how many were tried, how many the run survived (the bad
item refused with a recorded, named reason and everything around it processed; a fault
stopped cleanly with one line), and how many stored rows were lost or changed that the case
should not have touched (the goal: 0). The hostile files come from the same generator as
`tests/test_reliability.py`, built fresh in a temporary folder.

Usage: python bench/reliability.py [--data ../shared/data]
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
from pipeline.label import label  # noqa: E402
from pipeline.model import ModelError, resolve_model  # noqa: E402
from pipeline.results import QueryError, read_only_query  # noqa: E402
from tests.test_reliability import full_disk_open, hostile_corpus  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
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
        label(engine, good, "default", "cpu", 4, str(tmp / "cache"), workers=1, progress=False)

        # hostile files through collect and label
        cases = hostile_corpus(tmp / "hostile")
        before = snapshot(engine)
        with engine.begin() as c:
            c.execute(D.images.insert(), [{"uid": u, "source": "hostile", "path": str(p), "loaded_at": D.utcnow()}
                                          for u, (p, _) in cases.items()])
        with engine.connect() as c:
            everything = select_images(c, all_images=True)
        collect(engine, everything.pairs(), Settings(256), tmp / "cache", workers=2, progress=False)
        label(engine, everything, "default", "cpu", 4, str(tmp / "cache"), workers=2, progress=False)
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
        runs = [threading.Thread(target=label, args=(engine, dicom, "default", "cpu", 2, str(tmp / "cache"), 1),
                                 kwargs={"progress": False}) for _ in range(2)]
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
        label(engine, dicom, "default", "cpu", 4, str(tmp / "cache"), workers=1, progress=False)
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

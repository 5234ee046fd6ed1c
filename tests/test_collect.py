import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select, text, update

from pipeline import catalogue as C
from pipeline import db as D
from pipeline.collect import Entry, Failure, Settings, collect, entry_path, fetch, read_cached, read_entry
from tests.conftest import DICOM, NIH_PNG


def _items(engine, tmp_path):
    C.load_dicom(engine, DICOM, workers=1, progress=False)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with engine.begin() as c:
        for uid, path in [("nih1", NIH_PNG / "00000001_000.png"), ("missing", tmp_path / "no.png"),
                          ("corrupt", bad)]:
            c.execute(D.images.insert().values(uid=uid, source="csv", path=str(path),
                                               loaded_at=D.utcnow()))
        return [tuple(r) for r in c.execute(text("SELECT uid, path FROM images ORDER BY uid"))]


def test_collect_caches_records_failures_and_resumes(engine, tmp_path):
    items = _items(engine, tmp_path)
    cache = tmp_path / "cache"
    s = collect(engine, items, Settings(64), cache, workers=2, progress=False)
    assert (s.selected, s.cached, s.failed, s.skipped) == (9, 7, 2, 0)
    with engine.connect() as c:
        fails = dict(c.execute(text("SELECT uid, error_class FROM failures")).all())
        got = read_cached(c, ["RG1_UNCR", "nih1"], Settings(64))
    assert fails == {"missing": "DecodeError", "corrupt": "DecodeError"}
    e = got["RG1_UNCR"]
    assert e.image.shape == (64, 64) and (e.geom.orig_height, e.geom.orig_width) == (1955, 1841)
    # a re-run skips what is cached and retries only the failures
    again = collect(engine, items, Settings(64), cache, workers=1, progress=False)
    assert (again.cached, again.skipped, again.failed) == (0, 7, 2)
    # other settings live in their own namespace
    other = collect(engine, items[:2], Settings(32, "stretch"), cache, workers=1, progress=False)
    assert other.cached == 2 and Settings(32, "stretch").id != Settings(64).id
    assert len(list((cache / Settings(64).id).rglob("*.npy"))) == 7
    assert np.array_equal(np.load(entry_path(cache, Settings(64), "RG1_UNCR")), e.image)


def test_png_entries_of_earlier_versions_are_still_read(engine, tmp_path):
    """A cache collected before entries were .npy files keeps working, checksums included."""
    items = _items(engine, tmp_path)[:2]
    cache = tmp_path / "cache"
    collect(engine, items, Settings(64), cache, workers=1, progress=False)
    with engine.begin() as c:
        for row in c.execute(select(D.cache)).mappings().all():
            img = np.load(row["path"])
            png = Path(row["path"]).with_suffix(".png")
            png.write_bytes(cv2.imencode(".png", img)[1].tobytes())
            c.execute(update(D.cache).where(D.cache.c.uid == row["uid"]).values(
                path=str(png), checksum=hashlib.sha256(png.read_bytes()).hexdigest(), bytes=png.stat().st_size))
            Path(row["path"]).unlink()
    got = fetch(engine, items, Settings(64), cache)
    assert all(isinstance(g, Entry) and g.image.shape == (64, 64) for g in got)
    assert collect(engine, items, Settings(64), cache, workers=1, progress=False).skipped == 2


def test_interrupted_write_is_never_trusted(engine, tmp_path):
    items = _items(engine, tmp_path)[:1]
    cache = tmp_path / "cache"
    s = Settings(64)
    # a crash between writing the temporary file and renaming it leaves only the .tmp file
    target = entry_path(cache, s, items[0][0])
    target.parent.mkdir(parents=True)
    (target.parent / (target.name + ".tmp123")).write_bytes(b"half")
    assert collect(engine, items, s, cache, workers=1, progress=False).cached == 1
    with engine.connect() as c:
        row = c.execute(select(D.cache)).mappings().one()
    assert read_entry(row["path"], row["checksum"]).shape == (64, 64)
    # a damaged entry is detected by its checksum
    with open(row["path"], "r+b") as f:
        f.seek(60)
        f.write(b"\0\0\0\0")
    try:
        read_entry(row["path"], row["checksum"])
    except Exception as e:
        assert "checksum" in str(e) and "re-run collect" in str(e)
    else:
        raise AssertionError("a damaged cache entry must not be trusted")
    assert os.path.exists(row["path"]) and np.isfinite(1.0)


def test_fetch_collects_on_the_fly_and_is_the_cache_s_only_writer(engine, tmp_path):
    items = _items(engine, tmp_path)
    cache, s = tmp_path / "cache", Settings(64)
    collect(engine, items[:2], s, cache, workers=1, progress=False)
    got = fetch(engine, items, s, cache)
    assert [x.uid for x in got] == [u for u, _ in items]  # in the order asked
    fails = {x.uid: x.error_class for x in got if isinstance(x, Failure)}
    assert fails == {"missing": "DecodeError", "corrupt": "DecodeError"}
    entries = [x for x in got if isinstance(x, Entry)]
    assert len(entries) == 7 and all(x.image.shape == (64, 64) for x in entries)
    with engine.connect() as c:
        rows = c.execute(select(D.cache.c.uid)).scalars().all()
        recorded = c.execute(text("SELECT COUNT(*) FROM failures")).scalar()
    assert sorted(rows) == sorted(x.uid for x in entries)  # new entries recorded, once each
    assert recorded == 0  # failures are the caller's to record (label records them in its batch)
    # what was collected on the fly is what the cache now serves
    again = {x.uid: x for x in fetch(engine, items, s, cache, failure_stage="collect")}
    for x in entries:
        assert np.array_equal(again[x.uid].image, x.image) and again[x.uid].geom == x.geom
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM failures WHERE stage='collect'")).scalar() == 2
    # a damaged entry is collected again, not trusted
    path = entry_path(cache, s, entries[0].uid)
    path.write_bytes(b"damaged")
    (fresh,) = fetch(engine, [(entries[0].uid, dict(items)[entries[0].uid])], s, cache)
    assert isinstance(fresh, Entry) and np.array_equal(fresh.image, entries[0].image)


def test_a_process_without_the_database_fetches_from_the_rows_it_is_given(engine, tmp_path):
    """What a labelling stream does: given the batch's cache rows, it reads their entries,
    collects what is missing or damaged, and hands back the new rows, without their images,
    for the caller to store; the same entries as fetch itself."""
    import pickle

    from pipeline.collect import cache_rows, fetch_files, store_entries
    items = _items(engine, tmp_path)
    cache, s = tmp_path / "cache", Settings(64)
    collect(engine, items[:4], s, cache, workers=1, progress=False)
    with engine.connect() as c:
        rows = pickle.loads(pickle.dumps(cache_rows(c, s, [u for u, _ in items])))  # as sent to a stream
    assert sorted(rows) == sorted(u for u, _ in items[:4])
    entry_path(cache, s, items[0][0]).write_bytes(b"damaged")
    got, new = fetch_files(items, rows, s, cache)
    assert [x.uid for x in got] == [u for u, _ in items]
    assert {r["uid"] for r in new} == {u for u, _ in items[4:]} | {items[0][0]}  # failures included
    assert not any("image" in r for r in new)
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM cache")).scalar() == 4  # nothing stored by it
    store_entries(engine, s, new, None)
    again = fetch(engine, items, s, cache)
    for x, y in zip(got, again, strict=True):
        assert type(x) is type(y) and x.uid == y.uid
        if isinstance(x, Entry):
            assert np.array_equal(x.image, y.image) and x.geom == y.geom
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM cache")).scalar() == sum(isinstance(x, Entry) for x in got)


def test_collect_rebuilds_entries_whose_files_were_truncated_or_deleted(engine, tmp_path):
    items = _items(engine, tmp_path)
    cache, s = tmp_path / "cache", Settings(64)
    collect(engine, items, s, cache, workers=1, progress=False)
    with engine.connect() as c:
        rows = c.execute(select(D.cache.c.uid, D.cache.c.path).order_by(D.cache.c.uid)).all()
    os.remove(rows[0].path)
    with open(rows[1].path, "r+b") as f:
        f.truncate(40)
    with open(rows[2].path, "r+b") as f:  # same size, other bytes: only --verify sees it
        f.seek(50)
        f.write(b"\xff\xff")
    again = collect(engine, items, s, cache, workers=1, progress=False)
    assert (again.rebuilt, again.cached) == (2, 2)
    verified = collect(engine, items, s, cache, workers=1, progress=False, verify=True)
    assert (verified.rebuilt, verified.cached) == (1, 1)
    with engine.connect() as c:
        assert len(read_cached(c, [r.uid for r in rows], s)) == len(rows)


def test_a_moved_archive_is_one_grouped_summary_not_a_line_per_film(tmp_path):
    """`collect` on a catalogue whose files are gone printed one warning per film (70,000
    lines on an archive whose disk moved): the run's end groups them by reason, with a count,
    an example and the way out."""
    import subprocess
    import sys

    from tests.conftest import REPO
    csv_path = tmp_path / "clinic.csv"
    csv_path.write_text("id,path\n" + "".join(f"f{i:03d},/mnt/gone/f{i:03d}.dcm\n" for i in range(60)))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run = [sys.executable, "-m", "pipeline", "--db", url]
    subprocess.run([*run, "catalogue", "load", "csv", str(csv_path), "--map", "uid=id", "--map", "path=path"],
                   cwd=REPO, check=True, capture_output=True)
    done = subprocess.run([*run, "collect", "--all", "--cache", str(tmp_path / "cache"), "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True)
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.strip() and "collect" not in x[:12]]
    assert done.returncode != 0 and len(lines) <= 6, done.stdout + done.stderr
    assert "60 x" in done.stdout and "catalogue reroot" in done.stdout

"""Nothing stops an archive run: hostile files, crafted checkpoints, faults and odd values.

The hostile corpus is generated here at test time from the shared data (nothing committed).
"""

from __future__ import annotations

import csv
import errno
import gzip
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import text

from pipeline import catalogue as C
from pipeline import db as D
from pipeline.cli import cli
from pipeline.imaging import DecodeError, decode
from tests.conftest import DICOM, NIH_CSV


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode).save(path)
    return path


def _python(code: str) -> str:
    """What ``code`` prints, run by a fresh interpreter at the checkout's root (a process of
    its own: its own fork server and pools); it must exit cleanly."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return done.stdout


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


class _FullDisk:
    """A file opened for writing on a full disk: the write fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk_open(path, mode="r", *args, **kwargs):
    """``open`` as on a full disk (patched into a module for a test)."""
    return _FullDisk(open(path, mode, *args, **kwargs))


def hostile_corpus(folder: Path) -> dict[str, tuple[Path, str]]:
    """``{uid: (file, words its recorded failure must contain)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    real = (DICOM / "RG1_UNCR.dcm").read_bytes()
    ramp = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (300, 1))
    cases: dict[str, tuple[Path, str]] = {}

    def add(uid: str, path: Path, reason: str) -> None:
        cases[uid] = (path, reason)

    (folder / "truncated.dcm").write_bytes(real[: len(real) // 2])
    add("truncated_dicom", folder / "truncated.dcm", "cannot be decoded")
    (folder / "header_only.dcm").write_bytes(real[:132] + real[132:400])
    add("header_only_dicom", folder / "header_only.dcm", "no pixel data")
    (folder / "empty.png").write_bytes(b"")
    add("empty_file", folder / "empty.png", "not a readable image")
    (folder / "text.png").write_text("uid,text\n1,hello\n")
    add("text_as_png", folder / "text.png", "not a readable image")
    add("one_pixel", _png(folder / "one.png", np.full((1, 1), 128, np.uint8)), "smaller than 64")
    add("sliver", _png(folder / "sliver.png", np.tile(ramp[:1, :], (5, 4))[:, :1000]), "smaller than 64")
    add("elongated", _png(folder / "long.png", np.tile(ramp[:100, :], (1, 5))), "more elongated")
    add("blank", _png(folder / "blank.png", np.full((300, 300), 77, np.uint8)), "blank image")
    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[..., :3] = 200
    add("transparent", _png(folder / "transparent.png", rgba, "RGBA"), "fully transparent")
    add("huge_claim", _png_claiming(folder / "huge.png", 13000, 13000), "decoding budget")
    add("missing_file", folder / "not_there.png", "file not found")
    return cases


def test_hostile_corpus_is_recorded_and_good_files_are_all_labelled(annotated_engine, tiny_model, tmp_path):
    from pipeline.collect import Settings, collect
    from pipeline.groups import select_images
    from pipeline.label import LabelOptions, label
    cases = hostile_corpus(tmp_path / "hostile")
    good = ["RG1_UNCR", "RG1_J2KR", "cr_chest_pa_jpeg_baseline"]
    flipped = bytearray((DICOM / "RG1_UNCI.dcm").read_bytes())
    for i in range(len(flipped) - 4000, len(flipped), 97):  # flipped bits in the pixel data
        flipped[i] ^= 0x5A
    (tmp_path / "flipped.dcm").write_bytes(bytes(flipped))
    # through the catalogue: a clinic CSV listing them all (paths relative to the CSV), and the
    # hostile DICOMs' headers read by the DICOM loader
    listing = tmp_path / "hostile.csv"
    with open(listing, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "file"])
        w.writerows([(u, os.path.relpath(p, tmp_path)) for u, (p, _) in cases.items()]
                    + [(u, str(DICOM / f"{u}.dcm")) for u in good] + [("flipped_bits", "flipped.dcm")])
    loaded = C.load_csv(annotated_engine, listing, {"uid": "id", "path": "file"}, source_name="hostile",
                        progress=False)
    assert loaded.loaded == len(cases) + len(good) + 1
    headers = C.load_dicom(annotated_engine, tmp_path / "hostile", workers=1, progress=False)
    assert headers.loaded + headers.errors == 2  # the truncated and header-only files: read or refused
    with annotated_engine.connect() as c:
        chosen = select_images(c, source="hostile")
    s = collect(annotated_engine, chosen.pairs(), Settings(64), tmp_path / "cache", workers=2, progress=False)
    assert s.failed == len(cases)
    run = label(annotated_engine, chosen, LabelOptions(model=str(tiny_model), device="cpu", batch_size=4,
                                                       cache_dir=str(tmp_path / "cache"), workers=1,
                                                       progress=False))
    with annotated_engine.connect() as c:
        failures = {(st, u): m for st, u, m in c.execute(text("SELECT stage, uid, message FROM failures"))}
        labelled = set(c.execute(text("SELECT uid FROM measurements")).scalars())
        n_rows = c.execute(text("SELECT COUNT(*) FROM failures")).scalar()
    for uid, (_, reason) in cases.items():
        assert reason in failures[("collect", uid)], (uid, failures[("collect", uid)])
        assert reason in failures[("label", uid)], (uid, failures[("label", uid)])
    assert set(good) <= labelled  # every good file around them is labelled
    assert "flipped_bits" in labelled or ("label", "flipped_bits") in failures  # survived, either way
    assert run.labelled + run.failed == run.selected
    # a re-run retries the failures without repeating their rows
    collect(annotated_engine, chosen.pairs(), Settings(64), tmp_path / "cache", workers=1, progress=False)
    with annotated_engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM failures")).scalar() == n_rows


def test_crafted_checkpoints_never_run_their_payload(annotated_engine, tiny_model, tmp_path):
    import os
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "cxrlabel-2", "spec": Payload(), "state_dict": {}}, evil)
    url = str(annotated_engine.url)
    r = CliRunner().invoke(cli, ["--db", url, "label", "--all", "--limit", "1", "--model", str(evil)])
    assert r.exit_code == 1 and "not a readable cxrlabel checkpoint" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # a crafted resume point in a run folder is refused the same way
    from pipeline.train import TrainConfig, TrainError, train
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": Payload()}, run / "last.pt")
    with pytest.raises(TrainError, match="not a resumable checkpoint"):
        train(annotated_engine, TrainConfig.from_preset("tiny", epochs=1, threads=2), run,
              str(tmp_path / "cache"), progress=False)
    assert not marker.exists()


def test_a_registered_model_whose_file_changed_is_refused(annotated_engine, tiny_model, tmp_path):
    import shutil

    from pipeline.model import ModelError, read_checkpoint, register_model, resolve_model
    copy = tmp_path / "m.pt"
    shutil.copy(tiny_model, copy)
    ck = read_checkpoint(copy)
    register_model(annotated_engine, "m", copy, "tiny", ck.training, ck.info["dice"], ck.info["data_hash"])
    assert resolve_model(annotated_engine, "m", "cpu").name == "m"
    with open(copy, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ModelError, match="registered with [0-9a-f]{64}"):
        resolve_model(annotated_engine, "m", "cpu")


def test_a_full_cache_folder_stops_the_run_at_once_and_leaves_no_temporary_files(engine, tmp_path, monkeypatch):
    import pipeline.collect as K
    C.load_dicom(engine, DICOM, workers=1, progress=False)
    monkeypatch.setattr(K, "open", full_disk_open, raising=False)
    r = CliRunner().invoke(cli, ["--db", str(engine.url.render_as_string(hide_password=False)), "collect", "--all",
                                 "--size", "64", "--workers", "1", "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 1 and "No space left on device" in r.output and str(tmp_path / "cache") in r.output
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM failures")).scalar() == 0  # not one per image


def test_query_is_read_only_without_side_effects_and_returns_every_row(engine, tmp_path):
    url = engine.url.render_as_string(hide_password=False)
    with engine.begin() as c:
        c.execute(D.images.insert(), [{"uid": f"u{i:04d}", "source": "csv", "text": f"t{i}", "loaded_at": D.utcnow()}
                                      for i in range(450)])

    def q(*args):
        return CliRunner().invoke(cli, ["--db", url, "query", *args])

    r = q("SELECT uid FROM images ORDER BY uid", "--csv")
    assert r.exit_code == 0 and len(r.output.splitlines()) == 451
    assert len(json.loads(q("SELECT uid FROM images", "--json").output)) == 450
    r = q("SELECT uid FROM images ORDER BY uid")
    assert "250 more rows not shown" in r.output
    assert json.loads(q("SELECT ';' AS s", "--json").output) == [{"s": ";"}]
    r = q("SELECT COUNT(*) AS n FROM images WHERE text LIKE '%:x%' OR uid LIKE '%%'", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"n": 450}]
    if engine.dialect.name == "sqlite":
        db = Path(engine.url.database)
        before = db.read_bytes()
        for sql in (f"ATTACH '{tmp_path / 'a.db'}' AS a", f"VACUUM INTO '{tmp_path / 'v.db'}'",
                    "PRAGMA journal_mode=DELETE", "DELETE FROM images"):
            r = q(sql)
            assert r.exit_code == 1 and "read-only" in r.output, (sql, r.output)
        assert not (tmp_path / "a.db").exists() and not (tmp_path / "v.db").exists()
        assert db.read_bytes() == before
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert q("PRAGMA table_info(images)").exit_code == 0
    else:
        for sql in ("DELETE FROM images", f"COPY images TO '{tmp_path / 'x.csv'}'"):
            r = q(sql)
            assert r.exit_code == 1 and "read-only" in r.output, (sql, r.output)
        assert q("EXPLAIN SELECT * FROM images").exit_code == 0


@pytest.mark.parametrize(("body", "words"), [
    ('[[group]]\nname = "healthy"\nmatch = "норма"\n', "group 'healthy': match must be a list"),
    ('window = "six"\n[[group]]\nname = "x"\nmatch = ["a"]\n', "window must be a whole number"),
    ('[[group]]\nname = "x"\nmatch = ["a"]\nmatches = ["b"]\n', "group 'x': unknown key 'matches'"),
    ('[[group]]\nname = "x"\nmatch = ["a("]\n', "bad pattern"),
])
def test_rules_files_are_validated(tmp_path, body, words):
    from pipeline.groups import GroupsError, load_rules
    path = tmp_path / "rules.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(GroupsError, match=words.replace("(", r"\(")):
        load_rules(path)


def test_reloading_a_file_never_repeats_its_problems(engine, tmp_path):
    path = tmp_path / "clinic.csv"
    path.write_text("id,text\n1,a\n2\n3,c\n,d\n", encoding="utf-8")
    for _ in range(4):
        C.load_csv(engine, path, {"uid": "id", "text": "text"}, progress=False)
    errors = C.list_errors(engine)
    assert len(errors) == 2 and {e["line"] for e in errors} == {3, 5}


def test_a_truncated_gzip_keeps_the_rows_before_it_and_says_so(engine, tmp_path):
    with gzip.open(NIH_CSV, "rb") as f:
        head = b"".join(next(f) for _ in range(6001))
    whole = gzip.compress(head)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(whole[: len(whole) * 3 // 4])
    r = CliRunner().invoke(cli, ["--db", str(engine.url.render_as_string(hide_password=False)), "catalogue", "load",
                                 "nih", str(path)])
    assert r.exit_code == 1 and "truncated or damaged after line" in r.output
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM images")).scalar() >= 4000


def test_relative_paths_in_a_clinic_csv_resolve_from_its_folder(engine, tmp_path, monkeypatch):
    (tmp_path / "export" / "img").mkdir(parents=True)
    (tmp_path / "export" / "list.csv").write_text("id,file\na,img/a.png\nb,/abs/b.png\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    C.load_csv(engine, Path("export/list.csv"), {"uid": "id", "path": "file"}, progress=False)
    with engine.connect() as c:
        paths = dict(c.execute(text("SELECT uid, path FROM images")).all())
    assert paths == {"a": str(tmp_path / "export" / "img" / "a.png"), "b": "/abs/b.png"}


@pytest.mark.parametrize(("args", "words"), [
    (["catalogue", "load", "csv", "{csv}", "--map", "uid=id", "--encoding", "nosuch"], "unknown text encoding"),
    (["catalogue", "load", "csv", "{csv}", "--map", "uid=id", "--delimiter", ";;"], "one character"),
    (["catalogue", "load", "csv", "{csv}", "--map", "uid=id", "--delimiter", ""], "one character"),
    (["catalogue", "load", "nih", "{folder}"], "is a folder"),
    (["catalogue", "load", "csv", "{folder}", "--map", "uid=id"], "is a folder"),
    (["catalogue", "load", "csv", "{dupes}", "--map", "uid=id"], "more than once"),
    (["label", "--all", "--device", "cuda:0"], "no CUDA GPU visible"),
    (["label", "--all", "--model", "{textfile}"], "not a cxrlabel checkpoint (not a torch file)"),
    (["label", "--all", "--model", "{folder}"], "is a folder: name a checkpoint file in it"),
    (["quality", "show", "--model", "/etc/passwd"], "not a cxrlabel checkpoint (not a torch file)"),
    (["label", "--all", "--model", "nosuchmodel"], "models list"),
    (["train", "--model", "tiny", "--device", "bogus"], "use auto, cpu or cuda"),
    (["groups", "assign", "--rules", "{badrules}"], "window must be"),
    (["query", "missing.sql"], "no such file"),
])
def test_every_bad_value_gets_one_line_naming_it(annotated_db, tmp_path, args, words):
    import shutil
    db = tmp_path / "c.db"
    shutil.copy(annotated_db, db)
    (tmp_path / "f.csv").write_text("id,text\n1,a\n", encoding="utf-8")
    (tmp_path / "d.csv").write_text("id,id\n1,2\n", encoding="utf-8")
    (tmp_path / "t.txt.pt").write_text("not a checkpoint")
    (tmp_path / "r.toml").write_text('window = "six"\n[[group]]\nname = "x"\nmatch = ["a"]\n')
    (tmp_path / "folder").mkdir()
    fill = {"{csv}": str(tmp_path / "f.csv"), "{folder}": str(tmp_path / "folder"), "{dupes}": str(tmp_path / "d.csv"),
            "{textfile}": str(tmp_path / "t.txt.pt"), "{badrules}": str(tmp_path / "r.toml")}
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{db}", *[fill.get(a, a) for a in args]])
    assert r.exit_code != 0 and words in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output


def test_control_characters_in_a_uid_are_refused(engine, tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"id,text\nok,a\nbad\x00uid,b\n")
    s = C.load_csv(engine, path, {"uid": "id", "text": "text"}, progress=False)
    assert s.loaded == 1 and "control characters" in C.list_errors(engine)[0]["reason"]


def test_ctr_needs_the_heart_and_both_lungs():
    from pipeline.measure import measure
    h = np.zeros((100, 200), bool)
    h[40:80, 80:140] = True
    lung = np.zeros_like(h)
    lung[10:90, 110:180] = True
    m = measure({"heart": h, "left_lung": lung, "right_lung": np.zeros_like(h)})
    assert m["ctr"] is None and m["ctr_missing"] == "right_lung"
    both = measure({"heart": h, "left_lung": lung, "right_lung": np.roll(lung, -90, axis=1)})
    assert both["ctr"] is not None and both["ctr_missing"] is None


# ---------------------------------------------------------------- properties


_cell = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True), _cell), max_size=15,
                     unique_by=lambda r: r[0]))
def test_csv_loader_stores_exactly_what_the_file_holds(sqlite_engine, tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("csv") / "x.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "report"])
        w.writerows(rows)
    with sqlite_engine.begin() as c:
        c.execute(text("DELETE FROM images"))
    s = C.load_csv(sqlite_engine, path, {"uid": "id", "text": "report"}, progress=False)
    with sqlite_engine.connect() as c:
        stored = dict(c.execute(text("SELECT uid, text FROM images")).all())
    assert s.loaded == len(rows)
    assert stored == {u: (t.strip() or None) for u, t in rows}


_SEED_PNG = io.BytesIO()
Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))).save(_SEED_PNG, "PNG")
_SEEDS = [_SEED_PNG.getvalue(), (DICOM / "RG1_UNCR.dcm").read_bytes()[:6000]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(_SEEDS), cuts=st.lists(st.tuples(st.integers(0, 5999), st.integers(0, 255)),
                                                    max_size=8), length=st.integers(0, 6000))
def test_decoder_either_decodes_or_says_why(tmp_path_factory, seed, cuts, length):
    data = bytearray(seed[:length] if length < len(seed) else seed)
    for pos, value in cuts:
        if pos < len(data):
            data[pos] = value
    path = tmp_path_factory.mktemp("dec") / "x.img"
    path.write_bytes(bytes(data))
    try:
        arr, (h, w), _ = decode(path, target=64)
    except DecodeError:
        return
    assert arr.ndim == 2 and arr.dtype == np.float32 and h >= 64 and w >= 64
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0


def test_a_read_only_database_serves_every_reading_command(annotated_db, tiny_model, tmp_path):
    import shutil
    db = tmp_path / "c.db"
    shutil.copy(annotated_db, db)
    rw = f"sqlite:///{db}"
    r = CliRunner().invoke(cli, ["--db", rw, "label", "--all", "--limit", "4", "--model", str(tiny_model),
                                 "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    ro = f"sqlite:///file:{db}?mode=ro&uri=true"
    for args in (["query", "SELECT COUNT(*) AS n FROM label_results"], ["groups", "list"], ["models", "list"],
                 ["catalogue", "errors"], ["evaluate", "--model", "run"]):
        r = CliRunner().invoke(cli, ["--db", ro, *args])
        assert r.exit_code == 0, (args, r.output)
    r = CliRunner().invoke(cli, ["--db", ro, "groups", "assign"])
    assert r.exit_code == 1 and "read-only and this command writes" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("body", "words"), [
    ({"format": "cxrlabel-2", "state_dict": {}}, "lacks 'spec'"),
    ({"format": "cxrlabel-2", "spec": {"network": "nonet"}, "state_dict": {}}, "nonet"),
])
def test_damaged_checkpoints_get_one_line(tmp_path, body, words):
    from pipeline.model import ModelError, load_model
    torch.save(body, tmp_path / "m.pt")
    with pytest.raises(ModelError, match=words):
        load_model(tmp_path / "m.pt")


def test_a_checkpoint_missing_a_weight_gets_one_line(tiny_model, tmp_path):
    from pipeline.model import ModelError, load_model, read_checkpoint, write_checkpoint
    ck = read_checkpoint(tiny_model)
    ck.state_dict.pop(next(iter(ck.state_dict)))
    write_checkpoint(tmp_path / "m.pt", ck)
    with pytest.raises(ModelError, match="weights do not fit"):
        load_model(tmp_path / "m.pt")


def test_a_later_process_pool_starts_with_the_pipelines_worker_modules_imported():
    """The fork server is one per process, started by its first pool (catalogue's, when a
    DICOM folder is loaded first): a later pool's workers, label's among them, start with
    torch and the labelling code already imported, instead of each importing them again
    (a fixed ~2.9 s a pool on 2 cores; see bench/RESULTS.md)."""
    probe = "sorted(m for m in ('pipeline.collect', 'pipeline.label', 'torch') if m in __import__('sys').modules)"
    code = ("from pipeline import process_pool\n"
            "with process_pool(1) as pool:\n"
            "    pool.submit(int).result()\n"
            "with process_pool(1) as pool:\n"
            f"    print(pool.submit(eval, {probe!r}).result())\n")
    out = _python(code)
    assert out.strip() == "['pipeline.collect', 'pipeline.label', 'torch']", out


def test_a_pool_starts_all_its_workers_before_its_first_task():
    """Labelling starts its post-processing workers beside the first batch's model pass
    (their start, ~0.25 s, otherwise delayed the first batch's answer): after start_all
    every worker is running, each a process of its own."""
    code = ("from pipeline import process_pool\n"
            "with process_pool(2) as pool:\n"
            "    pool.start_all()\n"
            "    print(len(pool._processes), len({p.pid for p in pool._processes.values()}))\n")
    out = _python(code)
    assert out.split() == ["2", "2"], out


def test_a_pools_setup_runs_once_in_each_worker_as_it_starts():
    """A labelling stream's copy of the model is handed over once, as its worker starts (the
    pool's ``setup``), not with every batch."""
    code = ("import os, tempfile\n"
            "from pipeline import process_pool\n"
            "here, there = os.getcwd(), os.path.realpath(tempfile.gettempdir())\n"
            "with process_pool(2, (os.chdir, (there,))) as pool:\n"
            "    pool.start_all()\n"
            "    print({pool.submit(os.getcwd).result() for _ in range(8)} == {there}, os.getcwd() == here)\n")
    out = _python(code)
    assert out.split() == ["True", "True"], out


def test_a_cpu_labels_in_a_stream_per_thread_up_to_eight():
    """One stream per torch thread, each model on one thread, up to 8 streams (each holds a
    model and its batch's activations); beyond, several threads each, never more in all;
    or as many streams as --workers asks for, sharing the threads."""
    from pipeline.label import stream_shape
    assert [stream_shape(t) for t in (1, 2, 4, 8)] == [(1, 1), (2, 1), (4, 1), (8, 1)]
    assert [stream_shape(t) for t in (9, 12, 16, 64)] == [(4, 2), (6, 2), (8, 2), (8, 8)]
    for t in range(1, 130):
        streams, each = stream_shape(t)
        assert streams <= 8 and streams * each <= t and streams * each > t - each - streams
    # --workers asks for the streams: they share the threads, one at least each
    assert [stream_shape(2, 1), stream_shape(8, 2), stream_shape(2, 4)] == [(1, 2), (2, 4), (4, 1)]


def test_a_batch_is_shared_between_workers_by_the_films_sizes():
    """Each film goes to exactly one task; the two tasks' work (a fixed part and one that
    grows with the film's pixels) differs by less than one film's."""
    from pipeline.imaging import Geometry
    from pipeline.label.batch import Item
    from pipeline.label.run import FILM_WORK, _shares
    sides = [3000, 512, 2500, 600, 800, 2048, 1024, 700, 2800, 512, 900, 1500, 3000, 640, 2200, 1000]
    items = [Item(f"u{i}", np.zeros((256, 256), np.uint8), Geometry.fit(s, s, 256, "pad"))
             for i, s in enumerate(sides)]
    tasks = _shares(items, 2)
    assert sorted(i for t in tasks for i in t) == list(range(len(items)))
    assert all(t == sorted(t) for t in tasks)
    work = [sum(1 + sides[i] ** 2 / FILM_WORK for i in t) for t in tasks]
    assert abs(work[0] - work[1]) <= 1 + 3000 ** 2 / FILM_WORK
    assert _shares(items[:1], 2) == [[0]] and _shares([], 2) == []


def test_every_file_a_user_names_is_opened_only_when_it_is_a_regular_file(engine, tmp_path):
    """A FIFO given where a rules file, a CSV, a reports table, an OpenI archive or a .sql
    file belongs is refused at once with a line naming it (it blocked for ever before), and a
    folder in a file's place likewise."""
    from pipeline.catalogue import CatalogueError
    from pipeline.groups import GroupsError, load_rules
    from pipeline.results import QueryError, statement

    fifo = tmp_path / "pipe.sql"
    os.mkfifo(fifo)
    with pytest.raises(GroupsError, match="pipe.sql: a FIFO .named pipe., not a regular file"):
        load_rules(fifo)
    with pytest.raises(CatalogueError, match="a FIFO"):
        C.load_csv(engine, fifo, {"uid": "id"}, progress=False)
    with pytest.raises(CatalogueError, match="a FIFO"):
        C.load_nih(engine, fifo, progress=False)
    with pytest.raises(CatalogueError, match="a FIFO"):
        C.load_openi(engine, fifo, progress=False)
    with pytest.raises(CatalogueError, match="a FIFO"):
        C.load_dicom(engine, DICOM, workers=1, text_csv=fifo, progress=False)
    with pytest.raises(QueryError, match="a FIFO"):
        statement(str(fifo))
    folder = tmp_path / "folder.sql"
    folder.mkdir()
    with pytest.raises(QueryError, match="a folder"):
        statement(str(folder))
    with pytest.raises(GroupsError, match="a folder"):
        load_rules(folder)
    # a rules file that is not UTF-8 gets one line too
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[[group]]\nname = "c"\nmatch = ["cardiom\xe9galie"]\n'.encode("latin-1"))
    with pytest.raises(GroupsError, match="latin.toml: the rules file is not UTF-8"):
        load_rules(latin)
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM images")).scalar() == 0


@pytest.mark.parametrize("encoding", ["rot13", "base64", "hex", "punycode"])
def test_an_encoding_that_is_no_text_files_is_refused(engine, tmp_path, encoding):
    from pipeline.catalogue import CatalogueError

    path = tmp_path / "c.csv"
    path.write_text("id,report\nu1,cardiomegaly\n")
    with pytest.raises(CatalogueError, match="not a text file's encoding"):
        C.load_csv(engine, path, {"uid": "id", "text": "report"}, encoding=encoding, progress=False)


def test_one_unstorable_value_is_one_load_error_and_the_rest_of_its_batch_loads(engine, tmp_path):
    """A width of 1e20 (SQLite) or 3e9, a view over its 20 characters and NUL in the text
    (PostgreSQL) lost the whole 5,000-row batch: each is now a load_errors row naming the
    value, and the good rows around it load, on both databases."""
    path = tmp_path / "clinic.csv"
    path.write_bytes(b"id,report,view,width\n"
                     b"good1,Cardiomegaly,PA,2000\n"
                     b"huge,Normal,PA,1e20\n"
                     b"big,Normal,PA,3000000000\n"
                     b"long,Normal," + b"V" * 25 + b",2000\n"
                     b"nul,Nor\x00mal,PA,2000\n"
                     b"good2,Normal,AP,1800\n")
    s = C.load_csv(engine, path, {"uid": "id", "text": "report", "view": "view", "width": "width"}, progress=False)
    with engine.connect() as c:
        loaded = set(c.execute(text("SELECT uid FROM images")).scalars())
        errors = dict(c.execute(text("SELECT uid, reason FROM load_errors")).all())
    assert loaded == {"good1", "good2"} and s.loaded == 2
    assert {"huge", "big", "long", "nul"} <= set(errors)
    assert "view" in errors["long"] and "NUL" in errors["nul"]
    assert "width" in errors["huge"] or "not a whole number" in errors["huge"]


@pytest.mark.parametrize(("change", "words"), [
    (lambda sd: {k: v.fill_(float("nan")) if i == 0 else v for i, (k, v) in enumerate(sd.items())}, "not finite"),
    (lambda sd: {k: v.round().to(torch.int32) if v.is_floating_point() else v for k, v in sd.items()}, "torch.int32"),
    (lambda sd: list(sd.values()), "not a table of tensors"),
])
def test_a_checkpoint_whose_weights_cannot_be_right_is_refused_before_labelling(tiny_model, tmp_path, change, words):
    """NaN weights labelled 'successfully' with empty masks, integer weights with CTR 1.000,
    a state dict that is a list failed deep inside torch: one line each, before any film."""
    from pipeline.model import ModelError, load_model, read_checkpoint, write_checkpoint
    ck = read_checkpoint(tiny_model)
    ck.state_dict = change(dict(ck.state_dict))
    write_checkpoint(tmp_path / "m.pt", ck)
    with pytest.raises(ModelError, match=words):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize(("spec", "words"), [
    ({"size": 0}, "size 0"), ({"size": -5}, "size -5"), ({"size": 200_000}, "size 200000"),
    ({"args": {"channels": [16, 4096, 64], "strides": [2, 2]}}, "layer widths"),
    ({"args": "unet"}, "args must be"), ({"structures": []}, "structures"),
    ({"heart_definition": "liver"}, "heart_definition"),
])
def test_a_spec_out_of_bounds_is_refused_before_anything_is_allocated(spec, words):
    from pipeline.model import ModelError
    from pipeline.model.spec import ModelSpec
    with pytest.raises(ModelError, match=words):
        ModelSpec.from_dict({"network": "unet", **spec})


def test_a_dicom_whose_rows_are_fewer_than_its_pixel_data_is_refused(tmp_path):
    """A header whose Rows is 100 short of the stored frame was cut to part of the film and
    labelled as if whole; it is now a decode error naming both sizes."""
    import pydicom
    ds = pydicom.dcmread(DICOM / "RG1_UNCR.dcm")
    ds.Rows = int(ds.Rows) - 100
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(DecodeError, match="pixel data holds 7198310 bytes .* needs 6830110"):
        decode(tmp_path / "short.dcm")
    assert decode(DICOM / "RG1_UNCR.dcm")[0].shape == (1955, 1841)


def test_a_load_or_import_that_did_nothing_exits_4(tmp_path):
    """`catalogue load csv` where every row is malformed and `masks import png-dirs` where
    every image is unreadable exited 0: both end with the documented status for nothing done."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("id,report\n,no uid\n,none either\n")
    r = CliRunner().invoke(cli, ["--db", url, "catalogue", "load", "csv", str(csv_path), "--map", "uid=id"])
    assert r.exit_code == 4 and "0 rows loaded, 2 rows left out" in r.output, r.output
    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "set" / "heart").mkdir()
    (tmp_path / "set" / "images" / "a.png").write_bytes(b"not a png")
    r = CliRunner().invoke(cli, ["--db", url, "masks", "import", "png-dirs", str(tmp_path / "set"),
                                 "--mask", "heart=heart"])
    assert r.exit_code == 4 and "0 images" in r.output, r.output

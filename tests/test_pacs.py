"""A clinic's PACS, a real one (Orthanc with its DICOMweb plugin, started by the `orthanc`
fixture): catalogued over QIDO-RS and WADO-RS metadata, pixels fetched on demand into the
cache, faults through a small proxy on 127.0.0.1, credentials kept out of everything stored."""

import http.server
import json
import threading

import numpy as np
import pydicom
import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import select

from pipeline import db as D
from pipeline.cli import cli
from pipeline.collect import Settings, preprocess
from pipeline.pacs.client import DicomWeb, PacsError, check_url, multipart_parts
from tests.conftest import DICOM


def run(url, *args):
    return CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)


def shared_sops() -> dict[str, list]:
    """SOP Instance UID -> the shared files that hold it (two films are there twice, in
    another transfer syntax: a PACS keeps one of each pair)."""
    out: dict[str, list] = {}
    for f in sorted(DICOM.glob("*.dcm")):
        out.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), []).append(f)
    return out


def assert_cached_as_from_files(eng, sops: dict[str, list]) -> None:
    """Each instance's cache entry (the default model's settings) is the decode of one of the
    shared files that hold its SOP Instance UID."""
    from pipeline.collect import read_cached
    with eng.connect() as conn:
        cached = read_cached(conn, list(sops), Settings(256, "pad"))
    for sop, files in sops.items():
        assert any(np.array_equal(cached[sop].image, preprocess(f, 256, "pad")[0]) for f in files), sop


class FaultProxy:
    """A proxy on 127.0.0.1 in front of the PACS that can fail as servers do: one instance
    answering 500, the first N requests 503, an offset ignored, or stop answering at all."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.fail_sop: str | None = None
        self.busy = 0  # the next requests answered 503 (Retry-After 0)
        self.ignore_offset = False
        self.huge = 0  # each search answer sent with its rows repeated this many times (limit ignored)
        self.refuse_first_store = False  # a STOW answered 202: its first instance refused (0xA700)
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, method: str) -> None:
                proxy.requests.append(f"{method} {self.path}")
                if proxy.busy:
                    proxy.busy -= 1
                    return self._answer(503, b"busy", {"Retry-After": "0"})
                if proxy.fail_sop and proxy.fail_sop in self.path and "/instances/" in self.path:
                    return self._answer(500, b"internal error")
                path = self.path
                if proxy.ignore_offset and "offset=" in path:
                    path = "&".join(p for p in path.split("&") if not p.startswith("offset="))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(method, proxy.target + path, data=body, headers=headers, timeout=60)
                if method == "POST" and proxy.refuse_first_store and r.ok:
                    answer = r.json()
                    done = answer["00081199"]["Value"]
                    first = done.pop(0)
                    first["00081197"] = {"vr": "US", "Value": [0xA700]}
                    answer["00081198"] = {"vr": "SQ", "Value": [first]}
                    return self._answer(202, json.dumps(answer).encode(), {"Content-Type": "application/dicom+json"})
                if proxy.huge and method == "GET" and "/instances?" in path and r.ok:
                    return self._answer(200, json.dumps(r.json() * proxy.huge).encode(),
                                        {"Content-Type": "application/dicom+json"})
                self._answer(r.status_code, r.content, {"Content-Type": r.headers.get("Content-Type", "")})

            def _answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (a huge answer)
                    pass

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(orthanc):
    p = FaultProxy(orthanc.url.rsplit("/dicom-web", 1)[0])
    yield p
    p.stop()


@pytest.fixture
def pacs_env(orthanc, monkeypatch, tmp_path):
    orthanc.env(monkeypatch)
    monkeypatch.setenv("CXRLABEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXRLABEL_PACS_BACKOFF", "0.01")
    monkeypatch.setenv("CXRLABEL_PACS_RETRIES", "2")
    return orthanc


def test_the_pacs_holds_the_shared_films_once_each(orthanc):
    assert len(orthanc.instances()) == len(shared_sops()) >= 3


def test_catalogue_from_a_pacs_reads_what_a_folder_load_reads(pacs_env, db_url, tmp_path):
    """Every instance once, with the header fields `catalogue load dicom` reads from the same
    film on disk; loading again adds nothing."""
    r = run(db_url, "catalogue", "load", "dicomweb", pacs_env.url, "--page-size", "2")
    assert r.exit_code == 0, r.output
    sops = shared_sops()
    assert f"{len(sops)} rows loaded" in r.output
    disk = f"sqlite:///{tmp_path / 'disk.db'}"
    assert run(disk, "catalogue", "load", "dicom", str(DICOM), "--uid-from", "sop").exit_code == 0
    fields = ("patient_id", "study_uid", "study_date", "modality", "view", "sex", "age", "width", "height",
              "photometric", "spacing_x", "spacing_y", "spacing_source", "accession")
    pacs_rows, disk_rows = ({row.uid: row for row in D.connect(u).connect().execute(select(D.images))}
                            for u in (db_url, disk))
    assert set(pacs_rows) == set(sops)
    for sop, row in pacs_rows.items():
        assert row.source == "pacs" and row.path.startswith("dicomweb+" + pacs_env.url)
        assert row.path.endswith(f"/instances/{sop}")
        assert {f: getattr(row, f) for f in fields} == {f: getattr(disk_rows[sop], f) for f in fields}
    again = run(db_url, "catalogue", "load", "dicomweb", pacs_env.url)
    assert "0 rows loaded" in again.output and f"{len(sops)} already in the catalogue" in again.output


def test_an_instance_catalogued_from_disk_stays_one_image(pacs_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "catalogue", "load", "dicom", str(DICOM)).exit_code == 0  # uids are file paths here
    before = {r.uid: r.path for r in D.connect(url).connect().execute(select(D.images))}
    r = run(url, "catalogue", "load", "dicomweb", pacs_env.url, "--source-name", "clinic_a")
    assert "0 rows loaded" in r.output and f"{len(shared_sops())} already in the catalogue" in r.output
    assert {r.uid: r.path for r in D.connect(url).connect().execute(select(D.images))} == before


def test_pixels_come_on_demand_decoded_as_from_disk(pacs_env, tmp_path):
    """collect fetches each instance as stored (its transfer syntax) and decodes it with the
    same code as the file: the same cache entry as one of the files holding that SOP."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run(url, "catalogue", "load", "dicomweb", pacs_env.url)
    r = run(url, "collect", "--all")
    sops = shared_sops()
    assert r.exit_code == 0 and f"{len(sops)} cached now" in r.output and "0 failed" in r.output
    assert_cached_as_from_files(D.connect(url), sops)
    assert not list((tmp_path / "cache").rglob("*.dcm"))  # the fetched DICOM is not kept beside the entry
    again = run(url, "collect", "--all")
    assert f"{len(sops)} already cached" in again.output
    labelled = run(url, "label", "--all", "--model", "default")
    assert labelled.exit_code == 0 and f"{len(sops)} labelled" in labelled.output


def test_one_failing_instance_is_one_failure(pacs_env, proxy, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "catalogue", "load", "dicomweb", proxy.url).exit_code == 0
    sops = sorted(shared_sops())
    proxy.fail_sop = sops[0]
    r = run(url, "collect", "--all")
    assert f"{len(sops) - 1} cached now" in r.output and "1 failed" in r.output
    eng = D.connect(url)
    with eng.connect() as conn:
        failures = conn.execute(select(D.failures.c.uid, D.failures.c.message)).all()
    assert [f.uid for f in failures] == [sops[0]] and "HTTP 500" in failures[0].message
    proxy.fail_sop = None
    assert "1 cached now" in run(url, "collect", "--all").output


def test_busy_answers_are_retried_and_a_stopped_server_stops_the_run(pacs_env, proxy, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    proxy.busy = 2  # two 503s with Retry-After: 0, then answers
    assert run(url, "catalogue", "load", "dicomweb", proxy.url).exit_code == 0
    assert proxy.requests[:3] == [proxy.requests[0]] * 3  # the same search, tried again
    sops = sorted(shared_sops())
    proxy.stop()  # the server goes away before the pixels are fetched
    r = run(url, "collect", "--all")
    assert r.exit_code != 0 and "after 3 tries" in r.output and "Traceback" not in r.output
    assert "the run stopped there" in r.output
    eng = D.connect(url)
    with eng.connect() as conn:
        assert conn.execute(select(D.images.c.uid)).scalars().all() == sops  # nothing stored is lost
        assert not conn.execute(select(D.failures)).all()  # not one failure per instance
    back = FaultProxy(proxy.target)  # the server back, on the same address
    back.server.server_close()
    back.server = http.server.ThreadingHTTPServer(("127.0.0.1", proxy.port), back.server.RequestHandlerClass)
    back.port = proxy.port
    threading.Thread(target=back.server.serve_forever, daemon=True).start()
    try:
        assert f"{len(sops)} cached now" in run(url, "collect", "--all").output
    finally:
        back.stop()


def test_a_server_that_ignores_the_offset_stops_the_load_instead_of_looping(pacs_env, proxy, tmp_path):
    proxy.ignore_offset = True
    url = f"sqlite:///{tmp_path / 'c.db'}"
    r = run(url, "catalogue", "load", "dicomweb", proxy.url, "--page-size", "1")
    assert r.exit_code == 1 and "ignores the QIDO offset" in r.output
    assert len([q for q in proxy.requests if "/instances?" in q]) <= 2 * 2  # per modality: two pages, no loop


def test_a_huge_search_answer_stops_the_load_before_it_fills_the_memory(pacs_env, proxy, tmp_path, monkeypatch):
    """A server that ignores the limit and sends far more than a page in one answer: the answer
    is read as it arrives and refused past CXRLABEL_PACS_MAX_ANSWER_MB, in one line; what an
    earlier load stored stays as it was."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "catalogue", "load", "dicomweb", proxy.url).exit_code == 0
    before = _catalogue_rows(url)
    proxy.huge = 2000
    monkeypatch.setenv("CXRLABEL_PACS_MAX_ANSWER_MB", "0.5")
    r = run(url, "catalogue", "load", "dicomweb", proxy.url)
    assert r.exit_code == 1 and "ran past 0.5 MB" in r.output and "CXRLABEL_PACS_MAX_ANSWER_MB" in r.output
    assert sum("ran past" in line for line in r.output.splitlines()) == 1 and "Traceback" not in r.output
    assert _catalogue_rows(url) == before
    # a limit the answer fits in: the rows repeated are one image each
    monkeypatch.setenv("CXRLABEL_PACS_MAX_ANSWER_MB", "64")
    assert run(url, "catalogue", "load", "dicomweb", proxy.url).exit_code == 0
    assert _catalogue_rows(url) == before


def _catalogue_rows(url: str) -> list:
    with D.connect(url).connect() as conn:
        return [tuple(r) for r in conn.execute(select(D.images.c.uid, D.images.c.path).order_by(D.images.c.uid))]


def test_credentials_never_stored_and_a_wrong_password_is_one_line(pacs_env, proxy, tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "catalogue", "load", "dicomweb", proxy.url).exit_code == 0
    run(url, "label", "--all", "--model", "default")
    dump = "\n".join(D.connect(url).raw_connection().iterdump()) + run(url, "status", "--json").output
    assert pacs_env.password not in dump and pacs_env.user not in dump
    monkeypatch.setenv("CXRLABEL_PACS_PASSWORD", "wrong")
    proxy.requests.clear()
    r = run(url, "catalogue", "load", "dicomweb", proxy.url)
    assert r.exit_code == 1 and "refused the credentials (401)" in r.output and "wrong" not in r.output
    assert len(proxy.requests) == 1  # never retried
    said = [line for line in r.output.splitlines() if line.strip() and "load dicom-web" not in line]  # bar aside
    assert len(said) == 1 and said[0].startswith("Error: ")


def test_urls_that_would_leak_or_travel_in_the_clear_are_refused():
    with pytest.raises(PacsError, match="user or password in it"):
        check_url("https://me:pw@pacs.example.org/dicom-web")
    with pytest.raises(PacsError, match="plain HTTP to another machine"):
        check_url("http://pacs.example.org/dicom-web", allow_http=False)
    assert check_url("http://pacs.example.org/dicom-web/", allow_http=True) == "http://pacs.example.org/dicom-web"
    assert check_url("http://127.0.0.1:8042/dicom-web") == "http://127.0.0.1:8042/dicom-web"
    assert check_url("http://[::1]:8042/dicom-web", allow_http=False).startswith("http://[::1]")


def test_multipart_answers_are_split_into_their_parts():
    body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\nONE\r\n--b1\r\nContent-Type: application/dicom\r\n\r\n"
            b"TWO\r\n--b1--\r\n")
    assert multipart_parts(body, 'multipart/related; type="application/dicom"; boundary=b1') == [b"ONE", b"TWO"]
    assert multipart_parts(b"junk", "application/json") == []


def test_search_pages_walk_the_whole_archive(pacs_env):
    with DicomWeb(pacs_env.url) as client:
        pages = list(client.search("instances", {}, page=1))
    assert [len(p) for p in pages] == [1] * len(shared_sops())


# ---------------------------------------------------------------- results back


@pytest.fixture
def labelled_from_pacs(pacs_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "catalogue", "load", "dicomweb", pacs_env.url).exit_code == 0
    assert run(url, "label", "--all", "--model", "default").exit_code == 0
    return url


def _sr_groups(ds) -> dict:
    """``{code meaning: (value, unit, line or None)}`` of a measurement report's groups."""
    out = {}

    def walk(items, line=None):
        for item in items:
            if item.ValueType == "SCOORD":
                line = np.array(item.GraphicData, float).reshape(-1, 2)
            if item.ValueType == "NUM":
                mv = item.MeasuredValueSequence[0]
                out[item.ConceptNameCodeSequence[0].CodeMeaning] = (
                    float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue,
                    item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
            if "ContentSequence" in item:
                walk(item.ContentSequence, line)
                for sub in item.ContentSequence:
                    if sub.ValueType == "SCOORD":
                        out.setdefault("lines", []).append(np.array(sub.GraphicData, float).reshape(-1, 2))
    walk(ds.ContentSequence)
    return out


def test_the_measurement_report_states_the_ctr_and_draws_the_widths(labelled_from_pacs, tmp_path, capfd):
    """export sr writes a TID 1500 report per film, its source header from the PACS: the CTR and
    the two widths (mm where calibrated) as labelled, each width a line on the source image as
    long as the width; it passes dciodvfy without an error."""
    import shutil
    import subprocess

    from pipeline.export.sr import CODES
    url = labelled_from_pacs
    r = run(url, "export", "sr", "--all", "--out", str(tmp_path / "sr"))
    assert r.exit_code == 0 and f"{len(shared_sops())} written" in r.output
    eng = D.connect(url)
    with eng.connect() as conn:
        meas = {m.uid: m for m in conn.execute(select(D.measurements))}
    for f in sorted((tmp_path / "sr").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        assert ds.Modality == "SR" and ds.Manufacturer == "cxrlabel"
        src_uid = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        m = meas[src_uid]
        got = _sr_groups(ds)
        assert got[CODES["ctr"][2]][0] == pytest.approx(m.ctr, abs=1e-6) and got[CODES["ctr"][2]][2] == "99CXRLABEL"
        heart, thorax = got[CODES["heart_width"][2]], got[CODES["thoracic_width"][2]]
        if m.heart_width_mm is not None:
            assert heart[:2] == (pytest.approx(m.heart_width_mm), "mm")
            assert thorax[:2] == (pytest.approx(m.thoracic_width_mm), "mm")
        else:
            assert heart[:2] == (m.heart_width_px, "{pixels}")
        spans = sorted(float(line[1, 0] - line[0, 0]) for line in got["lines"])
        assert spans == sorted([float(m.heart_width_px), float(m.thoracic_width_px)])
    if shutil.which("dciodvfy"):
        capfd.readouterr()
        for f in sorted((tmp_path / "sr").glob("*.dcm")):
            res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
            assert not [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")], f


def test_results_go_back_to_the_pacs_once_and_a_change_supersedes(labelled_from_pacs, pacs_env, tmp_path):
    import io
    import shutil
    import subprocess

    url = labelled_from_pacs
    n = len(shared_sops())
    for kind in ("seg", "sr"):
        r = run(url, "export", kind, "--all", "--to", pacs_env.url)
        assert r.exit_code == 0 and f"{n} written" in r.output, r.output
    with DicomWeb(pacs_env.url) as client:
        modalities = sorted(dicom_value for page in client.search("instances", {}) for row in page
                            if (dicom_value := (row.get("00080060", {}).get("Value") or [None])[0]))
    assert modalities.count("SEG") == n and modalities.count("SR") == n
    again = run(url, "export", "sr", "--all", "--to", pacs_env.url)
    assert "0 written" in again.output and f"{n} already there" in again.output
    # a corrected mask: a new report, naming the one it supersedes
    eng = D.connect(url)
    with eng.begin() as conn:
        row = conn.execute(select(D.masks).where(D.masks.c.structure == "heart", D.masks.c.kind == "predicted")
                           .order_by(D.masks.c.uid)).first()
        from pipeline.masks import decode, encode
        mask = decode(bytes(row.data), row.encoding, (row.height, row.width))
        mask[mask.shape[0] // 2, :5] = True
        conn.execute(D.masks.update().where(D.masks.c.uid == row.uid, D.masks.c.structure == "heart",
                                            D.masks.c.kind == "predicted").values(data=encode(mask), encoding="png"))
    changed = run(url, "export", "sr", "--all", "--to", pacs_env.url)
    assert "1 written" in changed.output and f"{n - 1} already there" in changed.output
    with eng.connect() as conn:
        pe = D.pacs_exports
        newest = conn.execute(select(pe).where(pe.c.uid == row.uid, pe.c.kind == "sr")
                              .order_by(pe.c.exported_at.desc())).all()
    assert len(newest) == 2 and newest[0].supersedes == newest[1].sop_uid
    with DicomWeb(pacs_env.url) as client:
        data = client.instance(f"{pacs_env.url}/studies/{newest[0].study_uid}/series/{newest[0].series_uid}"
                               f"/instances/{newest[0].sop_uid}")
    sr = pydicom.dcmread(io.BytesIO(data))
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == newest[1].sop_uid
    # ... and a new SEG, the next in its series, referencing the one it supersedes
    changed = run(url, "export", "seg", "--all", "--to", pacs_env.url)
    assert "1 written" in changed.output and f"{n - 1} already there" in changed.output
    with eng.connect() as conn:
        segs = conn.execute(select(pe).where(pe.c.uid == row.uid, pe.c.kind == "seg")
                            .order_by(pe.c.exported_at.desc())).all()
    assert len(segs) == 2 and segs[0].supersedes == segs[1].sop_uid and segs[0].series_uid == segs[1].series_uid
    with DicomWeb(pacs_env.url) as client:
        new, old = (pydicom.dcmread(io.BytesIO(client.instance(
            f"{pacs_env.url}/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"))) for s in segs)
    assert (old.InstanceNumber, new.InstanceNumber) == (1, 2) and new.ContentDescription.startswith("revision 2")
    referenced = {i.ReferencedSOPInstanceUID: i.ReferencedSOPClassUID
                  for series in new.ReferencedSeriesSequence for i in series.ReferencedInstanceSequence}
    assert referenced[old.SOPInstanceUID] == old.SOPClassUID
    assert old.SOPInstanceUID not in {i.ReferencedSOPInstanceUID for series in old.ReferencedSeriesSequence
                                      for i in series.ReferencedInstanceSequence}
    if shutil.which("dciodvfy"):
        new.save_as(tmp_path / "new.dcm", enforce_file_format=True)
        res = subprocess.run(["dciodvfy", str(tmp_path / "new.dcm")], capture_output=True, text=True)
        assert not [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def test_a_store_that_refuses_some_instances_is_counted_per_instance(labelled_from_pacs, pacs_env, proxy):
    proxy.refuse_first_store = True
    r = run(labelled_from_pacs, "export", "sr", "--all", "--to", proxy.url)
    n = len(shared_sops())
    assert r.exit_code == 0 and f"{n - 1} written" in r.output and "1 images skipped: the PACS refused it" in r.output
    proxy.refuse_first_store = False
    assert "1 written" in run(labelled_from_pacs, "export", "sr", "--all", "--to", proxy.url).output


def test_results_go_back_by_c_store_once(labelled_from_pacs, pacs_env, tmp_path):
    """export seg|sr --to dimse://HOST:PORT?called=AET: each object by C-STORE, in the PACS as
    stored (the same SOP Instance UIDs as the files export writes), recorded per destination,
    so a second export stores nothing; a destination without an AE title is one line."""
    url = labelled_from_pacs
    n = len(shared_sops())
    to = f"dimse://127.0.0.1:{pacs_env.dicom_port}?called={pacs_env.aet}"
    for kind in ("sr", "seg"):
        r = run(url, "export", kind, "--all", "--to", to)
        assert r.exit_code == 0 and f"{n} written" in r.output, r.output
        again = run(url, "export", kind, "--all", "--to", to)
        assert "0 written" in again.output and f"{n} already there" in again.output
    eng = D.connect(url)
    with eng.connect() as conn:
        pe = D.pacs_exports
        stored = conn.execute(select(pe.c.sop_uid, pe.c.kind).where(pe.c.destination.startswith("dimse://"))).all()
    assert len(stored) == 2 * n
    files = run(url, "export", "sr", "--all", "--out", str(tmp_path / "sr"))
    assert files.exit_code == 0
    written = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (tmp_path / "sr").glob("*.dcm")}
    assert written == {sop for sop, kind in stored if kind == "sr"}
    with DicomWeb(pacs_env.url) as client:
        held = {row["00080018"]["Value"][0] for page in client.search("instances", {"Modality": "SR"}) for row in page}
    assert written <= held
    bad = run(url, "export", "sr", "--all", "--to", f"dimse://127.0.0.1:{pacs_env.dicom_port}")
    assert bad.exit_code != 0 and "called=AET" in bad.output and "Traceback" not in bad.output


# ---------------------------------------------------------------- the DICOM network services


def test_catalogue_and_pixels_over_dimse(pacs_env, tmp_path):
    """C-FIND study by study, series by series; C-GET each instance as stored (JPEG 2000 among
    them): the same cache entries as from the files; loading again adds nothing."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    address = f"127.0.0.1:{pacs_env.dicom_port}"
    r = run(url, "catalogue", "load", "dimse", address, "--called-aet", pacs_env.aet, "--source-name", "clinic_b")
    sops = shared_sops()
    assert r.exit_code == 0 and f"{len(sops)} rows loaded" in r.output, r.output
    eng = D.connect(url)
    with eng.connect() as conn:
        rows = {row.uid: row for row in conn.execute(select(D.images))}
    assert set(rows) == set(sops)
    for sop, row in rows.items():
        assert row.source == "clinic_b" and row.path.startswith(f"dimse://{address}/") and sop in row.path
        first = pydicom.dcmread(sops[sop][0], stop_before_pixels=True)
        assert (row.modality, row.width, row.patient_id) == (first.Modality, first.Columns, first.PatientID)
    assert "0 rows loaded" in run(url, "catalogue", "load", "dimse", address, "--called-aet", pacs_env.aet).output
    got = run(url, "collect", "--all")
    assert f"{len(sops)} cached now" in got.output and "0 failed" in got.output, got.output
    assert_cached_as_from_files(eng, sops)


def test_pixels_by_c_move_to_our_own_storage_scp(pacs_env, tmp_path):
    """An archive that allows only C-MOVE: each instance is sent to our storage SCP on the port
    the PACS knows for our AE title, started for it and stopped after; decoded as from the
    files. The port is free again afterwards; a port that is taken fails each instance in one
    line, and a later run fetches them."""
    import socket
    url = f"sqlite:///{tmp_path / 'c.db'}"
    address = f"127.0.0.1:{pacs_env.dicom_port}"
    r = run(url, "catalogue", "load", "dimse", address, "--called-aet", pacs_env.aet,
            "--move-port", str(pacs_env.move_port))
    sops = shared_sops()
    assert r.exit_code == 0 and f"{len(sops)} rows loaded" in r.output, r.output
    eng = D.connect(url)
    with eng.connect() as conn:
        assert all(f"&move={pacs_env.move_port}" in p for (p,) in conn.execute(select(D.images.c.path)))
    with socket.socket() as taken:  # another program holds the port (an earlier test's closed
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections may linger there)
        taken.bind(("", pacs_env.move_port))
        taken.listen()
        busy = run(url, "collect", "--all", "--workers", "1")
        assert f"cannot listen on port {pacs_env.move_port}" in busy.output, busy.output
    got = run(url, "collect", "--all")
    assert f"{len(sops)} cached now" in got.output and "0 failed" in got.output, got.output
    assert_cached_as_from_files(eng, sops)
    with socket.socket() as again:  # our storage SCP is gone (its closed connections may linger)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("", pacs_env.move_port))
        again.listen()


def test_a_dimse_pacs_that_is_not_there_is_one_line(pacs_env, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    url = f"sqlite:///{tmp_path / 'c.db'}"
    r = run(url, "catalogue", "load", "dimse", f"127.0.0.1:{port}", "--called-aet", "NOBODY")
    assert r.exit_code == 1 and "no association after 3 tries" in r.output and "Traceback" not in r.output
    assert "ERROR" not in r.output  # pynetdicom's own log stays off the terminal
    r = run(url, "catalogue", "load", "dimse", "pacs-without-port", "--called-aet", "X")
    assert r.exit_code == 1 and "HOST:PORT" in r.output

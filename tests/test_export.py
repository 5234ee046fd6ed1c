import csv
import os
import shutil

import cv2
import numpy as np
import pytest
from sqlalchemy import text

from pipeline import catalogue as C
from pipeline import db as D
from pipeline import review as R
from pipeline.export import ExportError, export, safe_name
from pipeline.groups import select_images
from pipeline.masks import STRUCTURES, EncodedMask, load_masks, mask_row
from tests.conftest import DICOM
from tests.test_review import pretend_labelled


def chexmask_decode(rle: str, height: int, width: int) -> np.ndarray:
    """CheXmask's reading of a run-length string, written from their published description:
    row-major, 1-based starts, "start length" pairs; an empty string is an empty mask."""
    mask = np.zeros(height * width, np.uint8)
    values = [int(v) for v in rle.split()]
    for start, length in zip(values[::2], values[1::2], strict=True):
        mask[start - 1:start - 1 + length] = 1
    return mask.reshape(height, width).astype(bool)


def _selection(engine, model="default"):
    with engine.connect() as c:
        return select_images(c, all_images=True, labelled_by=model)


@pytest.fixture
def labelled(annotated_engine):
    return annotated_engine, pretend_labelled(annotated_engine, 4, model="default")


def test_rle_export_reads_as_chexmask_and_resumes(labelled, tmp_path):
    engine, uids = labelled
    out = tmp_path / "masks.csv"
    s = export(engine, "rle", out, _selection(engine), progress=False)
    assert (s.written, s.kept) == (4, 0)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    with engine.connect() as c:
        truth = load_masks(c, uids, kind="predicted", model="default")
    assert [r["Image ID"] for r in rows] == uids
    for r in rows:
        h, w = int(r["Height"]), int(r["Width"])
        for s_name, column in (("left_lung", "Left Lung"), ("right_lung", "Right Lung"), ("heart", "Heart")):
            assert np.array_equal(chexmask_decode(r[column], h, w), truth[r["Image ID"]][s_name])
        assert 0.3 < float(r["CTR"]) < 0.8 and r["Model"] == "default" and r["Masks"] == "model"
    # again: nothing to write; after a correction (a reviewed export), only that row changes
    s = export(engine, "rle", out, _selection(engine), progress=False)
    assert (s.written, s.kept) == (0, 4)
    view = R.image_view(engine, uids[1], "default")
    shrunk = [[[x, y + 5] for x, y in view["polygons"]["heart"][0]]]
    R.save(engine, uids[1], "default", "dr. c", 0, "corrected", polygons={"heart": shrunk})
    R.save(engine, uids[0], "default", "dr. c", 0, "accepted")
    reviewed = tmp_path / "reviewed.csv"
    s = export(engine, "rle", reviewed, _selection(engine), reviewed=True, progress=False)
    assert s.written == 2 and s.skipped == {"not reviewed": 2}
    with open(reviewed, newline="") as f:
        rows = {r["Image ID"]: r for r in csv.DictReader(f)}
    with engine.connect() as c:
        person = load_masks(c, [uids[1]], kind="reviewed", model="default")[uids[1]]["heart"]
    assert np.array_equal(chexmask_decode(rows[uids[1]]["Heart"], *person.shape), person)
    assert rows[uids[1]]["Masks"] == "reviewed"


def test_rejected_masks_stay_out_unless_asked(labelled, tmp_path):
    engine, uids = labelled
    R.save(engine, uids[0], "default", "a", 0, "rejected")
    R.save(engine, uids[1], "default", "a", 0, "rejected", structure="heart")
    s = export(engine, "rle", tmp_path / "a.csv", _selection(engine), progress=False)
    assert s.rejected == 4 and s.written == 3  # the whole of uids[0], and uids[1]'s heart
    with open(tmp_path / "a.csv", newline="") as f:
        rows = {r["Image ID"]: r for r in csv.DictReader(f)}
    assert uids[0] not in rows and rows[uids[1]]["Heart"] == "" and rows[uids[1]]["Left Lung"]
    s = export(engine, "rle", tmp_path / "b.csv", _selection(engine), include_rejected=True, progress=False)
    assert s.rejected == 0 and s.written == 4


def test_png_export_is_one_bit_per_structure_in_original_geometry(labelled, tmp_path):
    engine, uids = labelled
    s = export(engine, "png", tmp_path / "png", _selection(engine), progress=False)
    assert (s.written, s.kept) == (12, 0)
    with engine.connect() as c:
        truth = load_masks(c, uids, kind="predicted", model="default")
    with open(tmp_path / "png" / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == 12
    for row in index:
        img = cv2.imread(str(tmp_path / "png" / row["file"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(img > 0, truth[row["uid"]][row["structure"]])
        assert int(row["area"]) == int(truth[row["uid"]][row["structure"]].sum())
    from PIL import Image
    assert Image.open(tmp_path / "png" / index[0]["file"]).mode == "1"
    s = export(engine, "png", tmp_path / "png", _selection(engine), progress=False)
    assert (s.written, s.kept) == (0, 12)
    # a file damaged on disk is written again
    (tmp_path / "png" / index[0]["file"]).write_bytes(b"broken")
    assert export(engine, "png", tmp_path / "png", _selection(engine), progress=False).written == 1


def _labelled_dicoms(engine, src, extra_png: bool = False, rng=None) -> dict[str, dict[str, np.ndarray]]:
    """The shared data's two chest DICOMs (one of them with PatientAge '62') catalogued from
    ``src`` and 'labelled' by model default with an ellipse per structure (turned at random
    with ``rng``); with ``extra_png`` also a row that comes from no DICOM. Returns the masks."""
    src.mkdir()
    for name in ("cr_chest_pa_jpeg_baseline.dcm", "RG1_UNCR.dcm"):
        shutil.copy(DICOM / name, src / name)
    C.load_dicom(engine, src, workers=1, progress=False)
    with engine.begin() as c:
        if extra_png:
            c.execute(text("INSERT INTO images (uid, source, path, loaded_at) VALUES ('png-one', 'csv', '/x.png', "
                           "'2026-01-01')"))
        rows = c.execute(text("SELECT uid, width, height FROM images")).all()
    truth = {}
    with engine.begin() as c:
        for uid, w, h in rows:
            w, h = w or 64, h or 64
            masks = {}
            for k, s in enumerate(STRUCTURES):
                m = np.zeros((h, w), np.uint8)
                cv2.ellipse(m, (int(w * (0.3 + 0.2 * k)), h // 2), (w // 8, h // 5),
                            float(rng.uniform(0, 90)) if rng is not None else 0.0, 0, 360, 1, -1)
                masks[s] = m.astype(bool)
            truth[uid] = masks
            D.upsert(c, D.masks, [mask_row(uid, s, EncodedMask.of(m, "rle"), kind="predicted", model="default")
                                  for s, m in masks.items()], ("uid", "structure", "kind", "model"))
            c.execute(D.measurements.insert().values(uid=uid, model="default", labelled_at=D.utcnow(), ctr=0.5))
    return truth


def test_seg_export_round_trips_through_highdicom(engine, tmp_path):
    import highdicom as hd
    import pydicom
    truth = _labelled_dicoms(engine, tmp_path / "dicom", extra_png=True, rng=np.random.default_rng(0))
    s = export(engine, "seg", tmp_path / "seg", _selection(engine), progress=False)
    assert s.written == 2 and s.skipped == {"not from a DICOM file (seg and sr need the source DICOM)": 1}
    with engine.connect() as c:
        dicom_rows = c.execute(text("SELECT uid, sop_uid, study_uid FROM images WHERE sop_uid IS NOT NULL")).all()
    for uid, sop, study in dicom_rows:
        seg = hd.seg.segread(tmp_path / "seg" / f"{safe_name(uid)}.dcm")
        assert seg.StudyInstanceUID == study
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == sop
        labels = [d.SegmentLabel for d in seg.SegmentSequence]
        assert labels == ["Heart", "Left lung", "Right lung"]
        assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == \
            "cxrlabel default"
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[sop], segment_numbers=[1, 2, 3])
        for k, structure in enumerate(STRUCTURES):
            assert np.array_equal(pixels[0, :, :, k].astype(bool), truth[uid][structure])
        assert pydicom.dcmread(tmp_path / "seg" / f"{safe_name(uid)}.dcm").Modality == "SEG"
    s = export(engine, "seg", tmp_path / "seg", _selection(engine), progress=False)
    assert (s.written, s.kept) == (0, 2)
    # a reviewer corrects one image's heart: the reviewed export says who drew what
    uid, sop, _ = dicom_rows[0]
    view = R.image_view(engine, uid, "default")
    R.save(engine, uid, "default", "Ivanova Anna", 0, "corrected", polygons={"heart": view["polygons"]["heart"]})
    s = export(engine, "seg", tmp_path / "reviewed", _selection(engine), reviewed=True, progress=False)
    assert s.written == 1 and s.skipped["not reviewed"] == 2
    seg = hd.seg.segread(tmp_path / "reviewed" / f"{safe_name(uid)}.dcm")
    kinds = [d.SegmentAlgorithmType for d in seg.SegmentSequence]
    assert kinds == ["MANUAL", "AUTOMATIC", "AUTOMATIC"] and "Ivanova" in str(seg.ContentCreatorName)


def test_export_errors_name_the_next_step(labelled, tmp_path):
    engine, _ = labelled
    with pytest.raises(ExportError, match="is a folder"):
        export(engine, "rle", tmp_path, _selection(engine), progress=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export(engine, "png", tmp_path / "f", _selection(engine), progress=False)
    from pipeline.groups import GroupsError
    with pytest.raises(GroupsError, match="no model with labels named 'nobody': there are default"):
        _selection(engine, "nobody")


def test_safe_names_never_collide():
    assert safe_name("abc.png") == "abc.png"
    assert safe_name("a/b") != safe_name("a_b") and "/" not in safe_name("a/b")
    assert safe_name("../../etc") != ".._.._etc" and not safe_name("../../etc").startswith(".")


def test_two_exports_to_one_file_at_once_leave_it_whole(labelled, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    engine, uids = labelled
    out = tmp_path / "masks.csv"
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: export(engine, "rle", out, _selection(engine), progress=False), range(2)))
    assert all(s.written + s.kept == 4 for s in done)
    with open(out, newline="") as f:
        assert [r["Image ID"] for r in csv.DictReader(f)] == uids
    assert not list(tmp_path.glob("*.partial"))


def test_a_model_whose_heart_is_the_cardiomediastinum_exports_it_under_that_name(labelled, tmp_path):
    """Masks by a model trained before 2026-12-05 (its label runs say so) never reach a
    CheXmask `Heart` column, a `heart.png` or a SEG segment called Heart."""
    engine, uids = labelled
    with engine.begin() as c:
        c.execute(D.label_runs.insert().values(model="default", selection="all", started_at=D.utcnow(),
                                               status="done", heart_definition="cardiomediastinum"))
    export(engine, "rle", tmp_path / "m.csv", _selection(engine), progress=False)
    with open(tmp_path / "m.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "Cardiomediastinum" in header and "Heart" not in header
    export(engine, "png", tmp_path / "png", _selection(engine), progress=False)
    assert (tmp_path / "png" / safe_name(uids[0]) / "cardiomediastinum.png").exists()
    assert not list((tmp_path / "png").rglob("heart.png"))
    # the same CSV again: recognised as ours, rows kept
    assert export(engine, "rle", tmp_path / "m.csv", _selection(engine), progress=False).kept == 4


def test_uids_that_read_as_spreadsheet_formulas_are_written_as_text(sqlite_engine, tmp_path):
    """A uid that starts as a formula (=, +, -, @) is the first cell of every export row: it
    is written with a leading apostrophe (OWASP's guidance on CSV injection), in the RLE CSV
    and png's index.csv, and a second export still finds the rows it wrote unchanged."""
    from tests.test_security import _one_labelled_image

    hostile = ['=HYPERLINK("http://x")', "+1", "@SUM(A1)", "-2", "plain"]
    for uid in hostile:
        _one_labelled_image(sqlite_engine, uid)
    out = tmp_path / "masks.csv"
    export(sqlite_engine, "rle", out, _selection(sqlite_engine, "m"), model="m", progress=False)
    with open(out, newline="") as f:
        first = [r["Image ID"] for r in csv.DictReader(f)]
    assert sorted(first) == sorted(["'" + u for u in hostile[:4]] + ["plain"])
    assert export(sqlite_engine, "rle", out, _selection(sqlite_engine, "m"), model="m", progress=False).kept == 5
    export(sqlite_engine, "png", tmp_path / "png", _selection(sqlite_engine, "m"), model="m", progress=False)
    with open(tmp_path / "png" / "index.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert {r[0] for r in rows} == set(first)
    assert not any(c.startswith(("=", "+", "-", "@")) for r in rows for c in r)


def test_png_export_never_follows_a_link_out_of_its_folder_and_a_long_uid_is_one_name(sqlite_engine, tmp_path):
    """A per-uid folder replaced by a link to another place is that image's failure, and the
    file there is never written; a uid of 251 characters gets a shortened name instead of
    stopping the export with "File name too long"."""
    from tests.test_security import _one_labelled_image

    long_uid = "x" * 251
    for uid in ("a1", "b2", long_uid):
        _one_labelled_image(sqlite_engine, uid)
    out = tmp_path / "png"
    s = export(sqlite_engine, "png", out, _selection(sqlite_engine, "m"), model="m", progress=False)
    assert s.written == 9 and not s.skipped
    assert len(safe_name(long_uid)) < 255 and (out / safe_name(long_uid) / "heart.png").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "heart.png").write_text("a thesis chapter")
    shutil.rmtree(out / "a1")
    (out / "a1").symlink_to(elsewhere, target_is_directory=True)
    with sqlite_engine.begin() as c:  # a changed mask, so the export writes again
        c.execute(text("UPDATE masks SET data = (SELECT data FROM masks WHERE uid = 'b2' AND structure = 'left_lung') "
                       "WHERE uid = 'a1' AND structure = 'heart'"))
    s = export(sqlite_engine, "png", out, _selection(sqlite_engine, "m"), model="m", progress=False)
    assert sum(s.skipped.values()) == 1
    assert (elsewhere / "heart.png").read_text() == "a thesis chapter"
    assert sorted(os.listdir(elsewhere)) == ["heart.png"]


def test_seg_passes_dicom3tools_dciodvfy_and_prints_no_patient_name(engine, tmp_path, capfd):
    """Every SEG we write passes dciodvfy (dicom3tools) without an error: Patient Orientation
    (Type 2C for projection radiographs) is there, and a source's PatientAge "62" is written
    "062Y"; highdicom's warnings, which quote the patient's name, never reach the terminal."""
    import os
    import subprocess

    if shutil.which("dciodvfy") is None:
        if os.environ.get("CXRLABEL_REQUIRE_DCIODVFY"):
            pytest.fail("dciodvfy (Debian's dicom3tools) is required here but not installed")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    import pydicom
    src = tmp_path / "dicom"
    _labelled_dicoms(engine, src)
    capfd.readouterr()
    assert export(engine, "seg", tmp_path / "seg", _selection(engine), progress=False).written == 2
    said = capfd.readouterr()
    names = {str(pydicom.dcmread(src / n, stop_before_pixels=True).get("PatientName", "")) for n in os.listdir(src)}
    assert not any(n and n in said.out + said.err for n in names), said
    for seg in sorted((tmp_path / "seg").glob("*.dcm")):
        out = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True)
        errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
        assert errors == [], (seg.name, errors)
    ages = {str(pydicom.dcmread(p).get("PatientAge", "")) for p in (tmp_path / "seg").glob("*.dcm")}
    assert "062Y" in ages

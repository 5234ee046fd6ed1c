import gzip

import pytest
from sqlalchemy import func, select, text

from pipeline import catalogue as C
from pipeline import db as D
from tests.conftest import DICOM, NIH_CSV, OPENI


def nih_slice(tmp_path, n=300, extra: list[bytes] = ()):
    """The first n rows of the real NIH CSV, plus extra raw lines, gzipped."""
    with gzip.open(NIH_CSV, "rb") as f:
        lines = [next(f) for _ in range(n + 1)]
    path = tmp_path / "nih.csv.gz"
    with gzip.open(path, "wb") as f:
        f.writelines(lines + list(extra))
    return path


def count(engine, table):
    with engine.connect() as c:
        return c.execute(select(func.count()).select_from(table)).scalar()


def test_nih_load_and_idempotent_reload(engine, tmp_path):
    path = nih_slice(tmp_path)
    s = C.load_nih(engine, path, progress=False)
    assert s.loaded == 300 and s.errors == 0
    with engine.connect() as c:
        row = c.execute(text("SELECT * FROM catalogue WHERE uid = '00000001_000'")).mappings().one()
    assert (row["patient_id"], row["age"], row["sex"], row["view"]) == ("1", 57, "M", "PA")
    assert row["text"] == "Cardiomegaly" and row["group_name"] is None and row["source"] == "nih"
    C.load_nih(engine, path, progress=False)
    assert count(engine, D.images) == 300


def test_reload_updates_changed_rows(engine, tmp_path):
    C.load_nih(engine, nih_slice(tmp_path), progress=False)
    changed = tmp_path / "changed.csv"
    with gzip.open(NIH_CSV, "rt") as f:
        header, first = next(f), next(f)
    changed.write_text(header + first.replace(",57,M,", ",58,M,"))
    C.load_nih(engine, changed, progress=False)
    with engine.connect() as c:
        assert c.execute(text("SELECT age FROM images WHERE uid='00000001_000'")).scalar() == 58
    assert count(engine, D.images) == 300


@pytest.mark.parametrize("line, reason", [
    (b",Cardiomegaly,0,9,50,M,PA,2500,2048,0.14,0.14\n", "missing uid"),
    (b"x1.png,No Finding,0,9,fifty,M,PA,2500,2048,0.14,0.14\n", "unparseable age"),
    (b"x2.png,No Finding,0,9,414,M,PA,2500,2048,0.14,0.14\n", "impossible age"),
    (b"x3.png,No Finding,0,9,50,M,PA,2500\n", "wrong column count"),
    (b"x4.png,No Finding \xff\xfe,0,9,50,M,PA,2500,2048,0.14,0.14\n", "bad encoding"),
    (b"x5.png,No Finding,0,9,50,Q,PA,2500,2048,0.14,0.14\n", "unknown sex"),
])
def test_malformed_rows_go_to_load_errors(engine, tmp_path, line, reason):
    path = nih_slice(tmp_path, 20, [line, b"ok1.png,No Finding,0,9,50,F,AP,2500,2048,0.14,0.14\n"])
    s = C.load_nih(engine, path, progress=False)
    assert s.loaded == 21 and s.errors == 1
    with engine.connect() as c:
        err = c.execute(select(D.load_errors)).mappings().one()
    assert err["reason"].startswith(reason) and err["line"] == 22
    assert err["source_file"] == str(path)


def test_duplicate_uid_in_one_file_is_reported(engine, tmp_path):
    row = b"dup.png,No Finding,0,9,50,M,PA,2500,2048,0.14,0.14\n"
    s = C.load_nih(engine, nih_slice(tmp_path, 5, [row, row]), progress=False)
    assert s.loaded == 6 and s.errors == 1 and "duplicate uid" in next(iter(s.reasons))


def test_wrong_format_fails_before_writing(engine, tmp_path):
    C.load_nih(engine, nih_slice(tmp_path, 10), progress=False)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(C.CatalogueError, match="not an NIH Data_Entry CSV"):
        C.load_nih(engine, other, progress=False)
    with pytest.raises(C.CatalogueError, match="not a tar archive"):
        C.load_openi(engine, other, progress=False)
    with pytest.raises(C.CatalogueError, match="no DICOM files"):
        C.load_dicom(engine, tmp_path, progress=False)
    assert count(engine, D.images) == 10 and count(engine, D.load_errors) == 0


def test_dicom_headers(engine):
    s = C.load_dicom(engine, DICOM, workers=2, progress=False)
    assert s.loaded == 6 and s.errors == 0
    with engine.connect() as c:
        r = c.execute(select(D.images).where(D.images.c.uid == "cr_chest_pa_jpeg_baseline")).mappings().one()
        rg = c.execute(select(D.images).where(D.images.c.uid == "RG1_UNCR")).mappings().one()
    assert (r["modality"], r["view"], r["body_part"], r["height"], r["width"]) == ("CR", "PA", "CHEST", 1024, 1024)
    assert r["spacing_x"] == pytest.approx(0.168) and r["photometric"] == "MONOCHROME2"
    assert rg["photometric"] == "MONOCHROME1" and rg["spacing_x"] is None  # 0.000 means unknown
    assert (rg["height"], rg["width"]) == (1955, 1841)


def test_a_damaged_dicom_element_is_one_problem_not_a_stop(engine, tmp_path):
    """pydicom parses an element when it is first read: Rows with a value representation it
    does not know (found by the decoder's fuzz test) is a load error and a decode error naming
    the file, and the good files beside it load."""
    from pipeline.imaging import DecodeError, decode
    data = (DICOM / "RG1_UNCR.dcm").read_bytes()
    rows = data.find(b"\x28\x00\x10\x00US")
    assert rows > 0
    (tmp_path / "damaged.dcm").write_bytes(data[:rows + 4] + b"U\x00" + data[rows + 6:])
    (tmp_path / "good.dcm").write_bytes(data)
    s = C.load_dicom(engine, tmp_path, workers=1, progress=False)
    assert (s.loaded, s.errors) == (1, 1)
    with engine.connect() as c:
        (reason,) = c.execute(select(D.load_errors.c.reason)).scalars().all()
    assert reason.startswith("damaged: ") and "Value Representation" in reason and "\n" not in reason
    with pytest.raises(DecodeError, match="damaged.dcm: a damaged DICOM element"):
        decode(tmp_path / "damaged.dcm", target=64)


def test_dicom_uid_from_sop_reports_repeated_instances(engine):
    s = C.load_dicom(engine, DICOM, workers=1, uid_from="sop", progress=False)
    assert s.loaded == 4 and s.errors == 2
    with engine.connect() as c:
        reasons = c.execute(select(D.load_errors.c.reason)).scalars().all()
    assert all("duplicate SOP Instance UID" in r for r in reasons)


def test_dicom_text_joined_from_csv(engine, tmp_path):
    reports = tmp_path / "reports.csv"
    reports.write_text("File,Conclusion\ncr_chest_pa_jpeg_baseline,Кардиомегалия\n", encoding="utf-8")
    C.load_dicom(engine, DICOM, workers=1, text_csv=reports, text_key="uid",
                 key_column="File", text_column="Conclusion", progress=False)
    with engine.connect() as c:
        assert c.execute(text("SELECT text FROM images WHERE uid='cr_chest_pa_jpeg_baseline'")
                         ).scalar() == "Кардиомегалия"


def test_openi_reports(engine):
    s = C.load_openi(engine, OPENI, progress=False)
    assert s.loaded > 7000  # one row per parent image (frontal and lateral)
    with engine.connect() as c:
        r = c.execute(select(D.images).where(D.images.c.uid == "CXR1_1_IM-0001-3001")).mappings().one()
    assert r["text"].startswith("The cardiac silhouette and mediastinum size are within normal")
    assert r["text"].endswith("Normal chest x-XXXX.") and r["reference"] == "normal"
    assert r["patient_id"] == "CXR1"


def test_clinic_csv_with_mapping_and_cp1251(engine, tmp_path):
    path = tmp_path / "clinic.csv"
    path.write_bytes(("Снимок;Заключение;Возраст;Пол;Дата\n"
                      "a1;Кардиомегалия;058Y;М;01.02.2020\n"
                      "a2;Норма;45;Ж;2020-03-04\n"
                      "a3;Норма;45;Ж;31.02.2020\n").encode("cp1251"))
    mapping = C.parse_mapping(["uid=Снимок", "text=Заключение", "age=Возраст", "sex=Пол",
                               "study_date=Дата"])
    s = C.load_csv(engine, path, mapping, encoding="cp1251", delimiter=";", progress=False)
    assert s.loaded == 2 and s.errors == 1 and "unparseable date" in next(iter(s.reasons))
    with engine.connect() as c:
        rows = c.execute(text("SELECT uid, age, sex, study_date, text FROM catalogue ORDER BY uid")).all()
    assert [tuple(r) for r in rows] == [("a1", 58, "M", "2020-02-01", "Кардиомегалия"),
                                        ("a2", 45, "F", "2020-03-04", "Норма")]


def test_csv_mapping_errors(engine, tmp_path):
    with pytest.raises(C.CatalogueError, match="uid=COLUMN is required"):
        C.parse_mapping(["text=Report"])
    with pytest.raises(C.CatalogueError, match="unknown field"):
        C.parse_mapping(["uid=A", "diagnosis=B"])
    path = tmp_path / "c.csv"
    path.write_text("A,B\n1,2\n")
    with pytest.raises(C.CatalogueError, match=r"columns \['Report'\] not in the header"):
        C.load_csv(engine, path, C.parse_mapping(["uid=A", "text=Report"]), progress=False)


@pytest.mark.parametrize("value, years", [("58", 58), ("058Y", 58), ("006M", 0), ("030M", 2),
                                          ("10D", 0), (" 7 ", 7), ("", None)])
def test_parse_age(value, years):
    assert C.parse_age(value) == years


def test_reroot_moves_whole_folders_and_keeps_separators(tmp_path):
    engine = D.connect(f"sqlite:///{tmp_path / 'c.db'}")
    with engine.begin() as c:
        c.execute(D.images.insert(), [{"uid": u, "source": "t", "path": p, "loaded_at": D.utcnow()}
                                      for u, p in (("a", "/data/x/a.png"), ("b", "/data/xy/b.png"))])
    with pytest.raises(C.CatalogueError, match="nothing changed; check NEW_PREFIX"):
        C.reroot(engine, "/data/x/", "/new", progress=False)  # no file there: refused unless forced
    assert C.reroot(engine, "/data/x/", "/new", progress=False, force=True).changed == 1  # not /data/xy
    assert C.reroot(engine, "/", "/root2", progress=False, force=True).changed == 2  # the root folder itself
    with engine.connect() as c:
        assert dict(c.execute(select(D.images.c.uid, D.images.c.path)).all()) == {
            "a": "/root2/new/a.png", "b": "/root2/data/xy/b.png"}
    with pytest.raises(C.CatalogueError, match="OLD_PREFIX is empty"):
        C.reroot(engine, "", "/x")

"""Millimetres: the pixel spacing that belongs to the pixels decoded, and which calibration it is."""

import json

import pydicom
import pytest
from click.testing import CliRunner

from pipeline.catalogue import dicom_spacing
from pipeline.cli import cli
from pipeline.measure import calibrate
from tests.conftest import DICOM, NIH_PNG
from tests.test_catalogue import nih_slice


def test_calibrate_scales_a_resized_copy_and_refuses_what_cannot_be_a_chest_film():
    assert calibrate((0.2, 0.2), "PixelSpacing", (1800, 1800), (1800, 1800)) == ((0.2, 0.2), "PixelSpacing")
    (sx, sy), what = calibrate((0.143, 0.143), "OriginalImagePixelSpacing", (2682, 2749), (512, 512))
    assert sx == pytest.approx(0.143 * 2682 / 512) and sy == pytest.approx(0.143 * 2749 / 512)
    assert what.startswith("OriginalImagePixelSpacing, scaled x5.24 across, x5.37 down to the file")
    assert calibrate((0.0, 0.0), "PixelSpacing", (10, 10), (10, 10)) == ((None, None), "none: no pixel spacing")
    assert calibrate((None, None), "none: PixelSpacing is 0", (10, 10), (10, 10))[1] == "none: PixelSpacing is 0"
    none, why = calibrate((0.143, 0.143), None, (None, None), (512, 512))  # NIH's spacing on its resized file
    assert none == (None, None) and why.startswith("none: the catalogue's spacing makes the film 73 mm wide")


def _made(tmp_path, name: str, **tags) -> None:
    """The shared 1024 px chest DICOM with other spacing tags (no PixelSpacing unless given)."""
    ds = pydicom.dcmread(DICOM / "cr_chest_pa_jpeg_baseline.dcm")
    del ds.PixelSpacing
    for tag, value in tags.items():
        setattr(ds, tag, value)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "films" / f"{name}.dcm")


def test_widths_in_millimetres_follow_the_spacing_each_dicom_states(tmp_path):
    (tmp_path / "films").mkdir()
    _made(tmp_path, "pixel", PixelSpacing=[0.35, 0.35])
    _made(tmp_path, "imager", ImagerPixelSpacing=[0.4, 0.4], EstimatedRadiographicMagnificationFactor=1.25)
    _made(tmp_path, "detector", ImagerPixelSpacing=[0.35, 0.35])
    _made(tmp_path, "zero", PixelSpacing=[0, 0])
    _made(tmp_path, "huge", PixelSpacing=[5.0, 5.0])  # a film 5 m wide: a wrong calibration
    assert dicom_spacing(pydicom.dcmread(tmp_path / "films" / "imager.dcm"))[0] == pytest.approx((0.32, 0.32))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run = lambda *a: CliRunner().invoke(cli, ["--db", url, *a])  # noqa: E731
    assert run("catalogue", "load", "dicom", str(tmp_path / "films"), "--workers", "1").exit_code == 0
    r = run("label", "--all", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert r.exit_code == 0, r.output
    rows = {row["uid"]: row for row in json.loads(run(
        "query", "SELECT uid, heart_width_px, heart_width_mm, thoracic_width_mm, mm_calibration FROM label_results",
        "--json").output)}
    expected = {"pixel": (0.35, "PixelSpacing"), "imager": (0.32, "ImagerPixelSpacing / magnification 1.25"),
                "detector": (0.35, "ImagerPixelSpacing (at the detector: magnified)")}
    for uid, (mm, what) in expected.items():
        assert rows[uid]["heart_width_mm"] == pytest.approx(rows[uid]["heart_width_px"] * mm), uid
        assert rows[uid]["mm_calibration"] == what
    assert rows["zero"]["heart_width_mm"] is None and rows["zero"]["mm_calibration"] == "none: PixelSpacing is 0"
    assert rows["huge"]["thoracic_width_mm"] is None and "makes the film 5120 mm wide" in rows["huge"]["mm_calibration"]


def test_nih_spacing_of_the_original_is_scaled_to_the_resized_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run = lambda *a: CliRunner().invoke(cli, ["--db", url, *a])  # noqa: E731
    assert run("catalogue", "load", "nih", str(nih_slice(tmp_path, 3)), "--image-root", str(NIH_PNG)).exit_code == 0
    r = run("label", "--all", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert r.exit_code == 3  # two of the three rows have no file here
    (row,) = json.loads(run("query", "SELECT uid, thoracic_width_px, thoracic_width_mm, mm_calibration "
                                     "FROM label_results", "--json").output)
    assert row["uid"] == "00000001_000"
    assert row["mm_calibration"] == ("OriginalImagePixelSpacing, scaled x5.24 across, x5.37 down to the file "
                                     "(2682x2749 -> 512x512 px)")
    assert row["thoracic_width_mm"] == pytest.approx(row["thoracic_width_px"] * 0.143 * 2682 / 512)
    assert 220 < row["thoracic_width_mm"] < 400  # an adult thorax (it was 62 mm before)


def test_widths_no_patient_of_that_age_can_have_are_withheld_with_the_reason(tmp_path):
    """cr_chest_pa_jpeg_baseline (PatientAge 62) read a thorax of 134 mm from its own
    PixelSpacing: no adult's is that narrow, so its millimetres are withheld and
    mm_calibration says why; the same film of a four-year-old keeps them."""
    from pipeline.measure import plausible_mm, thorax_bounds
    assert thorax_bounds(None)[:2] == (80.0, 450.0) and thorax_bounds(40)[:2] == (180.0, 450.0)
    assert thorax_bounds(4)[:2] == (80.0, 260.0)
    kept = {"thoracic_width_mm": 300.0, "heart_width_mm": 140.0, "heart_area_mm2": 1.0, "mm_calibration": "x"}
    assert plausible_mm(kept, 40) == kept
    (tmp_path / "films").mkdir()
    spacing = pydicom.dcmread(DICOM / "cr_chest_pa_jpeg_baseline.dcm").PixelSpacing  # its own
    _made(tmp_path, "adult", PatientAge="062Y", PixelSpacing=spacing)
    _made(tmp_path, "child", PatientAge="004Y", PixelSpacing=spacing)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run = lambda *a: CliRunner().invoke(cli, ["--db", url, *a])  # noqa: E731
    assert run("catalogue", "load", "dicom", str(tmp_path / "films"), "--workers", "1").exit_code == 0
    assert run("label", "--all", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache")).exit_code == 0
    rows = {row["uid"]: row for row in json.loads(run(
        "query", "SELECT uid, thoracic_width_px, thoracic_width_mm, heart_width_mm, mm_calibration FROM label_results",
        "--json").output)}
    adult, child = rows["adult"], rows["child"]
    assert adult["thoracic_width_mm"] is None and adult["heart_width_mm"] is None
    assert adult["mm_calibration"].startswith("withheld: a thoracic width of 1")
    assert "180-450 mm for an adult (age 62)" in adult["mm_calibration"]
    assert 100 < child["thoracic_width_mm"] < 160 and child["mm_calibration"] == "PixelSpacing"

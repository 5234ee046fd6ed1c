"""A folder of DICOM files catalogued from their headers (read in a process pool, never the
pixels), with pixel spacing and report text joined from a CSV."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import Engine

from pipeline import process_pool
from pipeline.catalogue.records import (
    CatalogueError,
    Item,
    LoadSummary,
    Problem,
    RowError,
    parse_age,
    parse_date,
    parse_sex,
    store,
)
from pipeline.catalogue.tables import read_csv


def _dicom_header(args: tuple[str, str]) -> Item:
    path, rel = args
    import pydicom
    from pydicom.errors import InvalidDicomError

    from pipeline.imaging import DecodeError, open_regular
    try:
        with open_regular(path) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
    except DecodeError as e:  # replaced by a FIFO or device since the folder was listed
        return Problem(None, rel, str(e))
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        return Problem(None, rel, f"unreadable DICOM header: {e}")
    try:
        return header_record(ds, rel, path)
    except Exception as e:  # also pydicom's own types: it parses each element when first read,
        # and a damaged one (an unknown value representation, a value cut short) raises there
        return Problem(None, rel, f"{rel}: {e}")


def header_record(ds, uid: str, path: str, source: str = "dicom") -> dict:
    """The catalogue's row of a DICOM header (a file's, or a PACS's metadata): the same
    fields, read the same way, wherever the instance lives."""
    (sy, sx), spacing_source = dicom_spacing(ds)
    notes: list[str] = []

    def lenient(parse, keyword: str):
        """A header field parsed, or left out with a note (the image is kept): PatientAge 999Y,
        PatientSex Q, StudyDate 20231399."""
        try:
            return parse(str(ds.get(keyword, "")))
        except RowError as e:
            notes.append(f"{keyword} left out: {e}")
            return None

    return {
        "uid": uid, "source": source, "path": path,
        "patient_id": str(ds.get("PatientID", "")) or None,
        "study_uid": str(ds.get("StudyInstanceUID", "")) or None,
        "sop_uid": str(ds.get("SOPInstanceUID", "")) or None,
        "study_date": lenient(parse_date, "StudyDate"),
        "modality": str(ds.get("Modality", "")) or None,
        "body_part": str(ds.get("BodyPartExamined", "")) or None,
        "view": str(ds.get("ViewPosition", "")) or None,
        "sex": lenient(parse_sex, "PatientSex"),
        "age": lenient(parse_age, "PatientAge"),
        "height": int(ds.Rows) if "Rows" in ds else None,
        "width": int(ds.Columns) if "Columns" in ds else None,
        "photometric": str(ds.get("PhotometricInterpretation", "")) or None,
        "spacing_x": sx, "spacing_y": sy, "spacing_source": spacing_source,
        "study_description": str(ds.get("StudyDescription", "")) or None,
        "accession": str(ds.get("AccessionNumber", "")) or None,
        "_notes": notes,
    }


SPACING_MM = (0.01, 5.0)  # a radiograph's pixel, mm: outside it a spacing is junk (inf, 1e300, 1e-300), never stored


def dicom_spacing(ds) -> tuple[tuple[float | None, float | None], str]:
    """``((row, column) mm per pixel at the patient, or Nones), what it came from)`` of a
    DICOM header: ``PixelSpacing`` (calibrated to the patient); else ``ImagerPixelSpacing``
    (at the detector, so magnified by the beam's divergence) divided by
    ``EstimatedRadiographicMagnificationFactor`` where the header gives one, or as it is and
    said so; a spacing of 0 or none is no calibration, and the reason."""
    def pair(tag: str) -> tuple[float, float] | None:
        v = ds.get(tag)
        try:
            return (float(v[0]), float(v[1])) if v is not None and len(v) == 2 else None
        except (TypeError, ValueError):
            return None

    def usable(p: tuple[float, float] | None) -> bool:
        return p is not None and all(math.isfinite(x) and SPACING_MM[0] <= x <= SPACING_MM[1] for x in p)

    pixel, imager = pair("PixelSpacing"), pair("ImagerPixelSpacing")
    if usable(pixel):
        return pixel, "PixelSpacing"  # type: ignore[return-value]
    if usable(imager):
        assert imager is not None
        try:
            factor = float(ds.get("EstimatedRadiographicMagnificationFactor") or 0)
        except (TypeError, ValueError):
            factor = 0.0
        if factor >= 1.0:
            return (imager[0] / factor, imager[1] / factor), f"ImagerPixelSpacing / magnification {factor:g}"
        return imager, "ImagerPixelSpacing (at the detector: magnified)"
    for tag, p in (("PixelSpacing", pixel), ("ImagerPixelSpacing", imager)):
        if p is None:
            continue
        shown = "\\".join(f"{x:g}" for x in p)
        if all(x == 0 for x in p):
            return (None, None), f"none: {tag} is 0"
        if not all(math.isfinite(x) and x > 0 for x in p):
            return (None, None), f"none: {tag} {shown} is not a positive number"
        return (None, None), (f"none: {tag} {shown} mm is not a film's (a pixel is "
                              f"{SPACING_MM[0]:g}-{SPACING_MM[1]:g} mm)")
    return (None, None), "none in the header"


def dicom_files(root: Path) -> tuple[list[tuple[str, str]], list[Problem]]:
    """``(path, uid)`` of every DICOM file under ``root`` (uid = relative path sans suffix),
    and a :class:`Problem` for each entry that is not a regular file (a FIFO, socket or
    device: never opened, since reading one can wait forever)."""
    from pipeline.imaging import DICOM_SUFFIXES, is_dicom, kind_of
    if not Path(root).is_dir():
        raise CatalogueError(f"{root}: not a folder; `catalogue load dicom` takes a folder tree")
    found, odd = [], []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            try:
                mode = p.stat().st_mode
            except OSError as e:  # a link to nothing, a file gone meanwhile
                odd.append(Problem(None, rel, f"{p}: cannot be read ({e.strerror or e})"))
                continue
            if not stat.S_ISREG(mode):
                odd.append(Problem(None, rel, f"{p}: {kind_of(mode)}, not a regular file: left out"))
            elif is_dicom(p):
                if p.suffix.lower() in DICOM_SUFFIXES:
                    rel = p.relative_to(root).with_suffix("").as_posix()
                found.append((str(p.resolve()), rel))
    if not found:
        raise CatalogueError(f"{root}: no DICOM files found (files need the DICM preamble)"
                             + (f"; {len(odd)} entries are not regular files" if odd else ""))
    return sorted(found, key=lambda t: t[1]), odd


def load_dicom(engine: Engine, root: Path, workers: int | None = None, uid_from: str = "path",
               text_csv: Path | None = None, text_key: str = "sop_uid", text_column: str = "text",
               key_column: str | None = None, progress: bool = True) -> LoadSummary:
    """Headers of every DICOM file under ``root`` (pixel data is not read), in parallel.

    ``uid_from``: ``path`` (relative path, always unique) or ``sop`` (SOP Instance UID; a
    repeated instance goes to ``load_errors``). ``text_csv``: join diagnosis text by
    ``text_key`` (an images column such as sop_uid, study_uid, patient_id or uid) from
    ``key_column`` of that CSV.
    """
    if uid_from not in ("path", "sop"):
        raise CatalogueError(f"--uid-from {uid_from!r}: use 'path' or 'sop'")
    files, odd = dicom_files(root)
    texts = _text_lookup(text_csv, key_column or text_key, text_column) if text_csv else None

    def items() -> Iterator[Item]:
        yield from odd
        seen: dict[str, str] = {}
        workers_ = workers or min(8, os.cpu_count() or 1)
        with process_pool(workers_) as pool:
            for item in pool.map(_dicom_header, files, chunksize=32):
                if isinstance(item, Problem):
                    yield item
                    continue
                if uid_from == "sop":
                    rel = item["uid"]
                    if not item["sop_uid"]:
                        yield Problem(None, rel, f"{rel}: no SOP Instance UID; use --uid-from path")
                        continue
                    if item["sop_uid"] in seen:
                        yield Problem(None, item["sop_uid"], f"duplicate SOP Instance UID: {rel} "
                                      f"repeats {seen[item['sop_uid']]}; kept the first")
                        continue
                    seen[item["sop_uid"]] = rel
                    item["uid"] = item["sop_uid"]
                if texts is not None:
                    item["text"] = texts.get(str(item.get(text_key) or ""))
                yield item

    return store(engine, items(), str(root), progress=progress)


def _text_lookup(path: Path, key_column: str, text_column: str) -> dict[str, str]:
    header, rows = read_csv(path)
    if key_column not in header or text_column not in header:
        raise CatalogueError(f"{path}: needs columns {key_column!r} and {text_column!r} "
                             f"(found {header[:12]}); set --text-key-column/--text-column")
    return {r[key_column].strip(): r[text_column] for _, r in rows if isinstance(r, dict)}

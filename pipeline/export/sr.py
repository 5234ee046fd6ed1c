"""Results back where radiologists look: a TID 1500 measurement report (DICOM Comprehensive SR,
highdicom) of the CTR, written to a folder (``export sr``), and it or the DICOM SEG stored in a
PACS over STOW-RS through the PACS client (``cxrlabel export seg|sr --to URL``).

The report holds, for the source image it references:

- the heart's transverse diameter and the thorax's internal diameter, each as a planar ROI
  measurement group (TID 1410) whose region is the width's line on the source image (a
  POLYLINE of two points, at the row halfway between the rows where the structure reaches its
  left and right extremes), in mm where the pixel spacing allows (``label_results.*_mm``),
  else in pixels;
- the CTR (TID 1501, image-level), unitless.

No standard code names the CTR or these two diameters (SNOMED CT and LOINC have none a viewer
would match), so :data:`CODES` holds ours, in a private coding scheme, in this one place.

Idempotent: an object's SOP Instance UID derives from the source, the model and the masks'
content (:func:`pipeline.export.seg.content_uid`), and what a destination holds is recorded in
``pacs_exports``, so exporting the same result again stores nothing; a changed result (corrected
masks, another model's) is a new instance that names the one it supersedes: the report in
its Predecessor Documents Sequence, the SEG (which has none) by its Instance Number in the same
series and a reference in its Common Instance Reference Module (``seg._supersede``). A STOW-RS
answer that stores some instances and refuses others (a 202) is counted instance by instance.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline.export.stream import ExportSummary, Item, _skip
from pipeline.pacs.client import DicomWeb
from pipeline.pacs.dimse import SCHEME as DIMSE
from pipeline.pacs.dimse import Store

# (code value, coding scheme designator, meaning): no standard code names the CTR
CODING_SCHEME = "99CXRLABEL"
CODES = {
    "ctr": ("CTR", CODING_SCHEME, "Cardiothoracic ratio"),
    "heart_width": ("HEARTWIDTH", CODING_SCHEME, "Transverse cardiac diameter"),
    "thoracic_width": ("THORAXWIDTH", CODING_SCHEME, "Internal transverse thoracic diameter"),
}
PROCEDURE = ("399208008", "SCT", "Plain chest X-ray")
STOW_BATCH = 16  # instances a STOW-RS request carries
SR_SERIES_NUMBER = 901


@dataclass
class Widths:
    """What the report states of one film (``measurements``' row)."""

    ctr: float | None
    heart_mm: float | None
    thoracic_mm: float | None
    heart_px: int | None
    thoracic_px: int | None


def width_line(mask: np.ndarray) -> list[tuple[float, float]] | None:
    """The two ends ``(column, row)`` of a structure's width as the CTR reads it (its leftmost
    to its rightmost column), on the row halfway between those where it reaches them."""
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(cols):
        return None
    x0, x1 = int(cols[0]), int(cols[-1])
    y = (float(np.flatnonzero(mask[:, x0]).mean()) + float(np.flatnonzero(mask[:, x1]).mean())) / 2
    return [(float(x0), y), (float(x1 + 1), y)]


def measurement_report(src, it: Item, widths: Widths, sop_uid: str, previous: list | None = None):
    """``it``'s TID 1500 measurement report on ``src`` (a Comprehensive SR)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    def concept(key: str):
        return hd.sr.CodedConcept(*CODES[key])

    source = hd.sr.SourceImageForRegion(str(src.SOPClassUID), str(src.SOPInstanceUID))
    algorithm = hd.sr.AlgorithmIdentification(name=f"cxrlabel {it.model}"[:64], version=(it.sha256 or "unknown")[:64])
    groups: list = []
    lungs = [it.mask(s) for s in ("left_lung", "right_lung") if s in it.masks]
    regions = {"heart_width": (it.mask("heart") if "heart" in it.masks else None, widths.heart_mm, widths.heart_px),
               "thoracic_width": (np.logical_or.reduce(lungs) if lungs else None, widths.thoracic_mm,
                                  widths.thoracic_px)}
    for key, (mask, mm, px) in regions.items():
        line = width_line(mask) if mask is not None else None
        if line is None or (mm is None and px is None):
            continue
        value, unit = (mm, codes.UCUM.Millimeter) if mm is not None else (
            float(px or 0), hd.sr.CodedConcept("{pixels}", "UCUM", "pixels"))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, key]),
                                                         identifier=f"{key} line"),
            referenced_region=hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, np.array(line), source),
            finding_type=hd.sr.CodedConcept("80891009", "SCT", "Heart") if key == "heart_width" else
            hd.sr.CodedConcept("51185008", "SCT", "Thorax"),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=concept(key), value=float(value), unit=unit, algorithm_id=algorithm)]))
    if widths.ctr is not None:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, "ctr"]),
                                                         identifier="cardiothoracic ratio"),
            algorithm_id=algorithm,
            source_images=[hd.sr.SourceImageForMeasurementGroup(str(src.SOPClassUID), str(src.SOPInstanceUID))],
            measurements=[hd.sr.Measurement(name=concept("ctr"), value=float(widths.ctr),
                                            unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
                                            algorithm_id=algorithm)]))
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["cxrlabel", it.model, str(it.sha256)]), name=f"cxrlabel {it.model}"[:64],
            manufacturer_name="cxrlabel", model_name=it.model[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept(*PROCEDURE), imaging_measurements=groups)
    return hd.sr.ComprehensiveSR(
        evidence=[src], content=report, series_instance_uid=generate_uid(
            entropy_srcs=[str(src.get("SeriesInstanceUID", "")), it.model, "cxrlabel-sr"]),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1, manufacturer="cxrlabel",
        is_complete=True, previous_versions=previous or None)


def widths_of(engine: Engine, model: str, uids: list[str]) -> dict[str, Widths]:
    m = D.measurements
    with engine.connect() as conn:
        return {r.uid: Widths(r.ctr, r.heart_width_mm, r.thoracic_width_mm, r.heart_width_px, r.thoracic_width_px)
                for r in D.rows_in(conn, select(m.c.uid, m.c.ctr, m.c.heart_width_mm, m.c.thoracic_width_mm,
                                                m.c.heart_width_px, m.c.thoracic_width_px).where(m.c.model == model),
                                   m.c.uid, uids)}


def previous_exports(engine: Engine, destination: str, kind: str, uid: str, model: str) -> list[dict]:
    """What ``destination`` holds of ``uid``'s ``kind`` objects by ``model``, newest first."""
    t = D.pacs_exports
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(t).where(
            t.c.destination == destination, t.c.kind == kind, t.c.uid == uid, t.c.model == model)
            .order_by(t.c.exported_at.desc(), t.c.sop_uid))]


def _reference(row: dict):
    """A Dataset naming an earlier report (for Predecessor Documents)."""
    from pydicom import Dataset
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = row["study_uid"], row["series_uid"]
    ds.SOPInstanceUID, ds.SOPClassUID = row["sop_uid"], row["sop_class_uid"]
    return ds


def store_results(engine: Engine, kind: str, url: str, stream: Iterator[Item], summary: ExportSummary,
                  names: dict[str, str], model: str) -> None:
    """``kind`` (``seg`` or ``sr``) objects of the stream's films, stored in the PACS at ``url``
    over STOW-RS (or C-STORE, for ``dimse://HOST:PORT?called=AET``), :data:`STOW_BATCH` at a
    time; what it already holds is kept."""
    from pipeline.export.seg import content_uid, segmentation_of, source_for
    with Store(url) if url.startswith(DIMSE) else DicomWeb(url) as client:
        batch: list[tuple[str, object, str | None]] = []
        for it in stream:
            if (src := source_for(it, summary)) is None:
                continue
            sop = content_uid(src, it, kind)
            earlier = previous_exports(engine, client.base, kind, it.uid, model)
            if any(r["sop_uid"] == sop for r in earlier):
                summary.kept += 1
                continue
            ds = (segmentation_of(src, it, sop, names, summary, earlier) if kind == "seg" else
                  report_of(engine, src, it, sop, model, summary, [_reference(r) for r in earlier[:1]]))
            if ds is None:
                continue
            batch.append((it.uid, ds, earlier[0]["sop_uid"] if earlier else None))
            if len(batch) >= STOW_BATCH:
                _stow(engine, client, kind, model, batch, summary)
                batch = []
        if batch:
            _stow(engine, client, kind, model, batch, summary)


def export_sr(engine: Engine, stream: Iterator[Item], out, summary: ExportSummary, model: str) -> None:
    """``out/<uid>.dcm``: the measurement report of each DICOM-sourced film (kept when a file of
    the same SOP Instance UID is there)."""
    import pydicom

    from pipeline.export.destination import _prepare_folder, _written
    from pipeline.export.seg import content_uid, source_for
    from pipeline.export.stream import safe_name
    _prepare_folder("sr", out)
    for it in stream:
        if (src := source_for(it, summary)) is None:
            continue
        sop = content_uid(src, it, "sr")
        path = out / f"{safe_name(it.uid)}.dcm"
        if path.exists():
            try:
                if str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                       .SOPInstanceUID) == sop:
                    summary.kept += 1
                    continue
            except (OSError, pydicom.errors.InvalidDicomError, AttributeError):
                pass
        if (sr := report_of(engine, src, it, sop, model, summary)) is None:
            continue
        with _written(path) as tmp:
            sr.save_as(tmp, enforce_file_format=True)
        summary.written += 1


def report_of(engine: Engine, src, it: Item, sop: str, model: str, summary: ExportSummary,
              previous: list | None = None):
    """``it``'s measurement report on ``src`` (naming ``previous`` reports it supersedes), or
    None (the reason counted in ``summary``): as :func:`pipeline.export.seg.segmentation_of`."""
    from pipeline.export.seg import prepared_source
    if not prepared_source(src, summary):
        return None
    widths = widths_of(engine, model, [it.uid]).get(it.uid) or Widths(None, None, None, None, None)
    try:
        with warnings.catch_warnings():  # highdicom's warnings quote patient names: never to a terminal
            warnings.simplefilter("ignore", UserWarning)
            return measurement_report(src, it, widths, sop, previous)
    except (ValueError, TypeError, AttributeError) as e:
        _skip(summary, f"DICOM SR could not be made ({type(e).__name__}: {str(e)[:120]})")
        return None


def _stow(engine: Engine, client: DicomWeb | Store, kind: str, model: str, batch: list, summary: ExportSummary) -> None:
    """One STOW-RS request; each instance stored is recorded, each refused one counted."""
    blobs = []
    for _, ds, _ in batch:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    results = client.store(blobs, [str(ds.SOPInstanceUID) for _, ds, _ in batch])
    now = D.utcnow()
    rows = []
    for (uid, ds, supersedes), result in zip(batch, results, strict=True):
        if not result.stored:
            _skip(summary, f"the PACS refused it: {result.reason}")
            continue
        rows.append({"destination": client.base, "kind": kind, "uid": uid, "model": model,
                     "sop_uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.SOPClassUID),
                     "study_uid": str(ds.StudyInstanceUID), "series_uid": str(ds.SeriesInstanceUID),
                     "supersedes": supersedes, "exported_at": now})
        summary.written += 1
    if rows:
        with engine.begin() as conn:
            D.upsert(conn, D.pacs_exports, rows, ["destination", "sop_uid"])

"""One DICOM Segmentation object per DICOM-sourced image (highdicom): a segment per structure,
referencing the source image and naming the algorithm or the reviewer."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.export.destination import _prepare_folder, _written
from pipeline.export.stream import ExportSummary, Item, _skip, safe_name
from pipeline.masks import CARDIOMEDIASTINUM, STRUCTURES

# patient and study attributes a SEG copies from its source, empty when the source has none
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


# SNOMED CT codes of the segmented structures (DICOM CID 7150 category: anatomical structure)
SNOMED = {"heart": ("80891009", "Heart"), "left_lung": ("44029006", "Left lung"),
          "right_lung": ("3341006", "Right lung"),
          # no SNOMED CT concept names the cardiomediastinal silhouette: coded as the mediastinum,
          # which holds the heart, and labelled for what it is
          CARDIOMEDIASTINUM: ("72410000", "Mediastinum")}


def export_seg(stream: Iterator[Item], out: Path, summary: ExportSummary, names: dict[str, str]) -> None:
    """``out/<uid>.dcm``: a DICOM Segmentation per DICOM-sourced image. Its SOP Instance UID
    is derived from the source, the model and the masks' content, so an existing file with
    that UID is the same export and is kept without decoding it."""
    import pydicom
    _prepare_folder("seg", out)
    from pipeline.imaging import DecodeError, open_regular
    for it in stream:
        if (src := source_for(it, summary)) is None:
            continue
        uid = content_uid(src, it)
        path = out / f"{safe_name(it.uid)}.dcm"
        if path.exists():
            try:
                with open_regular(path) as f:
                    if str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                           .SOPInstanceUID) == uid:
                        summary.kept += 1
                        continue
            except (OSError, pydicom.errors.InvalidDicomError, AttributeError, DecodeError):
                pass  # unreadable or another export: written again
        seg = segmentation_of(src, it, uid, names, summary)
        if seg is None:
            continue
        with _written(path) as tmp:
            seg.save_as(tmp)
        summary.written += 1


def source_for(it: Item, summary: ExportSummary):
    """``it``'s source header when a DICOM object can reference it (a DICOM file or a PACS
    instance of the masks' size); None, the reason counted in ``summary``, otherwise."""
    src = source_header(it.path)
    if src is None or "SOPInstanceUID" not in src or "Rows" not in src:
        _skip(summary, "not from a DICOM file (seg and sr need the source DICOM)")
        return None
    if (int(src.Rows), int(src.Columns)) != (it.height, it.width):
        _skip(summary, "masks and source DICOM differ in size")
        return None
    return src


def source_header(path: str | None):
    """The source image's DICOM header (no pixels): read from its file, or from the PACS it
    lives in (WADO-RS metadata); None when it is no DICOM or cannot be had."""
    import pydicom

    from pipeline.imaging import DecodeError, open_regular
    from pipeline.pacs.fetch import is_remote
    if not path:
        return None
    if is_remote(path):
        from pipeline.pacs.fetch import remote_header
        return remote_header(path)
    try:
        with open_regular(path) as f:
            return pydicom.dcmread(f, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError, DecodeError):
        return None


def content_uid(src, it: Item, kind: str = "seg") -> str:
    """The SOP Instance UID of ``it``'s ``kind`` object: derived from the source instance,
    the model and the masks' content (and who reviewed them), so an export of the same result
    has the same UID (found and kept), and a changed result a new one."""
    import pydicom
    digest = hashlib.sha256()
    for s in STRUCTURES:
        if s in it.masks:
            digest.update(s.encode() + it.masks[s][0] + it.reviewers.get(s, "").encode())
    sources = [str(src.SOPInstanceUID), it.model, str(it.sha256), digest.hexdigest()]
    return pydicom.uid.generate_uid(entropy_srcs=sources if kind == "seg" else [*sources, kind])


def prepared_source(src, summary: ExportSummary) -> bool:
    """Whether the source header can be referenced (and make it so: empty Type 2 attributes,
    a valid age); a skip reason counted in ``summary`` otherwise."""
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID") if k not in src]
    if missing:
        _skip(summary, f"source DICOM lacks {', '.join(missing)}")
        return False
    for keyword in TYPE2:  # empty where the source leaves them out (the SEG must carry them)
        if keyword not in src:
            setattr(src, keyword, "")
    _valid_age(src)
    return True


def segmentation_of(src, it: Item, uid: str, names: dict[str, str], summary: ExportSummary,
                    previous: list[dict] | None = None):
    """``it``'s DICOM SEG on ``src``, or None (the reason counted in ``summary``);
    ``previous``: the SEGs of the same film and model a PACS holds (``pacs_exports`` rows,
    newest first), which this one supersedes (:func:`_supersede`)."""
    if not prepared_source(src, summary):
        return None
    try:
        with warnings.catch_warnings():  # highdicom's warnings quote patient names: never to a terminal
            warnings.simplefilter("ignore", UserWarning)
            seg = _segmentation(src, it, uid, names)
            if previous:
                _supersede(seg, previous)
            return seg
    except (ValueError, TypeError, AttributeError) as e:
        _skip(summary, f"DICOM SEG could not be made ({type(e).__name__}: {str(e)[:120]})")
        return None


def _valid_age(src) -> None:
    """The source's PatientAge as the SEG copies it: DICOM's ``nnnY`` form (``062Y`` for a
    bare ``62``, which archives write and validators refuse), or left out when it is no age."""
    age = str(src.get("PatientAge", "") or "").strip().upper()
    if not age or re.fullmatch(r"\d{3}[DWMY]", age):
        return
    if age.isdigit() and int(age) <= 130:
        src.PatientAge = f"{int(age):03d}Y"
    elif m := re.fullmatch(r"(\d{1,3})\s*([DWMY])", age):
        src.PatientAge = f"{int(m.group(1)):03d}{m.group(2)}"
    else:
        del src.PatientAge


def _segmentation(src, it: Item, sop_uid: str, names: dict[str, str]):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid
    # A projection radiograph has pixel spacing but no slice thickness: highdicom would copy
    # the spacing into a Pixel Measures item that its own reader (and others) then refuse. The
    # SEG shares the source's pixel grid, which it references, so the spacing stays there.
    for keyword in ("PixelSpacing", "SliceThickness"):
        if keyword in src:
            delattr(src, keyword)
    present = [s for s in STRUCTURES if s in it.masks]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"cxrlabel {it.model}", version=(it.sha256 or "unknown")[:64],
        family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for n, s in enumerate(present, 1):
        code, meaning = SNOMED[names[s]]
        manual = s in it.drawn
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label="Cardiomediastinum" if names[s] == CARDIOMEDIASTINUM else meaning,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.MANUAL if manual
                            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC),
            algorithm_identification=None if manual else algorithm))
    pixels = np.stack([it.mask(s) for s in present], axis=-1)[None].astype(np.uint8)
    reviewers = sorted({r for r in it.reviewers.values() if r})
    seg = hd.seg.Segmentation(
        source_images=[src], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[str(src.get("SeriesInstanceUID", "")), it.model,
                                                       "cxrlabel-seg"]),
        series_number=900, sop_instance_uid=sop_uid, instance_number=1, manufacturer="cxrlabel",
        manufacturer_model_name=it.model[:64], software_versions=_version(), device_serial_number=(it.sha256 or "")[:16]
        or "unknown", content_label="HEARTLUNGS",
        content_description=(("reviewed by " + ", ".join(reviewers)) if reviewers else
                             f"model {it.model} sha256 {(it.sha256 or 'unknown')[:12]}")[:64],
        content_creator_name=reviewers[0].replace(" ", "^") if reviewers else None)
    # General Image: Patient Orientation is Type 2C for a projection radiograph's SEG (the
    # source's, or empty where it has none); highdicom leaves it out
    seg.PatientOrientation = src.get("PatientOrientation", "") or ""
    return seg


def _supersede(seg, previous: list[dict]) -> None:
    """Mark ``seg`` as the newer version of ``previous[0]`` (``pacs_exports`` rows, newest
    first). A SEG has no Predecessor Documents Sequence (an SR's way): the newer one lies in
    the same series (its UID comes from the source's series and the model) with the next
    Instance Number, which viewers show last; it references the one it replaces in its Common
    Instance Reference Module, the list of instances of the study an object refers to; and
    its Content Description opens with the revision."""
    from pydicom import Dataset
    older = previous[0]
    seg.InstanceNumber = len(previous) + 1
    seg.ContentDescription = f"revision {seg.InstanceNumber}: {seg.ContentDescription}"[:64]
    instance = Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = older["sop_class_uid"], older["sop_uid"]
    for series in seg.get("ReferencedSeriesSequence", []):
        if series.SeriesInstanceUID == older["series_uid"]:
            series.ReferencedInstanceSequence.append(instance)
            return
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedInstanceSequence = older["series_uid"], [instance]
    seg.ReferencedSeriesSequence.append(series)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("cxrlabel")
    except PackageNotFoundError:
        return "unknown"

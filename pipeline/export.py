"""``cxrlabel export``: masks out of the database in formats others read.

* ``rle``: one CSV in the layout of CheXmask's published files (``Image ID``, ``Left Lung``,
  ``Right Lung``, ``Heart`` as run-length text, ``Height``, ``Width``; row-major, 1-based
  starts, "start length" pairs), plus our ``CTR``, ``Quality``, ``Model`` and ``Masks``
  columns, so code written for CheXmask reads ours;
* ``png``: one 1-bit PNG per structure per image in original geometry, and ``index.csv``;
* ``seg``: one DICOM Segmentation object per DICOM-sourced image (highdicom), a segment per
  structure, referencing the source image's SOP Instance, study and series, and naming the
  algorithm (model and sha256) or, for reviewed masks, the reviewer.

Masks are the model's (``--model``), or as people left them (``--reviewed``: corrected where
corrected, the model's where accepted; images nobody reviewed are left out). A mask whose
latest review rejected it is never exported unless asked (``include_rejected``).

Every export streams (flat memory for any count) and is resumable: what already exists and
matches is kept, what differs or is missing is written (a CSV is merged in uid order into a
new file that replaces the old one only when complete).

An export writes only where it recognises its own output (:func:`check_destination`): a new
path, an RLE CSV with our header, or a folder it made (marked by :data:`MARKER`). A device,
FIFO or unrelated file or folder is refused before anything is written. Files are written to a
``.partial`` beside their place and renamed; an interrupt (Ctrl-C, SIGTERM) or a write error
removes it, and a write error names the path. Files are owner-only (0600) and folders 0700:
they carry patient data (README, "Sharing exports").
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.groups import Selection
from pipeline.masks import CARDIOMEDIASTINUM, STRUCTURES, decode, encode, heart_definition, rle_of
from pipeline.review import latest_reviews

FORMATS = ("rle", "png", "seg")
CHEXMASK_COLUMNS = {"left_lung": "Left Lung", "right_lung": "Right Lung", "heart": "Heart"}
RLE_HEADER = ["Image ID", "Left Lung", "Right Lung", "Heart", "Height", "Width", "CTR", "Quality", "Model", "Masks"]
# a model whose `heart` is GeneralBlockchain's cardiomediastinum (trained before 2026-12-05):
# its column says so, so that code written for CheXmask's `Heart` never reads it as the heart
RLE_HEADER_OLDER = [("Cardiomediastinum" if c == "Heart" else c) for c in RLE_HEADER]
PNG_INDEX_HEADER = ["uid", "structure", "file", "height", "width", "area", "model", "masks", "ctr", "quality"]
CHUNK = 500
# patient and study attributes a SEG copies from its source, empty when the source has none
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")
# SNOMED CT codes of the segmented structures (DICOM CID 7150 category: anatomical structure)
SNOMED = {"heart": ("80891009", "Heart"), "left_lung": ("44029006", "Left lung"),
          "right_lung": ("3341006", "Right lung"),
          # no SNOMED CT concept names the cardiomediastinal silhouette: coded as the mediastinum,
          # which holds the heart, and labelled for what it is
          CARDIOMEDIASTINUM: ("72410000", "Mediastinum")}


MARKER = ".cxrlabel-export"  # in a folder export: the format it holds; only such folders are written into
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


class ExportError(CxrlabelError):
    pass


def check_destination(fmt: str, out: Path) -> None:
    """Refuse an ``--out`` that is not, or not yet, this export's own: a device, FIFO or
    socket; for ``rle`` a file that is not an RLE CSV of ours (an empty file is taken); for
    ``png``/``seg`` a file, or a folder with other content and no :data:`MARKER` of the same
    format (earlier exports without one are recognised by their content)."""
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ExportError(f"--out {out}: cannot be read ({e.strerror or e}): choose another place") from None
    if fmt == "rle":
        if stat.S_ISDIR(mode):
            raise ExportError(f"{out} is a folder: `export rle` writes one CSV file, e.g. --out {out / 'masks.csv'}")
        if not stat.S_ISREG(mode):
            raise ExportError(f"--out {out} is not a regular file (a device, FIFO or socket): "
                              "`export rle` writes a CSV file; choose a file path")
        if out.stat().st_size and not _is_our_csv(out):
            raise ExportError(f"{out} exists and is not a cxrlabel rle export (its first line is not our header): "
                              "choose another --out; cxrlabel never overwrites a file it did not write")
        return
    if not stat.S_ISDIR(mode):
        raise ExportError(f"--out {out} is a file, not a folder: `export {fmt}` writes a folder of its own; "
                          "choose a new or empty folder")
    if (out / MARKER).is_file():
        found = (out / MARKER).read_text(errors="replace").strip()
        if found != fmt:
            raise ExportError(f"{out} holds a cxrlabel {found or 'unknown'} export, not {fmt}: choose another --out")
        return
    entries = [e for e in os.listdir(out) if not e.startswith(".")]
    if entries and not _earlier_export(fmt, out, entries):
        raise ExportError(f"{out} is a folder with other content ({len(entries)} entries) and no {MARKER}: "
                          "choose a new or empty folder; cxrlabel never writes into a folder it did not make")


def _is_our_csv(path: Path, header: list[str] | None = None) -> bool:
    from pipeline.imaging import DecodeError, open_regular
    try:  # a FIFO in a foreign folder is not ours, and is never waited on
        with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), None) in ([header] if header else [RLE_HEADER, RLE_HEADER_OLDER])
    except (OSError, UnicodeDecodeError, csv.Error, DecodeError):
        return False


def _earlier_export(fmt: str, out: Path, entries: list[str]) -> bool:
    """An export folder written before :data:`MARKER` existed: png's index.csv with our header;
    seg files of ours only (made by cxrlabel)."""
    if fmt == "png":
        return "index.csv" in entries and _is_our_csv(out / "index.csv", PNG_INDEX_HEADER)
    if not all(e.endswith((".dcm", ".partial")) for e in entries):
        return False
    import pydicom

    from pipeline.imaging import open_regular
    try:
        with open_regular(out / sorted(e for e in entries if e.endswith(".dcm"))[0]) as f:
            first = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Manufacturer"])
    except Exception:  # unreadable, or not a regular file: not recognisably ours
        return False
    return str(first.get("Manufacturer", "")) == "cxrlabel"


def _prepare_folder(fmt: str, out: Path) -> None:
    """Make the export folder (0700) and mark it as this format's."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (out / MARKER).is_file():
        _atomic_write(out / MARKER, f"{fmt}\n".encode())


@contextlib.contextmanager
def _written(path: Path) -> Iterator[Path]:
    """A ``.partial`` beside ``path`` to write; renamed over ``path`` when the block ends, and
    removed when it does not (an error, Ctrl-C, SIGTERM). A write error names ``path``."""
    tmp = _partial(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise ExportError(f"cannot write {path}: {e.strerror or e}: free space there or choose another --out "
                              "(what was exported before is kept)") from None
        raise


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM during an export raises KeyboardInterrupt, so its partial file is removed as
    after Ctrl-C (the default action would end the process where it stands)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class ExportSummary:
    out: Path
    written: int = 0  # files or rows written (new, or changed since the last export)
    kept: int = 0  # already there and the same
    rejected: int = 0  # masks left out because a reviewer rejected them
    skipped: dict[str, int] = field(default_factory=dict)  # reason: images


@dataclass
class Item:
    """One image's masks to export, as stored (run-length or PNG), with what describes them."""

    uid: str
    height: int
    width: int
    masks: dict[str, tuple[bytes, str]]  # structure: (data, encoding)
    ctr: float | None
    quality: float | None
    model: str
    sha256: str | None
    reviewers: dict[str, str]  # structure: who corrected or accepted it (--reviewed only)
    path: str | None = None
    drawn: frozenset[str] = frozenset()  # structures a person drew (corrected), not the model

    def mask(self, s: str) -> np.ndarray:
        data, encoding = self.masks[s]
        return decode(data, encoding, (self.height, self.width))

    def rle(self, s: str) -> str:
        data, encoding = self.masks[s]
        return (data if encoding == "rle" else rle_of(self.mask(s))).decode("ascii")


def items(engine: Engine, selection: Selection, model: str, reviewed: bool, include_rejected: bool,
          summary: ExportSummary) -> Iterator[Item]:
    """The selection's images with their masks, in uid order, a chunk at a time."""
    uids = [it.uid for it in selection.items]
    paths = {it.uid: it.path for it in selection.items}
    t, m = D.masks, D.measurements
    for start in range(0, len(uids), CHUNK):
        part = uids[start:start + CHUNK]
        with engine.connect() as conn:
            meas = {r.uid: r for r in D.rows_in(
                conn, select(m.c.uid, m.c.ctr, m.c.reviewed_ctr, m.c.quality, D.label_runs.c.model_sha256)
                .join(D.label_runs, D.label_runs.c.id == m.c.run_id, isouter=True).where(m.c.model == model),
                m.c.uid, part)}
            rows: dict[str, dict[str, dict]] = {}
            q = select(t.c.uid, t.c.structure, t.c.kind, t.c.data, t.c.encoding, t.c.height, t.c.width).where(
                t.c.model == model, t.c.kind.in_(["predicted", "reviewed"] if reviewed else ["predicted"]))
            for r in D.rows_in(conn, q, t.c.uid, part):
                rows.setdefault(r.uid, {}).setdefault(r.kind, {})[r.structure] = r
            decided = latest_reviews(conn, model, part)
        for uid in part:
            kinds = rows.get(uid)
            if not kinds or uid not in meas:
                _skip(summary, f"not labelled by {model}")
                continue
            latest = decided.get(uid, {})
            state = {s: x.decision for s, x in latest.items()}
            if reviewed and not any(d in ("accepted", "corrected") for d in state.values()):
                _skip(summary, "not reviewed")
                continue
            chosen = {**kinds.get("predicted", {}), **(kinds.get("reviewed", {}) if reviewed else {})}
            keep = {s: r for s, r in chosen.items() if include_rejected or state.get(s) != "rejected"}
            summary.rejected += len(chosen) - len(keep)
            if not keep:
                continue
            first = next(iter(keep.values()))
            me = meas[uid]
            yield Item(uid, first.height, first.width, {s: (bytes(r.data), r.encoding) for s, r in keep.items()},
                       me.reviewed_ctr if reviewed else me.ctr, me.quality, model, me.model_sha256,
                       {s: latest[s].reviewer if s in latest else "" for s in keep} if reviewed else {}, paths.get(uid),
                       frozenset(s for s, r in keep.items() if r.kind == "reviewed"))


def _skip(summary: ExportSummary, reason: str) -> None:
    summary.skipped[reason] = summary.skipped.get(reason, 0) + 1


def safe_name(uid: str) -> str:
    """A file name for a uid: its safe characters, plus a short digest where any were changed
    (two uids never share a name)."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", uid).strip(".") or "_"
    return clean if clean == uid else f"{clean}-{hashlib.sha256(uid.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- rle


def _rle_row(it: Item) -> list[str]:
    return [it.uid, *(it.rle(s) if s in it.masks else "" for s in ("left_lung", "right_lung", "heart")),
            str(it.height), str(it.width), "" if it.ctr is None else f"{it.ctr:.4f}",
            "" if it.quality is None else f"{it.quality:.4f}", it.model,
            "reviewed" if it.reviewers else "model"]


def export_rle(stream: Iterator[Item], out: Path, summary: ExportSummary, names: dict[str, str]) -> None:
    """Merge the new rows into ``out`` in uid order: equal rows kept, others written. The
    heart's column is ``Cardiomediastinum`` for a model whose heart is one (``names``)."""
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    header = RLE_HEADER if names["heart"] == "heart" else RLE_HEADER_OLDER
    old = _old_rows(out, header)
    pending = next(old, None)
    with _written(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for it in stream:
            row = _rle_row(it)
            while pending is not None and pending[0] < it.uid:  # no longer exported
                pending = next(old, None)
            if pending is not None and pending == row:
                summary.kept += 1
            else:
                summary.written += 1
            if pending is not None and pending[0] == it.uid:
                pending = next(old, None)
            w.writerow(row)


def _old_rows(path: Path, header: list[str]) -> Iterator[list[str]]:
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        if next(r, None) != header:
            return  # not one of ours: rewritten whole
        yield from r


# ---------------------------------------------------------------- png


def export_png(stream: Iterator[Item], out: Path, summary: ExportSummary, names: dict[str, str]) -> None:
    """``out/<uid>/<structure>.png`` (1-bit, original geometry) and ``out/index.csv``; a heart
    that is a cardiomediastinum (``names``) is ``cardiomediastinum.png``."""
    _prepare_folder("png", out)
    with _written(out / "index.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(PNG_INDEX_HEADER)
        for it in stream:
            folder = out / safe_name(it.uid)
            folder.mkdir(exist_ok=True, mode=0o700)
            for s in STRUCTURES:
                if s not in it.masks:
                    continue
                mask = it.mask(s)
                data = encode(mask)
                path = folder / f"{names[s]}.png"
                if path.exists() and path.read_bytes() == data:
                    summary.kept += 1
                else:
                    _atomic_write(path, data)
                    summary.written += 1
                w.writerow([it.uid, names[s], f"{folder.name}/{names[s]}.png", it.height, it.width,
                            int(mask.sum()), it.model, "reviewed" if it.reviewers else "model",
                            "" if it.ctr is None else f"{it.ctr:.4f}",
                            "" if it.quality is None else f"{it.quality:.4f}"])


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it replaces the old one: a file of its own for each
    writer, so two exports to one place never write into each other's half-written file."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise ExportError(f"cannot write in {path.parent}: {e.strerror or e}: choose another --out") from None
    os.close(fd)
    return Path(name)


def _atomic_write(path: Path, data: bytes) -> None:
    with _written(path) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------- seg


def export_seg(stream: Iterator[Item], out: Path, summary: ExportSummary, names: dict[str, str]) -> None:
    """``out/<uid>.dcm``: a DICOM Segmentation per DICOM-sourced image. Its SOP Instance UID
    is derived from the source, the model and the masks' content, so an existing file with
    that UID is the same export and is kept without decoding it."""
    import pydicom
    _prepare_folder("seg", out)
    from pipeline.imaging import DecodeError, open_regular
    for it in stream:
        try:
            with open_regular(it.path) if it.path else contextlib.nullcontext() as f:
                src = pydicom.dcmread(f, stop_before_pixels=True) if f is not None else None
        except (OSError, pydicom.errors.InvalidDicomError, DecodeError):
            src = None
        if src is None or "SOPInstanceUID" not in src or "Rows" not in src:
            _skip(summary, "not from a DICOM file (seg needs the source DICOM)")
            continue
        if (int(src.Rows), int(src.Columns)) != (it.height, it.width):
            _skip(summary, "masks and source DICOM differ in size")
            continue
        digest = hashlib.sha256()
        for s in STRUCTURES:
            if s in it.masks:
                digest.update(s.encode() + it.masks[s][0] + it.reviewers.get(s, "").encode())
        uid = pydicom.uid.generate_uid(entropy_srcs=[str(src.SOPInstanceUID), it.model, str(it.sha256),
                                                     digest.hexdigest()])
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
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID") if k not in src]
        if missing:
            _skip(summary, f"source DICOM lacks {', '.join(missing)}")
            continue
        for keyword in TYPE2:  # empty where the source leaves them out (the SEG must carry them)
            if keyword not in src:
                setattr(src, keyword, "")
        try:
            seg = _segmentation(src, it, uid, names)
        except (ValueError, TypeError, AttributeError) as e:
            _skip(summary, f"DICOM SEG could not be made ({type(e).__name__}: {str(e)[:120]})")
            continue
        with _written(path) as tmp:
            seg.save_as(tmp)
        summary.written += 1


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
    return hd.seg.Segmentation(
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("cxrlabel")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- entry point


def export(engine: Engine, fmt: str, out: str | Path, selection: Selection, model: str = "default",
           reviewed: bool = False, include_rejected: bool = False, progress: bool = True) -> ExportSummary:
    """Export the selection's masks as ``fmt`` (:data:`FORMATS`) to ``out`` (a CSV file for
    ``rle``, a folder otherwise)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    out = Path(out)
    check_destination(fmt, out)
    summary = ExportSummary(out)
    bar = tqdm(items(engine, selection, model, reviewed, include_rejected, summary), total=len(selection.items),
               desc=f"export {fmt}", unit="img", disable=not progress)
    with engine.connect() as conn:
        older = heart_definition(conn, model) != "heart"
    names = {s: (CARDIOMEDIASTINUM if older and s == "heart" else s) for s in STRUCTURES}
    with _terminate_as_interrupt():
        {"rle": export_rle, "png": export_png, "seg": export_seg}[fmt](iter(bar), out, summary, names)
    return summary

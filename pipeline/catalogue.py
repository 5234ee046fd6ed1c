"""Stage 1: load clinic metadata into the ``images`` table.

Every loader yields :class:`Record` items (a row for ``images``) or :class:`Problem` items
(a malformed row, with file and line); :func:`store` writes them in batches, one
transaction each, upserting by uid, so a re-run updates rather than duplicates. A source
that is not the declared format fails in ``check_*`` before anything is written.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import gzip
import io
import logging
import os
import re
import stat
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import bindparam, column, func, or_, select, table, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError, process_pool
from pipeline import db as D

log = logging.getLogger(__name__)

IMAGE_FIELDS = tuple(c.name for c in D.images.columns if c.name != "loaded_at")
NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
               "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
               "OriginalImagePixelSpacing[x", "y]"]
MAX_AGE = 120


class CatalogueError(CxrlabelError):
    pass


class RowError(ValueError):
    """A value in one row that cannot be stored (the row goes to ``load_errors``)."""


@dataclass
class Problem:
    line: int | None
    uid: str | None
    reason: str


Record = dict
Item = Record | Problem


@dataclass
class LoadSummary:
    source_file: str
    loaded: int = 0
    errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add_problem(self, reason: str) -> None:
        self.errors += 1
        key = reason.split(":")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1


# ---------------------------------------------------------------- value parsing

_AGE = re.compile(r"^\s*(\d{1,3})\s*([YMWD]?)\s*$", re.I)


def parse_age(value: str | None) -> int | None:
    """'58', '058Y', '006M', '3W', '10D' -> whole years; '' -> None; else :class:`RowError`."""
    if value is None or not str(value).strip():
        return None
    m = _AGE.match(str(value))
    if not m:
        raise RowError(f"unparseable age {value!r}")
    n, unit = int(m.group(1)), m.group(2).upper() or "Y"
    years = {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[unit]
    if years > MAX_AGE:
        raise RowError(f"impossible age {value!r} (over {MAX_AGE} years)")
    return years


_SEX = {"m": "M", "male": "M", "м": "M", "муж": "M", "f": "F", "female": "F", "ж": "F",
        "жен": "F", "o": "O", "other": "O"}


def parse_sex(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    sex = _SEX.get(value.strip().lower().rstrip("."))
    if sex is None:
        raise RowError(f"unknown sex {value!r} (expected M/F/O)")
    return sex


_DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%d.%m.%Y", "%Y/%m/%d")


def parse_date(value: str | None) -> str | None:
    """DICOM ``YYYYMMDD``, ISO, or European ``DD.MM.YYYY`` -> ISO ``YYYY-MM-DD``."""
    if value is None or not value.strip():
        return None
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(value.strip()[:10], fmt).date().isoformat()
        except ValueError:
            continue
    raise RowError(f"unparseable date {value!r} (use YYYY-MM-DD, YYYYMMDD or DD.MM.YYYY)")


def parse_float(value: str | None, what: str) -> float | None:
    if value is None or not str(value).strip():
        return None
    try:
        v = float(value)
    except ValueError as e:
        raise RowError(f"unparseable {what} {value!r}") from e
    return v if v > 0 else None


def parse_int(value: str | None, what: str) -> int | None:
    v = parse_float(value, what)
    return int(v) if v is not None else None


# ---------------------------------------------------------------- storing


def store(engine: Engine, items: Iterable[Item], source_file: str, batch_size: int = 5000,
          progress: bool = True) -> LoadSummary:
    """Upsert records and log problems, ``batch_size`` items per transaction."""
    summary = LoadSummary(source_file)
    bar = tqdm(desc=f"load {Path(source_file).name}", unit="row", disable=not progress)
    batch: dict[str, Record] = {}
    problems: list[Problem] = []
    lines: dict[str, int | None] = {}
    try:
        for item in items:
            if isinstance(item, Problem):
                problems.append(item)
            else:
                uid = item["uid"]
                if uid in batch:
                    problems.append(Problem(item.get("_line"), uid, f"duplicate uid: also at line "
                                            f"{lines[uid]}; this later row wins"))
                batch[uid] = item
                lines[uid] = item.get("_line")
            if len(batch) + len(problems) >= batch_size:
                _flush(engine, batch, problems, summary)
                bar.update(len(batch) + len(problems))
                batch, problems, lines = {}, [], {}
    finally:  # a source that breaks half-way (a truncated file) keeps what was read before
        bar.update(len(batch) + len(problems))
        _flush(engine, batch, problems, summary)
        bar.close()
    return summary


def _flush(engine: Engine, batch: dict[str, Record], problems: list[Problem],
           summary: LoadSummary) -> None:
    now = D.utcnow()
    # only the fields this source provides: a reload never blanks columns another source set
    fields = sorted({k for record in batch.values() for k in record if k in IMAGE_FIELDS})
    get = dict.get
    rows = []
    for record in batch.values():
        row = {k: get(record, k) for k in fields}
        row["loaded_at"] = now
        rows.append(row)
    with engine.begin() as conn:
        D.upsert(conn, D.images, rows, ["uid"])
        # one row per problem and source line: a reload renews it rather than repeating it
        logged = {(p.line or 0, p.uid or ""): p.reason for p in problems}
        D.upsert(conn, D.load_errors, [
            {"source_file": summary.source_file, "line": line, "uid": uid, "reason": reason,
             "created_at": now, "last_seen_at": now} for (line, uid), reason in logged.items()],
            ["source_file", "line", "uid"], update=["reason", "last_seen_at"])
    summary.loaded += len(rows)
    for p in problems:
        summary.add_problem(p.reason)


# ---------------------------------------------------------------- CSV reading


def _open_bytes(path: Path) -> io.BufferedIOBase:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")  # type: ignore[return-value]


def _decoded_lines(raw: Iterable[bytes], encoding: str, bad: set[int]) -> Iterator[str]:
    for n, line in enumerate(raw, start=1):
        try:
            yield line.decode(encoding)
        except UnicodeDecodeError:
            bad.add(n)
            yield line.decode(encoding, errors="replace")


def read_csv(path: Path, encoding: str = "utf-8", delimiter: str = ",",
             ) -> tuple[list[str], Iterator[tuple[int, dict[str, str] | Problem]]]:
    """Header and a stream of ``(line, row)`` or ``(line, Problem)`` for a (gzipped) CSV.

    Wrong column counts and undecodable bytes become problems; quoted newlines are fine.
    """
    path = Path(path)
    if path.is_dir():
        raise CatalogueError(f"{path} is a folder: this format takes one CSV file (a folder of DICOM "
                             "files loads with `catalogue load dicom`)")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CatalogueError(f"--encoding {encoding!r}: unknown text encoding; e.g. utf-8, cp1251, latin-1") from None
    delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    if len(delimiter) != 1:
        raise CatalogueError(f"--delimiter {delimiter!r}: one character, e.g. ',' ';' or '\\t' for a tab")
    f = _open_bytes(path)
    bad: set[int] = set()
    lines = _decoded_lines(f, encoding, bad)
    if encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        lines = (line.lstrip("\ufeff") if i == 0 else line for i, line in enumerate(lines))
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        raise CatalogueError(f"{path}: empty file") from None
    except (csv.Error, EOFError, OSError, zlib.error) as e:
        f.close()
        raise CatalogueError(f"{path}: not a readable CSV file ({e or type(e).__name__})") from e

    def rows() -> Iterator[tuple[int, dict[str, str] | Problem]]:
        start = reader.line_num + 1
        try:
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz
                    raise CatalogueError(
                        f"{path} is truncated or damaged after line {start - 1} ({e or type(e).__name__}): "
                        "the rows before it are loaded; restore the file and load it again "
                        "(loaded rows are updated, not duplicated)") from e
                except csv.Error as e:
                    yield start, Problem(start, None, f"malformed CSV: {e}")
                    start = reader.line_num + 1
                    continue
                end = reader.line_num
                if not values:
                    start = end + 1
                    continue
                if any(n in bad for n in range(start, end + 1)):
                    yield start, Problem(start, values[0] or None,
                                         f"bad encoding: bytes not valid {encoding}")
                elif len(values) != len(header):
                    yield start, Problem(start, values[0] or None,
                                         f"wrong column count: {len(values)} instead of {len(header)}")
                else:
                    yield start, dict(zip(header, values, strict=True))
                start = end + 1
        finally:
            f.close()

    return header, rows()


def _rows_to_items(rows: Iterator[tuple[int, dict[str, str] | Problem]],
                   convert: Callable[[dict[str, str]], Record]) -> Iterator[Item]:
    for line, row in rows:
        if isinstance(row, Problem):
            yield row
            continue
        try:
            record = convert(row)
        except RowError as e:
            yield Problem(line, _first_value(row), str(e))
            continue
        if not record.get("uid"):
            yield Problem(line, None, "missing uid")
            continue
        if bad_uid := _uid_problem(record["uid"]):
            yield Problem(line, None, bad_uid)
            continue
        record["_line"] = line
        yield record


def _uid_problem(uid: str) -> str | None:
    """Why ``uid`` cannot identify an image (control characters, too long), or None."""
    if any(ord(c) < 32 or ord(c) == 127 for c in uid):
        return f"uid {uid!r} contains control characters (a NUL byte, a newline...)"
    if len(uid) > 200:
        return f"uid of {len(uid)} characters: at most 200"
    return None


def _first_value(row: dict[str, str]) -> str | None:
    return next(iter(row.values()), None) or None


def _file_index(root: Path | None, relative_to: Path) -> Callable[[str], str]:
    """Resolve a file name to an absolute path: under ``root`` (any depth), e.g. NIH's
    ``images_001/images/``; without ``root``, a relative name is taken from ``relative_to``
    (the catalogue file's own folder), never from wherever the command happens to run. An
    absolute path stays as it is. Stored paths are absolute so that any folder can run the
    next stages (and ``catalogue reroot`` moves them)."""
    if root is None:
        base = Path(relative_to).resolve()
        return lambda name: name if os.path.isabs(name) else str(base / name)
    root = Path(root).resolve()
    if not root.is_dir():
        raise CatalogueError(f"--image-root {root} is not a folder")
    index: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            index.setdefault(name, os.path.join(dirpath, name))
    return lambda name: index.get(name, str(root / name))


# ---------------------------------------------------------------- NIH


def load_nih(engine: Engine, source: Path, image_root: Path | None = None,
             progress: bool = True) -> LoadSummary:
    """NIH ChestX-ray14 ``Data_Entry_2017*.csv[.gz]``."""
    header, rows = read_csv(source)
    missing = [c for c in NIH_COLUMNS[:7] if c not in header]
    if missing:
        raise CatalogueError(f"{source}: not an NIH Data_Entry CSV (missing columns {missing}); "
                             "for another CSV use `catalogue load csv --map ...`")
    resolve = _file_index(image_root, Path(source).parent)

    def convert(r: dict[str, str]) -> Record:
        name = r["Image Index"].strip()
        labels = r["Finding Labels"].strip()
        return {
            "uid": os.path.splitext(name)[0], "source": "nih", "patient_id": r["Patient ID"].strip() or None,
            "age": parse_age(r["Patient Age"]), "sex": parse_sex(r["Patient Gender"]),
            "view": r["View Position"].strip() or None, "labels": labels,
            "text": labels.replace("|", ", "), "path": resolve(name) if name else None,
            "width": parse_int(r.get("OriginalImage[Width"), "width"),
            "height": parse_int(r.get("Height]"), "height"),
            "spacing_x": parse_float(r.get("OriginalImagePixelSpacing[x"), "pixel spacing"),
            "spacing_y": parse_float(r.get("y]"), "pixel spacing"),
            # of the original (OriginalImage[Width, Height]): labelling scales it to the file's pixels
            "spacing_source": "OriginalImagePixelSpacing",
            "modality": "DX",
        }

    return store(engine, _rows_to_items(rows, convert), str(source), progress=progress)


# ---------------------------------------------------------------- generic CSV

CSV_FIELDS = ("uid", "patient_id", "age", "sex", "view", "study_date", "text", "labels", "path",
              "width", "height", "spacing_x", "spacing_y", "modality", "body_part",
              "study_uid", "sop_uid", "study_description", "reference", "license")


def parse_mapping(pairs: Iterable[str]) -> dict[str, str]:
    """``["uid=Image", "text=Report"]`` -> ``{"uid": "Image", "text": "Report"}``, checked."""
    mapping = {}
    for pair in pairs:
        key, sep, col = pair.partition("=")
        if not sep or not col:
            raise CatalogueError(f"--map {pair!r}: expected FIELD=COLUMN, e.g. --map uid=ImageID")
        if key not in CSV_FIELDS:
            raise CatalogueError(f"--map {pair!r}: unknown field {key!r}; fields: {', '.join(CSV_FIELDS)}")
        mapping[key] = col
    if "uid" not in mapping:
        raise CatalogueError("--map uid=COLUMN is required: which column identifies an image")
    return mapping


def load_csv(engine: Engine, source: Path, mapping: dict[str, str], image_root: Path | None = None,
             encoding: str = "utf-8", delimiter: str = ",", source_name: str = "csv",
             progress: bool = True) -> LoadSummary:
    """Any clinic CSV export, with ``mapping`` field -> column (see :func:`parse_mapping`)."""
    header, rows = read_csv(source, encoding, delimiter)
    missing = [c for c in mapping.values() if c not in header]
    if missing:
        raise CatalogueError(f"{source}: columns {missing} not in the header {header[:12]}; "
                             "check --map, --delimiter and --encoding")
    twice = sorted({c for c in mapping.values() if header.count(c) > 1})
    if twice:
        raise CatalogueError(f"{source}: the header names column(s) {twice} more than once: rename them "
                             "so that each --map column is unambiguous")
    resolve = _file_index(image_root, relative_to=Path(source).parent)
    parsers: dict[str, Callable[[str], object]] = {
        "age": parse_age, "sex": parse_sex, "study_date": parse_date,
        "width": lambda v: parse_int(v, "width"), "height": lambda v: parse_int(v, "height"),
        "spacing_x": lambda v: parse_float(v, "pixel spacing"),
        "spacing_y": lambda v: parse_float(v, "pixel spacing"),
        "path": lambda v: resolve(v) if v else None,
    }

    def convert(r: dict[str, str]) -> Record:
        record: Record = {"source": source_name}
        for key, col in mapping.items():
            value = r[col].strip()
            parse = parsers.get(key)
            record[key] = parse(value) if parse else (value or None)
        if record.get("spacing_x") or record.get("spacing_y"):
            record["spacing_source"] = f"CSV column {mapping.get('spacing_x') or mapping.get('spacing_y')}"
        return record

    return store(engine, _rows_to_items(rows, convert), str(source), progress=progress)


# ---------------------------------------------------------------- DICOM headers


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
        (sy, sx), spacing_source = dicom_spacing(ds)
        record = {
            "uid": rel, "source": "dicom", "path": path,
            "patient_id": str(ds.get("PatientID", "")) or None,
            "study_uid": str(ds.get("StudyInstanceUID", "")) or None,
            "sop_uid": str(ds.get("SOPInstanceUID", "")) or None,
            "study_date": parse_date(str(ds.get("StudyDate", ""))),
            "modality": str(ds.get("Modality", "")) or None,
            "body_part": str(ds.get("BodyPartExamined", "")) or None,
            "view": str(ds.get("ViewPosition", "")) or None,
            "sex": parse_sex(str(ds.get("PatientSex", ""))),
            "age": parse_age(str(ds.get("PatientAge", ""))),
            "height": int(ds.Rows) if "Rows" in ds else None,
            "width": int(ds.Columns) if "Columns" in ds else None,
            "photometric": str(ds.get("PhotometricInterpretation", "")) or None,
            "spacing_x": sx, "spacing_y": sy, "spacing_source": spacing_source,
            "study_description": str(ds.get("StudyDescription", "")) or None,
        }
    except Exception as e:  # also pydicom's own types: it parses each element when first read,
        # and a damaged one (an unknown value representation, a value cut short) raises there
        return Problem(None, rel, f"{rel}: {e}")
    return record


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
    pixel, imager = pair("PixelSpacing"), pair("ImagerPixelSpacing")
    if pixel and min(pixel) > 0:
        return pixel, "PixelSpacing"
    if imager and min(imager) > 0:
        try:
            factor = float(ds.get("EstimatedRadiographicMagnificationFactor") or 0)
        except (TypeError, ValueError):
            factor = 0.0
        if factor >= 1.0:
            return (imager[0] / factor, imager[1] / factor), f"ImagerPixelSpacing / magnification {factor:g}"
        return imager, "ImagerPixelSpacing (at the detector: magnified)"
    zero = "PixelSpacing" if pixel else "ImagerPixelSpacing" if imager else None
    return (None, None), f"none: {zero} is 0" if zero else "none in the header"


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


# ---------------------------------------------------------------- OpenI


def load_openi(engine: Engine, source: Path, image_root: Path | None = None,
               progress: bool = True) -> LoadSummary:
    """OpenI ``NLMCXR_reports.tgz``: FINDINGS + IMPRESSION per parent image, MeSH as reference."""
    try:
        tar = tarfile.open(source, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise CatalogueError(f"{source}: not a tar archive of OpenI reports ({e})") from e
    members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")]
    if not members:
        tar.close()
        raise CatalogueError(f"{source}: no XML reports inside; expected NLMCXR_reports.tgz")
    resolve = _file_index(image_root, Path(source).parent)

    def items() -> Iterator[Item]:
        with tar:
            for member in sorted(members, key=lambda m: m.name):
                f = tar.extractfile(member)
                try:
                    root = ET.parse(f).getroot()  # type: ignore[arg-type]
                except ET.ParseError as e:
                    yield Problem(None, member.name, f"malformed XML: {e}")
                    continue
                yield from _openi_report(root, member.name, resolve)

    return store(engine, items(), str(source), progress=progress)


def _openi_report(root: ET.Element, name: str, resolve: Callable[[str], str]) -> Iterator[Item]:
    sections = {el.get("Label"): (el.text or "").strip() for el in root.iter("AbstractText")}
    text = " ".join(s for s in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if s)
    mesh = "; ".join((el.text or "").strip() for el in root.iter("major"))
    uid_el = root.find("uId")
    report_id = uid_el.get("id") if uid_el is not None else Path(name).stem
    parents = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
    if not parents:
        yield Problem(None, report_id, f"{name}: report has no image (parentImage)")
        return
    for image_id in parents:
        yield {"uid": image_id, "source": "openi", "patient_id": report_id, "text": text or None,
               "reference": mesh or None, "path": resolve(f"{image_id}.png"), "modality": "CR"}


# ---------------------------------------------------------------- by format, and listings


@dataclass
class LoadOptions:
    """Every loader's options (the ``catalogue load`` command's); each loader reads its own."""

    image_root: Path | None = None
    mapping: tuple[str, ...] = ()  # csv: FIELD=COLUMN pairs
    encoding: str = "utf-8"
    delimiter: str = ","
    source_name: str = "csv"
    workers: int | None = None
    uid_from: str = "path"
    text_csv: Path | None = None
    text_key: str = "sop_uid"
    text_key_column: str | None = None
    text_column: str = "text"


LOADERS: dict[str, Callable[[Engine, Path, LoadOptions], LoadSummary]] = {
    "nih": lambda engine, source, o: load_nih(engine, source, o.image_root),
    "openi": lambda engine, source, o: load_openi(engine, source, o.image_root),
    "dicom": lambda engine, source, o: load_dicom(engine, source, o.workers, o.uid_from, o.text_csv,
                                                  o.text_key, o.text_column, o.text_key_column),
    "csv": lambda engine, source, o: load_csv(engine, source, parse_mapping(o.mapping), o.image_root,
                                              o.encoding, o.delimiter, o.source_name),
}


def load(engine: Engine, fmt: str, source: Path, options: LoadOptions | None = None) -> LoadSummary:
    """Load ``source`` as ``fmt`` (one of :data:`LOADERS`)."""
    if fmt not in LOADERS:  # (MONAI's look_up_option would import torch for one dict look-up)
        raise CatalogueError(f"unknown catalogue format {fmt!r}: use one of {', '.join(LOADERS)}")
    return LOADERS[fmt](engine, Path(source), options or LoadOptions())


@dataclass
class RerootSummary:
    changed: int
    existing: int  # of the changed rows, how many new paths lead to a file


REROOT_PROBE = 100  # new paths checked before a reroot is committed


def reroot(engine: Engine, old: str, new: str, progress: bool = True, force: bool = False) -> RerootSummary:
    """Move an archive in the catalogue: every image path under the folder ``old`` now lies
    under ``new`` instead (whole path components only), in one transaction. Refused, with
    nothing changed, when none of up to :data:`REROOT_PROBE` of the new paths leads to a file
    (a mistyped ``new``), unless ``force``."""
    if not str(old):
        raise CatalogueError("reroot: OLD_PREFIX is empty: give the folder the paths start with")
    base, new = str(old).rstrip("/"), str(Path(new).resolve())  # base "" is the root folder
    t = D.images
    with engine.begin() as conn:
        # only the rows under it come back (a prefix the database can compare), then exactly
        under = func.substr(t.c.path, 1, len(base) + 1) == base + "/"
        rows = conn.execute(select(t.c.uid, t.c.path).where(or_(t.c.path == base, under))).all()
        moved = {uid: new + path[len(base):] for uid, path in rows}
        paths = list(moved.values())
        probe = paths[::max(1, len(paths) // REROOT_PROBE)][:REROOT_PROBE]
        if probe and not force and not any(os.path.isfile(p) for p in probe):
            raise CatalogueError(f"reroot: none of {len(probe)} of the {len(paths)} new paths under {new} leads to "
                                 f"a file (e.g. {probe[0]}): nothing changed; check NEW_PREFIX, or give --force "
                                 "to move them anyway")
        for part in D.chunks(list(moved.items())):
            conn.execute(update(t).where(t.c.uid == bindparam("u")).values(path=bindparam("p")),
                         [{"u": uid, "p": path} for uid, path in part])
    existing = sum(os.path.exists(p) for p in tqdm(moved.values(), desc="check paths", unit="path",
                                                   disable=not progress or not moved))
    return RerootSummary(len(moved), existing)


def list_errors(engine: Engine, limit: int = 50) -> list[dict]:
    """Malformed rows recorded by loads (``load_errors``), newest first."""
    t = D.load_errors
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.source_file, t.c.line, t.c.uid, t.c.reason, t.c.last_seen_at)
                            .order_by(t.c.id.desc()).limit(limit))
        return [{**r._mapping, "line": r.line or None, "uid": r.uid or None} for r in rows]


CATALOGUE_VIEW = table("catalogue", *(column(c) for c in (
    "uid", "patient_id", "age", "sex", "view", "study_date", "group_name", "source", "text")))


def list_rows(engine: Engine, uids: list[str]) -> list[dict]:
    """Rows of the ``catalogue`` view for ``uids``, by uid."""
    v = CATALOGUE_VIEW
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in D.rows_in(conn, select(*v.c), v.c.uid, uids)]
    return sorted(rows, key=lambda r: r["uid"])

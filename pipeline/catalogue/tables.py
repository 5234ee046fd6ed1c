"""Catalogues as CSV files (plain or gzip, any common encoding): the NIH catalogue, and a
clinic's own CSV mapped onto the catalogue's fields."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sqlalchemy.engine import Engine

from pipeline.catalogue.records import (
    NIH_COLUMNS,
    CatalogueError,
    Item,
    LoadSummary,
    Problem,
    Record,
    RowError,
    parse_age,
    parse_date,
    parse_float,
    parse_int,
    parse_sex,
    store,
)
from pipeline.regular import open_regular


def _open_bytes(path: Path) -> io.BufferedIOBase:
    """The table's bytes, gunzipped when it is gzip; a CatalogueError for anything but a
    regular file (a FIFO in its place is refused, never waited on)."""
    f = open_regular(path, CatalogueError, only="give the table's file itself")
    gz = f.read(2) == b"\x1f\x8b"
    f.seek(0)
    return gzip.GzipFile(fileobj=f, mode="rb") if gz else f  # type: ignore[return-value]


def _decoded_lines(raw: Iterable[bytes], encoding: str, bad: set[int]) -> Iterator[str]:
    for n, line in enumerate(raw, start=1):
        try:
            yield line.decode(encoding)
        except UnicodeDecodeError:
            bad.add(n)
            yield line.decode(encoding, errors="replace")


def _check_encoding(encoding: str) -> None:
    """A CatalogueError for an ``--encoding`` that is no text file's: unknown, a transform
    (rot13, base64, hex), or one for host names (punycode, idna)."""
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise CatalogueError(f"--encoding {encoding!r}: unknown text encoding; e.g. utf-8, cp1251, latin-1") from None
    if not getattr(codec, "_is_text_encoding", True) or codec.name in ("punycode", "idna"):
        raise CatalogueError(f"--encoding {encoding!r}: not a text file's encoding; e.g. utf-8, cp1251, latin-1")


def read_csv(path: Path, encoding: str = "utf-8", delimiter: str = ",",
             ) -> tuple[list[str], Iterator[tuple[int, dict[str, str] | Problem]]]:
    """Header and a stream of ``(line, row)`` or ``(line, Problem)`` for a (gzipped) CSV.

    Wrong column counts and undecodable bytes become problems; quoted newlines are fine.
    """
    path = Path(path)
    if path.is_dir():
        raise CatalogueError(f"{path} is a folder: this format takes one CSV file (a folder of DICOM "
                             "files loads with `catalogue load dicom`)")
    _check_encoding(encoding)
    delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    if len(delimiter) != 1:
        raise CatalogueError(f"--delimiter {delimiter!r}: one character, e.g. ',' ';' or '\\t' for a tab")
    f = _open_bytes(path)
    bad: set[int] = set()
    lines = _decoded_lines(f, encoding, bad)
    if encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        lines = (line.lstrip("\ufeff") if i == 0 else line for i, line in enumerate(lines))
    # strict: a quote never closed (it swallowed the rest of the file) or text after a closing quote
    # is a malformed row with its reason, never a row whose last field holds the lines after it
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        raise CatalogueError(f"{path}: empty file") from None
    except (csv.Error, EOFError, OSError, zlib.error) as e:
        f.close()
        raise CatalogueError(f"{path}: not a readable CSV file ({e or type(e).__name__})") from e

    return header, _rows(reader, header, f, bad, path, encoding)


def _rows(reader, header: list[str], f, bad: set[int], path: Path, encoding: str,
          ) -> Iterator[tuple[int, dict[str, str] | Problem]]:
    """:func:`read_csv`'s rows after the header, each ``(line, row)`` or ``(line, Problem)``
    (``bad``: the lines whose bytes did not decode); ``f`` is closed at the end."""
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
                why = (f"a quote opened on line {start} never closes (every line after it is inside it)"
                       if "unexpected end of data" in str(e) else str(e))
                yield start, Problem(start, None, f"malformed CSV: {why}")
                start = reader.line_num + 1
                continue
            end = reader.line_num
            if not values:
                start = end + 1
                continue
            if any(n in bad for n in range(start, end + 1)):
                yield start, Problem(start, values[0] or None, f"bad encoding: bytes not valid {encoding}")
            elif len(values) != len(header):
                yield start, Problem(start, values[0] or None,
                                     f"wrong column count: {len(values)} instead of {len(header)}")
            else:
                yield start, dict(zip(header, values, strict=True))
            start = end + 1
    finally:
        f.close()


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

"""What a loader yields (:class:`Record`, :class:`Problem`), the values it parses (age, sex,
date, numbers), and :func:`store`, which writes them in batches, one transaction each."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Float, Integer, select
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D

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
    kept: bool = False  # a note on a row that loaded all the same (a junk field left out of it)


Record = dict

Item = Record | Problem


@dataclass
class LoadSummary:
    source_file: str
    loaded: int = 0
    errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    kept: int = 0  # already in the catalogue and left as they were (a PACS's instances loaded again)
    notes: dict[str, int] = field(default_factory=dict)  # fields left out of rows that loaded, by reason
    started: dt.datetime | None = None  # when the load began: a uid loaded since is a duplicate of this load

    def add_problem(self, reason: str, kept: bool = False) -> None:
        key = reason.split(":")[0]
        if kept:
            self.notes[key] = self.notes.get(key, 0) + 1
            return
        self.errors += 1
        self.reasons[key] = self.reasons.get(key, 0) + 1


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


def store(engine: Engine, items: Iterable[Item], source_file: str, batch_size: int = 5000,
          progress: bool = True) -> LoadSummary:
    """Upsert records and log problems, ``batch_size`` items per transaction."""
    summary = LoadSummary(source_file, started=D.utcnow())
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
                problems += [Problem(item.get("_line"), uid, note, kept=True) for note in item.pop("_notes", ())]
            if len(batch) + len(problems) >= batch_size:
                _flush(engine, batch, problems, summary)
                bar.update(len(batch) + len(problems))
                batch, problems, lines = {}, [], {}
    finally:  # a source that breaks half-way (a truncated file) keeps what was read before
        bar.update(len(batch) + len(problems))
        _flush(engine, batch, problems, summary)
        bar.close()
    return summary


INT_RANGE = (-(2 ** 31), 2 ** 31 - 1)  # an Integer column on PostgreSQL; SQLite's hold more, so the same limit


def unstorable(record: Record) -> str | None:
    """Why one record cannot be stored as it is, by the ``images`` table's own column types,
    the same on both databases (None: it can): text longer than its column or holding NUL,
    a whole number outside 32 bits, a real number that is not finite. Checked before the
    write, so one bad value is one row of ``load_errors``, never its batch's loss."""
    for name, value in record.items():
        column = D.images.columns.get(name)
        if column is None or value is None:
            continue
        kind = column.type
        if isinstance(value, str):
            if "\x00" in value:
                return f"{name} holds a NUL character"
            length = getattr(kind, "length", None)
            if length is not None and len(value) > length:
                return f"{name} is {len(value)} characters, more than the {length} it may hold: {value[:40]!r}..."
        elif isinstance(kind, Integer) and isinstance(value, int | float):
            if not (math.isfinite(value) and INT_RANGE[0] <= value <= INT_RANGE[1]):
                return f"{name} {value!r} is outside the whole numbers a database column holds"
        elif isinstance(kind, Float) and isinstance(value, float) and not math.isfinite(value):
            return f"{name} {value!r} is not a finite number"
    return None


def _flush(engine: Engine, batch: dict[str, Record], problems: list[Problem],
           summary: LoadSummary) -> None:
    now = D.utcnow()
    for uid in list(batch):
        if (why := unstorable(batch[uid])) is not None:
            problems.append(Problem(batch[uid].get("_line"), uid, f"left out: {why}"))
            del batch[uid]
    if summary.started is not None and batch:  # a uid an earlier batch of this same load stored
        with engine.connect() as conn:
            again = D.rows_in(conn, select(D.images.c.uid).where(D.images.c.loaded_at >= summary.started),
                              D.images.c.uid, list(batch))
            problems += [Problem(batch[uid].get("_line"), uid, "duplicate uid: also earlier in this load; "
                                 "this later row wins") for (uid,) in again]
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
        logged: dict[tuple[int, str], str] = {}  # load_errors.uid holds 200; one row per line and uid
        for p in problems:
            key = (p.line or 0, (p.uid or "")[:200])
            logged[key] = f"{logged[key]}; {p.reason}" if key in logged else p.reason
        D.upsert(conn, D.load_errors, [
            {"source_file": summary.source_file, "line": line, "uid": uid, "reason": reason,
             "created_at": now, "last_seen_at": now} for (line, uid), reason in logged.items()],
            ["source_file", "line", "uid"], update=["reason", "last_seen_at"])
    summary.loaded += len(rows)
    for p in problems:
        summary.add_problem(p.reason, p.kept)

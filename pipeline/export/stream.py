"""The masks an export streams, one image at a time: the model's, or as people left them, with
rejected ones left out unless asked."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline.groups import Selection
from pipeline.masks import decode, rle_of
from pipeline.review import latest_reviews

CHUNK = 500


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


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def cell(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows as text: one starting as a formula does
    (:data:`FORMULA_STARTS`: a uid ``=HYPERLINK(...)``) gets a leading apostrophe, as OWASP's
    guidance on CSV injection asks; every other text is written as it is."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def uncell(text: str) -> str:
    """The text a :func:`cell` holds."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text


MAX_NAME = 200  # characters of a file name made from a uid (file systems hold 255 bytes)


def safe_name(uid: str) -> str:
    """A file name for a uid: its safe characters, plus a short digest where any were changed
    or it was cut to :data:`MAX_NAME` (two uids never share a name)."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", uid).strip(".")[:MAX_NAME] or "_"
    return clean if clean == uid else f"{clean}-{hashlib.sha256(uid.encode()).hexdigest()[:8]}"

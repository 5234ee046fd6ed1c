"""People review the model's masks: the worklist, one image's contours, and saved decisions.

What ``cxrlabel review`` (the web app, :mod:`pipeline.webapp`) reads and writes, kept free of
the web layer so that it is tested and used directly:

* :func:`worklist`: a model's labelled images, least trusted first (the score's trust, else
  its quality), with filters (group, sample, view, CTR range, quality range, reviewed or not)
  and counts;
* :func:`image_view`: one image's contours (as polygons in original pixels), measurements,
  quality and review history;
* :func:`save`: a decision (accepted, rejected) on the whole image or one structure, or a
  correction (a structure redrawn as polygons). Corrections are stored as masks of kind
  ``reviewed`` in original geometry, never over the model's own; every decision is a row of
  ``reviews``; the measurements from the reviewed masks update ``measurements.reviewed_*``.

Concurrency: saves of one image are serialised (SQLite's write lock is taken at ``BEGIN
IMMEDIATE``, PostgreSQL locks the image's ``measurements`` row), and each is checked inside
that lock. A save names the version it saw (the image's latest decision number); a save over
a structure that somebody else saved since is refused with who, what and when
(:class:`ReviewConflict`, HTTP 409), while saves of other structures merge. The reviewed
measurements are computed inside the same transaction from the masks as finally stored and
the decisions that stand, so they always agree with them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import cv2
import numpy as np
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.imaging import decode
from pipeline.masks import MASK_KEYS, STRUCTURES, mask_row
from pipeline.masks import decode as decode_mask
from pipeline.measure import measure

DECISIONS = ("accepted", "rejected", "corrected")
MAX_VERTICES = 5000  # per polygon: far beyond a drawn outline, short of a request that hurts
DISPLAY_SIDE = 1024  # the longest side of the image the browser shows


class ReviewError(CxrlabelError):
    pass


class ImageMissing(ReviewError):
    """The image's file cannot be read (moved, deleted, unreadable)."""


class ReviewConflict(ReviewError):
    """Somebody saved this image's structure after the version this save started from;
    ``changed``: those later saves (structure, decision, reviewer, at)."""

    def __init__(self, message: str, changed: Sequence[dict] = ()):
        super().__init__(message)
        self.changed = list(changed)


@dataclass(frozen=True)
class Filters:
    """Which labelled images a worklist shows (every field optional)."""

    group: str | None = None
    sample: str | None = None
    view: str | None = None  # PA, AP, LL...; 'unknown' for none recorded
    ctr_min: float | None = None
    ctr_max: float | None = None
    quality_min: float | None = None
    quality_max: float | None = None
    reviewed: bool | None = None  # True: only reviewed; False: only not yet


def _latest_decision(model_col, uid_col):
    """The latest whole-image-or-structure decision on an image's masks by a model (SQL)."""
    r = D.reviews
    return (select(r.c.decision).where(r.c.uid == uid_col, r.c.model == model_col)
            .order_by(r.c.version.desc(), r.c.id.desc()).limit(1).scalar_subquery())


def _selection(model: str, f: Filters):
    m, i, g = D.measurements, D.images, D.groups
    state = _latest_decision(m.c.model, m.c.uid).label("review")
    view = func.coalesce(func.upper(i.c.view), "UNKNOWN").label("view")
    q = (select(m.c.uid, g.c.group_name, view, m.c.ctr, m.c.quality, m.c.quality_heart, m.c.quality_left_lung,
                m.c.quality_right_lung, m.c.trust, m.c.reviewed_ctr, m.c.input_check, state)
         .join(i, i.c.uid == m.c.uid).join(g, g.c.uid == m.c.uid, isouter=True).where(m.c.model == model))
    if f.group:
        q = q.where(g.c.group_name == f.group)
    if f.sample:
        q = q.join(D.samples, and_(D.samples.c.uid == m.c.uid, D.samples.c.name == f.sample))
    if f.view:
        q = q.where(view == f.view.upper())
    for col, lo, hi in ((m.c.ctr, f.ctr_min, f.ctr_max), (m.c.quality, f.quality_min, f.quality_max)):
        if lo is not None:
            q = q.where(col >= lo)
        if hi is not None:
            q = q.where(col <= hi)
    if f.reviewed is not None:
        reviewed = select(D.reviews.c.id).where(D.reviews.c.uid == m.c.uid, D.reviews.c.model == m.c.model).exists()
        q = q.where(reviewed if f.reviewed else ~reviewed)
    return q


def _rank():
    """The worklist's key, low first: a film's trust (0-1, :mod:`pipeline.quality.trust`)
    where its model's score gives one, then 1 + its quality (films labelled by a score
    without trust, or by the heuristic), NULL without a score."""
    m = D.measurements
    return case((m.c.trust.isnot(None), m.c.trust), else_=1.0 + m.c.quality)


def _order() -> tuple:
    """The worklist's order: least trusted first, images without a score last."""
    return _rank().is_(None), _rank(), D.measurements.c.uid


def worklist(engine: Engine, model: str, filters: Filters = Filters(), limit: int = 200,
             offset: int = 0) -> tuple[list[dict], dict[str, int]]:
    """``(rows, counts)``: the filtered images, least trusted first (no score last), and how
    many there are, reviewed, accepted, rejected and corrected."""
    q = _selection(model, filters)
    with engine.connect() as conn:
        inner = q.subquery()
        counts = {"images": 0, "reviewed": 0, **{d: 0 for d in DECISIONS}}
        for state, n in conn.execute(select(inner.c.review, func.count()).group_by(inner.c.review)):
            counts["images"] += n
            if state:
                counts["reviewed"] += n
                counts[state] = counts.get(state, 0) + n
        rows = [dict(r._mapping) for r in conn.execute(q.order_by(*_order()).limit(limit).offset(offset))]
    return rows, counts


def neighbours(engine: Engine, model: str, uid: str, filters: Filters = Filters()) -> tuple[str | None, str | None]:
    """The images before and after ``uid`` in the worklist's order (None at either end)."""
    m = D.measurements
    key = _order()
    with engine.connect() as conn:
        here = conn.execute(select(_rank().label("rank")).where(m.c.uid == uid, m.c.model == model)).first()
        if here is None:
            return None, None
        q, k = here.rank, _rank()
        if q is None:
            after = and_(k.is_(None), m.c.uid > uid)
            before = or_(k.isnot(None), m.c.uid < uid)
        else:
            after = or_(k > q, and_(k == q, m.c.uid > uid), k.is_(None))
            before = and_(k.isnot(None), or_(k < q, and_(k == q, m.c.uid < uid)))
        base = _selection(model, filters)
        nxt = conn.execute(base.where(after).order_by(*key).limit(1)).first()
        prev = conn.execute(base.where(before).order_by(*(k.desc() for k in key)).limit(1)).first()
    return (prev.uid if prev else None), (nxt.uid if nxt else None)


def polygons_of(mask: np.ndarray, detail: float = 0.003) -> list[list[list[int]]]:
    """The outlines of a mask's parts, largest first, as vertex lists in pixel coordinates,
    simplified to within ``detail`` of each outline's length (an editable number of vertices)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in sorted(contours, key=cv2.contourArea, reverse=True):
        if cv2.contourArea(c) < 4:
            continue
        simple = cv2.approxPolyDP(c, max(1.0, detail * cv2.arcLength(c, True)), True)
        if len(simple) < 3:  # a sliver: keep its outline as traced, or nothing
            if len(c) < 3:
                continue
            simple = c
        out.append(simple.reshape(-1, 2).astype(int).tolist())
    return out


MAX_COORDINATE = 1e6  # pixels: far beyond any film's side (clipped to it), short of a float's overflow


def _point(p: Any) -> bool:
    """``[x, y]``: two numbers (JSON numbers: int or float, never a bool or a string) within
    :data:`MAX_COORDINATE` (an integer of 400 digits overflows a float)."""
    return (isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            and all(-MAX_COORDINATE <= v <= MAX_COORDINATE for v in p))


def mask_of(polygons: Sequence[Sequence[Sequence[float]]], height: int, width: int) -> np.ndarray:
    """A ``(height, width)`` bool mask filled from polygons in original pixels, checked first."""
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise ReviewError("a corrected structure needs at least one polygon")
    parts = []
    for poly in polygons:
        if not isinstance(poly, (list, tuple)) or not 3 <= len(poly) <= MAX_VERTICES:
            raise ReviewError(f"a polygon needs 3 to {MAX_VERTICES} [x, y] points")
        if not all(_point(p) for p in poly):
            raise ReviewError(f"a polygon's points are [x, y] pairs of finite numbers within "
                              f"±{MAX_COORDINATE:g} pixels")
        pts = np.asarray(poly, dtype=np.float64)
        if not np.all(np.isfinite(pts)):
            raise ReviewError("polygon points must be finite numbers")
        pts[:, 0] = np.clip(pts[:, 0], 0, width - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, height - 1)
        parts.append(np.rint(pts).astype(np.int32))
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, parts, 1)
    return mask.astype(bool)


def final_masks(conn: Connection, uid: str, model: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """An image's masks as a person last left them: ``reviewed`` where corrected, the model's
    elsewhere; and which kind each structure came from."""
    t = D.masks
    rows = conn.execute(select(t.c.structure, t.c.kind, t.c.data, t.c.encoding, t.c.height, t.c.width)
                        .where(t.c.uid == uid, t.c.model == model, t.c.kind.in_(["predicted", "reviewed"]))).all()
    masks, kinds = {}, {}
    for r in sorted(rows, key=lambda r: r.kind == "reviewed"):  # reviewed after predicted: it wins
        masks[r.structure] = decode_mask(r.data, r.encoding, (r.height, r.width))
        kinds[r.structure] = r.kind
    return masks, kinds


def _history(conn: Connection, uid: str, model: str) -> list[dict]:
    r = D.reviews
    return [dict(x._mapping) for x in conn.execute(
        select(r.c.version, r.c.structure, r.c.decision, r.c.reviewer, r.c.at, r.c.note)
        .where(r.c.uid == uid, r.c.model == model).order_by(r.c.version, r.c.id))]


def image_view(engine: Engine, uid: str, model: str) -> dict:
    """What the review page shows of one image: size, polygons per structure (and whether a
    person drew them), measurements (the model's and the reviewed ones), quality, version
    and history. :class:`ReviewError` when the model has not labelled the image."""
    with engine.connect() as conn:
        m = conn.execute(select(D.measurements).where(D.measurements.c.uid == uid,
                                                      D.measurements.c.model == model)).first()
        if m is None:
            raise ReviewError(f"image {uid!r} has no labels by model {model!r}: run `cxrlabel label` first")
        img = conn.execute(select(D.images.c.width, D.images.c.height, D.images.c.spacing_x, D.images.c.view,
                                  D.images.c.spacing_y).where(D.images.c.uid == uid)).one()  # measured: catalogued
        masks, kinds = final_masks(conn, uid, model)
        history = _history(conn, uid, model)
    height, width = next(iter(masks.values())).shape if masks else (img.height, img.width)
    meas = dict(m._mapping)
    return {"uid": uid, "model": model, "width": int(width), "height": int(height), "view": img.view,
            "polygons": {s: polygons_of(masks[s]) for s in STRUCTURES if s in masks},
            "drawn_by": {s: ("person" if kinds[s] == "reviewed" else "model") for s in kinds},
            "measurements": {k: meas[k] for k in ("ctr", "heart_width_px", "thoracic_width_px", "heart_x0",
                                                  "heart_x1", "lungs_x0", "lungs_x1", "heart_y0", "heart_y1",
                                                  "quality", "quality_heart", "quality_left_lung",
                                                  "quality_right_lung", "reviewed_ctr", "reviewed_heart_width_px",
                                                  "reviewed_thoracic_width_px", "heart_width_mm",
                                                  "thoracic_width_mm", "input_check")},
            "version": max((h["version"] for h in history), default=0),
            "state": history[-1]["decision"] if history else None, "history": history}


def display_png(engine: Engine, uid: str, side: int = DISPLAY_SIDE) -> tuple[bytes, float]:
    """The image as an 8-bit PNG at most ``side`` pixels long, and its scale (display pixels
    per original pixel). The file is found by uid in the catalogue, never from a request."""
    with engine.connect() as conn:
        path = conn.execute(select(D.images.c.path).where(D.images.c.uid == uid)).scalar()
    if not path:
        raise ReviewError(f"image {uid!r} has no file in the catalogue")
    try:
        arr, (h, w), _ = decode(path, target=side)
    except CxrlabelError as e:
        raise ImageMissing(f"image {uid!r} cannot be shown: {e} (if the archive moved: "
                           "`cxrlabel catalogue reroot OLD_PREFIX NEW_PREFIX`)") from None
    scale = min(1.0, side / max(h, w))
    out = cv2.resize(arr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
    if not ok:
        raise ReviewError(f"image {uid!r} could not be encoded for display")
    buf = io.BytesIO(png.tobytes())
    return buf.getvalue(), scale


MAX_NOTE = 2000  # characters of a review's note


def _text(value: Any, what: str, limit: int) -> str:
    """``value`` as a review stores it: a string of valid Unicode (no lone surrogate, which
    JSON's ``"\\ud800"`` gives) without NUL, at most ``limit`` characters; a
    :class:`ReviewError` naming ``what`` otherwise, never a silent coercion."""
    if not isinstance(value, str):
        raise ReviewError(f"{what} must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise ReviewError(f"{what} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ReviewError(f"{what} is not valid text (a lone surrogate, e.g. \\ud800)") from None
    if len(value) > limit:
        raise ReviewError(f"{what} is longer than {limit} characters")
    return value


def _checked(reviewer: Any, seen: Any, decision: Any, structure: Any, polygons: Any, note: Any,
             ) -> tuple[str, str | None, list[str]]:
    """A save's fields checked strictly (:func:`_text`; no coercion): the reviewer and note
    as stored, and the structures the decision touches; a :class:`ReviewError` naming the
    field otherwise."""
    reviewer = _text(reviewer, "reviewer", 100).strip()
    if not reviewer:
        raise ReviewError("a review needs the reviewer's name: --reviewer NAME, or type it on the page")
    note = _text(note, "note", MAX_NOTE) if note is not None else None
    for value, what in ((decision, "decision"), (structure, "structure")):
        if not isinstance(value, str):
            raise ReviewError(f"{what} must be a string, not {type(value).__name__}")
    if decision not in DECISIONS:
        raise ReviewError(f"unknown decision {decision!r}: one of {', '.join(DECISIONS)}")
    if structure and structure not in STRUCTURES:
        raise ReviewError(f"unknown structure {structure!r}: one of {', '.join(STRUCTURES)}")
    if decision == "corrected":
        if not polygons or not isinstance(polygons, dict) or any(s not in STRUCTURES for s in polygons):
            raise ReviewError(f"a correction needs polygons for one or more of {', '.join(STRUCTURES)}")
        touched = sorted(polygons)
    else:
        touched = [structure]
    if not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
        raise ReviewError("seen must be the version the page loaded (a whole number)")
    return reviewer, note, touched


def save(engine: Engine, uid: str, model: str, reviewer: str, seen: int, decision: str,
         structure: str = "", polygons: dict[str, list] | None = None, note: str | None = None) -> dict:
    """Store one decision on ``uid``'s masks by ``model``; returns the image's new view.

    ``decision``: 'accepted' or 'rejected' (the whole image with ``structure`` '', or one
    structure), or 'corrected' with ``polygons`` ``{structure: [polygon, ...]}`` in original
    pixels. ``seen``: the version the reviewer saw. Refused (:class:`ReviewConflict`) when a
    structure it touches was saved by somebody after ``seen``."""
    reviewer, note, touched = _checked(reviewer, seen, decision, structure, polygons, note)
    now = D.utcnow()
    try:
        with engine.connect().execution_options(write_lock=True) as conn, conn.begin():
            m = D.measurements
            here = conn.execute(select(m.c.uid).where(m.c.uid == uid, m.c.model == model).with_for_update()).first()
            if here is None:
                raise ReviewError(f"image {uid!r} has no labels by model {model!r}: run `cxrlabel label` first")
            r = D.reviews
            stored = conn.execute(select(func.max(r.c.version)).where(r.c.uid == uid, r.c.model == model)).scalar()
            if seen > (stored or 0):  # versions are the server's: a page never runs ahead of them
                raise ReviewConflict(f"{uid}: the page says version {seen}, the stored one is {stored or 0}: reload "
                                     "the image and save again", [])
            later = conn.execute(select(r.c.reviewer, r.c.at, r.c.structure, r.c.decision).where(
                r.c.uid == uid, r.c.model == model, r.c.version > seen,
                or_(r.c.structure.in_(touched), r.c.structure == "",
                    *(() if touched != [""] else (r.c.structure != "",))))
                .order_by(r.c.version.desc(), r.c.id.desc())).all()
            if later:
                last = later[0]
                raise ReviewConflict(
                    f"{uid}: {last.reviewer} saved {last.structure or 'the whole image'} ({last.decision}) at "
                    f"{last.at:%Y-%m-%d %H:%M:%S} after you opened it: reload to see their work",
                    [{"structure": x.structure, "decision": x.decision, "reviewer": x.reviewer,
                      "at": f"{x.at:%Y-%m-%d %H:%M:%S}"} for x in later])
            masks, _ = final_masks(conn, uid, model)
            if not masks:
                raise ReviewError(f"image {uid!r} has no masks by model {model!r}: run `cxrlabel label` first")
            height, width = next(iter(masks.values())).shape
            if decision == "corrected":
                assert polygons is not None  # checked above: a correction brings its polygons
                rows = []
                for s in touched:
                    masks[s] = mask_of(polygons[s], height, width)
                    rows.append(mask_row(uid, s, masks[s].astype(np.uint8), kind="reviewed", model=model))
                D.upsert(conn, D.masks, rows, MASK_KEYS)
            conn.execute(r.insert(), [{"uid": uid, "model": model, "version": seen + 1, "structure": s,
                                       "decision": decision, "reviewer": reviewer, "at": now,
                                       "note": note or None} for s in touched])
            _update_measurements(conn, uid, model, masks)
    except IntegrityError:
        raise ReviewConflict(f"{uid}: somebody saved the same version a moment ago: reload to see their work") \
            from None
    return image_view(engine, uid, model)


def _update_measurements(conn: Connection, uid: str, model: str, masks: dict[str, np.ndarray]) -> None:
    """The reviewed measurements, from the masks as now stored (``masks``) and the decisions
    that now stand: none once the whole image is rejected; widths without a CTR while any
    structure stands rejected."""
    standing = latest_reviews(conn, model, [uid]).get(uid, {})
    if standing.get("", Latest("", "")).decision == "rejected" and all(
            standing.get(s, Latest("", "")).decision == "rejected" for s in STRUCTURES):
        values: dict[str, float | int | None] = {"reviewed_ctr": None, "reviewed_heart_width_px": None,
                                                 "reviewed_thoracic_width_px": None}
    else:
        m = measure(masks)
        values = {"reviewed_ctr": m["ctr"], "reviewed_heart_width_px": m["heart_width_px"],
                  "reviewed_thoracic_width_px": m["thoracic_width_px"]}
        if any(x.decision == "rejected" for x in standing.values()):  # no CTR that leans on a rejected mask
            values["reviewed_ctr"] = None
    conn.execute(D.measurements.update().where(D.measurements.c.uid == uid, D.measurements.c.model == model)
                 .values(**values))


class Latest(NamedTuple):
    """The decision that stands for a structure, and who took it."""

    decision: str
    reviewer: str


def latest_reviews(conn: Connection, model: str, uids: Sequence[str]) -> dict[str, dict[str, Latest]]:
    """``{uid: {structure: Latest}}``: where people reviewed ``model``'s masks, each
    structure's latest decision, a whole-image decision counting for every structure (and
    ``''``: the latest whole-image decision)."""
    r = D.reviews
    q = select(r.c.uid, r.c.structure, r.c.version, r.c.id, r.c.decision, r.c.reviewer).where(r.c.model == model)
    rows = sorted(D.rows_in(conn, q, r.c.uid, list(uids)), key=lambda x: (x.version, x.id))
    out: dict[str, dict[str, Latest]] = {}
    for x in rows:
        mine = out.setdefault(x.uid, {})
        for s in (STRUCTURES + ("",) if x.structure == "" else (x.structure,)):
            mine[s] = Latest(x.decision, x.reviewer)
    return out


def states(conn: Connection, model: str, uids: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{uid: {structure: decision}}`` of :func:`latest_reviews`."""
    return {uid: {s: x.decision for s, x in by.items()} for uid, by in latest_reviews(conn, model, uids).items()}

"""One batch's steps, pure of global state (a distributed engine's workers run them as they are):
load (the cache, collecting what is missing), the model's pass (and its test-time-augmented
copies), post-processing into masks, measurements and quality, and the write."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import cv2
import numpy as np
from sqlalchemy import update
from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline import masks as M
from pipeline import quality as Q
from pipeline.collect import Entry, Failure, Settings, fetch
from pipeline.groups import Selected
from pipeline.imaging import FIXUPS, Geometry, collimation_rim, upright
from pipeline.measure import bbox, calibrate, clean, measure_boxes, plausible_mm
from pipeline.model import LoadedModel, infer
from pipeline.quality import QualityModel
from pipeline.quality.inputs import OK as INPUT_OK
from pipeline.quality.inputs import check as check_input
from pipeline.quality.inputs import header_check, thumbnail

log = logging.getLogger(__name__)


class LabelError(CxrlabelError):
    pass


@dataclass
class Item:
    uid: str
    image: np.ndarray  # (S, S) uint8 cache entry
    geom: Geometry
    spacing: tuple[float | None, float | None] = (None, None)
    rim: float | None = None  # share under a collimator's rim (quality.rim_share); None: read it from image
    rim_box: tuple[int, int, int, int] | None = None  # its imaging.collimation_rim, when read (load_batch)
    header: str | None = None  # why the catalogue's header says it is no frontal chest film (inputs.header_check)
    thumb: np.ndarray | None = None  # the film's thumbnail (inputs.thumbnail): what the input check compares
    calibration: str | None = None  # where ``spacing`` came from, or why there is none (measure.calibrate)
    age: int | None = None  # the patient's, whole years: the mm widths are checked against it (measure.plausible_mm)


@dataclass
class Result:
    uid: str
    masks: dict[str, M.EncodedMask] = field(default_factory=dict)  # original geometry
    measurements: dict = field(default_factory=dict)
    error: str | None = None
    features: dict[str, dict[str, float]] = field(default_factory=dict)  # the quality score's inputs


def postprocess(item: Item, probs: np.ndarray, structures: Sequence[str],
                scorer: QualityModel | None = None, tta: list[np.ndarray] | None = None) -> Result:
    """``(C, S, S)`` probabilities of one image (float, or uint8 = round(255 p)) -> masks in
    original geometry + measurements, with the quality score: estimated Dice per structure
    and their mean from ``scorer``, or without one the heuristic
    (:func:`pipeline.quality.score_image`). ``tta``: the probabilities of the image's
    :func:`pipeline.quality.tta_copies`, for a scorer that reads their agreement; a scorer
    with an :class:`pipeline.quality.Atlas` also reads the cleaned masks' fit to it.

    Each structure is cleaned inside its box at the model's resolution, and its probabilities
    (not the binary mask, so the outline keeps its sub-pixel position) are mapped back to
    original geometry as runs (:meth:`Geometry.runs_above`): the full-size masks (up to 3000
    x 3000 pixels each) are never built, and the runs are the stored run-length encoding.
    """
    read = _cleaned(probs, structures)
    shape = (item.geom.orig_height, item.geom.orig_width)
    runs = item.geom.runs_above(read.soft, boxes=read.windows)
    encoded = dict(zip(structures, M.EncodedMask.from_runs(runs, shape), strict=True))
    boxes = {s: (int(first.min()), int(rows[0]), int(last.max()), int(rows[-1])) if len(rows) else None
             for s, (rows, first, last) in zip(structures, runs, strict=True)}
    values = measure_boxes(boxes, encoded["heart"].area if "heart" in encoded else None, item.spacing)
    values["mm_calibration"] = item.calibration
    values = plausible_mm(values, item.age)
    features, scored = _scored(item, read, values["ctr"], scorer, tta)
    return Result(item.uid, encoded, {**values, **scored}, features=features)


@dataclass
class _Cleaned:
    """One image's structures cleaned at the model's resolution (:func:`_cleaned`)."""

    soft: np.ndarray  # (C, S, S) float32: what is mapped back, 0 away from each kept component
    masks: dict[str, np.ndarray]  # each cleaned mask, (S, S) bool: what the input check and the atlas read
    agreement: dict[str, float]  # soft Dice of the model's output with its cleaned mask
    kept: dict[str, float]  # the share of the foreground the clean-up kept
    columns: dict[str, float | None]  # each mask's mean column
    features: dict[str, dict[str, float]]  # the quality score's per-structure inputs
    # each cleaned mask's box (x0, y0, x1, y1, inclusive; None: empty): what the checks read of
    # the whole masks lies inside it, so they read only that
    boxes: dict[str, tuple[int, int, int, int] | None] = field(default_factory=dict)
    # each structure's window (rows y0:y1, columns x0:x1): ``soft`` is 0 beyond it
    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))


def _cleaned(probs: np.ndarray, structures: Sequence[str]) -> _Cleaned:
    """Each structure of ``(C, S, S)`` probabilities (float, or uint8 = round(255 p)) cleaned
    inside its box, with two pixels of margin (room for the dilation that keeps the
    probabilities near the kept component: :func:`pipeline.measure.clean`, OpenCV's), and what
    the score reads of it, in one compiled pass per structure
    (:func:`pipeline.compiled.clean_window`)."""
    from pipeline import compiled  # numba: its import is paid only where masks are cleaned

    quantised = probs.dtype == np.uint8  # round(255 p), from the device (see forward)
    cut, unit = (127, np.float32(1 / 255)) if quantised else (0.5, np.float32(1))
    ring = np.ones((3, 3), np.uint8)
    size = probs.shape[-1]
    scratch = np.empty(2 * size * size, np.float32)
    out = _Cleaned(np.zeros(probs.shape, np.float32), {s: np.zeros((size, size), bool) for s in structures},
                   {}, {}, {}, {}, windows=np.zeros((len(structures), 4), np.int64))
    row_max, col_max = compiled.extents(probs)
    fg_rows, fg_cols = row_max > cut, col_max > cut
    sums = probs.reshape(len(probs), -1).sum(axis=1, dtype=np.uint32 if quantised else np.float64) * float(unit)
    for i, s in enumerate(structures):
        ys, xs = np.flatnonzero(fg_rows[i]), np.flatnonzero(fg_cols[i])
        out.kept[s], out.agreement[s], out.columns[s], out.boxes[s] = 1.0, 1.0 if sums[i] == 0 else 0.0, None, None
        if len(xs) == 0:
            out.features[s] = Q.structure_features(0, 0, 0.0, 0.0, 0.0, out.agreement[s], size)
            continue
        window = (slice(max(0, ys[0] - 2), ys[-1] + 3), slice(max(0, xs[0] - 2), xs[-1] + 3))
        cleaned, out.kept[s] = clean(probs[i][window] > cut)
        bits = cleaned.view(np.uint8)
        near, eroded = cv2.dilate(bits, ring), cv2.erode(bits, ring)
        y0, x0 = window[0].start, window[1].start
        out.windows[i] = y0, y0 + cleaned.shape[0], x0, x0 + cleaned.shape[1]
        area, overlap, col_sum, col_n, bx0, by0, bx1, by1, uncertain, margin, hull = compiled.clean_window(
            probs[i], y0, x0, unit, cleaned, near, eroded, out.soft[i], out.masks[s], scratch)
        # the model's agreement with its own cleaned mask: soft Dice at the model's resolution
        # (at most 1: filled holes count as 0.75 in the soft array, which the raw sum does not hold)
        out.agreement[s] = min(1.0, 2 * float(overlap) / (float(sums[i]) + area))
        if col_n:
            out.columns[s] = col_sum / col_n + x0
            out.boxes[s] = (bx0 + x0, by0 + y0, bx1 + x0, by1 + y0)
        out.features[s] = Q.structure_features(area, uncertain, float(margin), hull, out.kept[s],
                                               out.agreement[s], size)
    return out


def _scored(item: Item, read: _Cleaned, ctr: float | None, scorer: QualityModel | None,
            tta: list[np.ndarray] | None) -> tuple[dict[str, dict[str, float]], dict]:
    """The score's features, and the quality score, the trust and the input check, of one
    image's cleaned masks; a film that is no chest film the model can read scores 0 (first in
    the review worklist)."""
    whole_masks, size, boxes = read.masks, read.soft.shape[-1], read.boxes
    fit = scorer.atlas.fit(whole_masks, boxes) if scorer is not None and scorer.atlas is not None else None
    lungs = [s for s in ("left_lung", "right_lung") if s in whole_masks]
    lung_box = Q.union_box([boxes[s] for s in lungs])
    both = np.zeros((size, size), bool) if lungs else None  # the lungs together, made only inside their box
    if both is not None and lung_box is not None:
        window = (slice(lung_box[1], lung_box[3] + 1), slice(lung_box[0], lung_box[2] + 1))
        both[window] = np.logical_or.reduce([whole_masks[s][window] for s in lungs])
    border = Q.heart_border(item.image, whole_masks.get("heart"), both, (boxes.get("heart"), lung_box)) \
        if item.image.shape == (size, size) else 0.0
    features, scored = Q.score_image(
        scorer, read.features, read.agreement, read.kept, read.columns, ctr,
        item.rim if item.rim is not None else Q.rim_share(item.image),
        Q.tta_agreement(whole_masks, tta, list(whole_masks)) if tta is not None else None, fit, border)
    look = None
    if scorer is not None and scorer.appearance is not None:
        thumb = item.thumb if item.thumb is not None else (
            thumbnail(item.image, item.geom.film_box()) if item.image.size else None)
        look = scorer.appearance.look(thumb) if thumb is not None else None
    scored["input_check"] = item.header or check_input(whole_masks, item.geom.film_box(), fit, look, boxes)
    if scored["input_check"] != INPUT_OK:
        scored["quality"] = 0.0
        scored["trust"] = 0.0 if scored["trust"] is not None else None
    return features, scored


def postprocess_or_fail(item: Item, probs: np.ndarray, structures: Sequence[str],
                        scorer: QualityModel | None = None, tta: list[np.ndarray] | None = None) -> Result:
    """:func:`postprocess`, with any error of this one image returned as its failure."""
    try:
        return postprocess(item, probs, structures, scorer, tta)
    except Exception as e:  # one image's odd geometry or mask never stops the batch
        log.warning("%s: post-processing failed: %s", item.uid, e)
        return Result(item.uid, error=f"post-processing: {type(e).__name__}: {e}")


def postprocess_all(items: Sequence[Item], probs: np.ndarray, structures: Sequence[str],
                    scorer: QualityModel | None = None, tta: np.ndarray | None = None) -> list[Result]:
    """:func:`postprocess_or_fail` of several images: one task for a worker process (a task
    per image would cost the pool more than the work, ~2 ms). ``tta``: ``(B, 2, C, S, S)``
    probabilities of their test-time-augmented copies (:func:`forward_tta`)."""
    return [postprocess_or_fail(it, p, structures, scorer, list(tta[n]) if tta is not None else None)
            for n, (it, p) in enumerate(zip(items, probs, strict=True))]


def forward(lm: LoadedModel, items: Sequence[Item], inputs: np.ndarray | None = None) -> np.ndarray:
    """``(B, C, S, S)`` probabilities of one batch as uint8 (``round(255 p)``, CPU numpy):
    a quarter of float32's bytes to copy off the GPU and to hand to post-processing.
    ``inputs``: the batch's :func:`pipeline.model.model_inputs`, when made beforehand.
    Films cut short are labelled again from further out when the model learned chests
    framed whole (:func:`reframe`)."""
    images = [it.image for it in items]
    return reframe(lm, images, [it.geom.film_box() for it in items],
                   infer(lm, images, quantise=True, inputs=inputs))


REFRAME_CONTACTS = 3  # edges of the film reached, summed over the structures, that mark a film cut short

REFRAME_ZOOM = 1.2  # how much further out such a film is labelled again


def edge_contacts(probs: np.ndarray, box: tuple[float, float, float, float]) -> int:
    """How often the structures of one image's ``(C, S, S)`` probabilities (float, or uint8 =
    round(255 p)) reach an edge of the film, ``box`` in cache pixels (:meth:`Geometry.film_box`;
    within 0.5% of the film's side, at least a pixel): 0-4 per structure."""
    cut = 127 if probs.dtype == np.uint8 else 0.5
    x0, y0, x1, y1 = box
    tx, ty = max(1.0, 0.005 * (x1 - x0 + 1)), max(1.0, 0.005 * (y1 - y0 + 1))
    contacts = 0
    for channel in probs:
        if (box_of := bbox(channel > cut)) is not None:
            left, top, right, bottom = box_of
            contacts += int(left - x0 < tx) + int(top - y0 < ty) + int(x1 - right < tx) + int(y1 - bottom < ty)
    return contacts


def reframe(lm: LoadedModel, images: Sequence[np.ndarray], boxes: Sequence[tuple[float, float, float, float]],
            probs: np.ndarray) -> np.ndarray:
    """``probs`` with those of films cut short replaced by the model's output for the film
    shrunk :data:`REFRAME_ZOOM` times about its centre, mapped back. A film is cut short when
    its structures reach the film's edges (``boxes``: each film's place in its cache image)
    :data:`REFRAME_CONTACTS` times or more and no collimator's rim explains it. Only for a
    model that learned chests framed whole (``lm.framed_whole``): it draws a chest seen too
    close poorly. One trained with such films (``train --shifts``, the default since
    2026-11-27) draws them better itself and is left alone. The threshold is the one that left
    every one of 100 held-out annotated films alone (bench/RESULTS.md)."""
    if not lm.framed_whole:
        return probs
    pick = [i for i, (image, box) in enumerate(zip(images, boxes, strict=True))
            if edge_contacts(probs[i], box) >= REFRAME_CONTACTS and not any(collimation_rim(image))]
    if not pick:
        return probs
    side = probs.shape[-1]
    z = 1 / REFRAME_ZOOM
    shrink = np.array([[z, 0.0, (1 - z) * side / 2], [0.0, z, (1 - z) * side / 2]])
    again = infer(lm, [cv2.warpAffine(images[i], shrink, (side, side), flags=cv2.INTER_AREA, borderValue=0)
                       for i in pick], quantise=probs.dtype == np.uint8)
    back = cv2.invertAffineTransform(shrink)
    out = probs.copy()
    for j, i in enumerate(pick):
        out[i] = np.stack([cv2.warpAffine(c, back, (side, side), flags=cv2.INTER_LINEAR) for c in again[j]])
    log.debug("labelled %d film(s) cut short again from further out", len(pick))
    return out


def forward_tta(lm: LoadedModel, items: Sequence[Item]) -> np.ndarray:
    """``(B, 2, C, S, S)`` uint8 probabilities of each image's two test-time-augmented copies
    (:func:`pipeline.quality.tta_copies`): twice the model's work again, for the quality score."""
    copies = [c for it in items for c in Q.tta_copies(it.image)]
    probs = infer(lm, copies, quantise=True)
    return probs.reshape(len(items), 2, *probs.shape[1:])


def tta_scorer(lm: LoadedModel) -> QualityModel:
    """The model's quality score that reads test-time augmentation; a clear error without one."""
    if lm.quality_tta is None:
        raise LabelError(f"model {lm.name!r} has no quality score for test-time augmentation "
                         f"(neither the database nor {Q.sidecar(lm.path, tta=True)} holds one): fit one with "
                         "`cxrlabel quality fit --tta`, or label without --tta")
    return lm.quality_tta


def write_batch(engine: Engine, results: Sequence[Result], model: str, run_id: int) -> None:
    """Masks, measurements, failures and the run's counts of one batch: one transaction."""
    now = D.utcnow()
    mask_rows, meas_rows = [], []
    for r in results:
        if r.error:
            continue
        for s, m in r.masks.items():
            mask_rows.append(M.mask_row(r.uid, s, m, "predicted", model, run_id))
        meas_rows.append({"uid": r.uid, "model": model, "run_id": run_id, "labelled_at": now,
                          **r.measurements})
    failed = [r for r in results if r.error]
    with engine.begin() as conn:
        D.upsert(conn, D.masks, mask_rows, M.MASK_KEYS)
        D.upsert(conn, D.measurements, meas_rows, ["uid", "model"])
        D.clear_failures(conn, "label", [r["uid"] for r in meas_rows])
        for r in failed:
            D.record_failure(conn, "label", r.uid, r.error or "", "LabelError")
        runs = D.label_runs
        conn.execute(update(runs).where(runs.c.id == run_id).values(
            n_labelled=runs.c.n_labelled + len(meas_rows), n_failed=runs.c.n_failed + len(failed)))


def load_batch(engine: Engine, chunk: Sequence[Selected], settings: Settings, cache_dir: str | None,
               pool: Executor | None, fixups: tuple[str, ...] = FIXUPS) -> tuple[list[Item], list[Result]]:
    """A batch's model inputs from the cache (collected on the fly), and its failures;
    ``fixups``: the model's (``spec.fixups``): whether a film read inverted is turned back."""
    return items_of(chunk, fetch(engine, [(s.uid, s.path) for s in chunk], settings, cache_dir, pool), fixups)


def items_of(chunk: Sequence[Selected], entries: Sequence[Entry | Failure], fixups: tuple[str, ...] = FIXUPS
             ) -> tuple[list[Item], list[Result]]:
    """:func:`load_batch`'s items from the batch's cache ``entries`` (:func:`pipeline.collect.fetch`,
    in the batch's order), and the failures among them."""
    items, errors = [], []
    for sel, got in zip(chunk, entries, strict=True):
        if isinstance(got, Entry):
            image, inverted = upright(got.image) if "upright" in fixups else (got.image, False)
            if inverted:
                log.warning("%s: the image reads inverted (a MONOCHROME1 film shown as MONOCHROME2, or the "
                            "reverse?): labelled the right way round; check its PhotometricInterpretation", sel.uid)
            rim = collimation_rim(image)
            spacing, calibration = calibrate(sel.spacing, sel.spacing_source, sel.size,
                                             (got.geom.orig_width, got.geom.orig_height))
            items.append(Item(sel.uid, image, got.geom, spacing, Q.rim_share(image, rim), rim,
                              header_check(sel.modality, sel.body_part, sel.view),
                              thumbnail(image, got.geom.film_box()), calibration, sel.age))
        else:
            errors.append(Result(sel.uid, error=f"{got.error_class}: {got.message}"))
    return items, errors

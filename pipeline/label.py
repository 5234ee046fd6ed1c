"""Stage 4: batch labelling into the database, resumably.

Flow per batch: :func:`load_batch` (the cache's entries via :func:`pipeline.collect.fetch`,
collected on the fly where missing) -> :func:`forward` (one pass of the model from
:mod:`pipeline.model`) -> :func:`postprocess` per image (masks in original geometry,
measurements, quality) -> :func:`write_batch` (one transaction: masks, measurements,
failures, the run's counts). A re-run skips images the same model already measured, so
after a crash (even ``kill -9``) every image ends labelled exactly once.

The per-batch functions hold no global state, so a distributed engine's workers run them
as they are; :func:`label` is the local loop that overlaps them. Nothing here imports the
training code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import cv2
import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError, process_pool
from pipeline import db as D
from pipeline import masks as M
from pipeline import quality as Q
from pipeline.collect import Entry, Settings, fetch
from pipeline.groups import Selected, Selection
from pipeline.imaging import FIXUPS, Geometry, collimation_rim, upright
from pipeline.measure import bbox, calibrate, clean, mean_column, measure_boxes
from pipeline.model import LoadedModel, auto_batch_size, infer, model_inputs, resolve_model
from pipeline.quality import QualityModel
from pipeline.quality.inputs import OK as INPUT_OK
from pipeline.quality.inputs import check as check_input
from pipeline.quality.inputs import header_check, thumbnail

log = logging.getLogger(__name__)


class LabelError(CxrlabelError):
    pass


_NO_PIXELS = np.zeros((0, 0), np.uint8)
WRITES_IN_FLIGHT = 2  # batches post-processed and written behind the model on a GPU


# ---------------------------------------------------------------- pure per-batch work


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
    quantised = probs.dtype == np.uint8  # round(255 p), from the device (see forward)
    cut, unit = (127, np.float32(1 / 255)) if quantised else (0.5, np.float32(1))
    ring = np.ones((3, 3), np.uint8)
    agreement: dict[str, float] = {}
    kept: dict[str, float] = {}
    columns: dict[str, float | None] = {}
    features: dict[str, dict[str, float]] = {}
    size = probs.shape[-1]
    atlas = scorer.atlas if scorer is not None else None
    whole_masks = {s: np.zeros((size, size), bool) for s in structures}  # what the input check reads
    soft = np.zeros(probs.shape, np.float32)  # what is mapped back: 0 away from each kept component
    fg: np.ndarray = probs > cut
    fg_rows, fg_cols = np.asarray(fg.any(axis=2)), np.asarray(fg.any(axis=1))
    sums = probs.reshape(len(probs), -1).sum(axis=1, dtype=np.uint32 if quantised else np.float64) * float(unit)
    for i, s in enumerate(structures):
        ys, xs = np.flatnonzero(fg_rows[i]), np.flatnonzero(fg_cols[i])
        kept[s], agreement[s], columns[s] = 1.0, 1.0 if sums[i] == 0 else 0.0, None
        if len(xs) == 0:
            features[s] = Q.structure_features(np.zeros((1, 1), np.float32), np.zeros((1, 1), bool), 0.0,
                                               agreement[s], size)
            continue
        # clean inside the box, with two pixels of margin: room for the dilation below
        window = (slice(max(0, ys[0] - 2), ys[-1] + 3), slice(max(0, xs[0] - 2), xs[-1] + 3))
        p = probs[i][window].astype(np.float32) * unit
        cleaned, kept[s] = clean(p > 0.5)
        # the probabilities near the kept component, its holes filled
        near = cv2.dilate(cleaned.astype(np.uint8), ring) > 0
        part = np.where(near, p, np.float32(0))
        part[cleaned & (part <= 0.5)] = 0.75
        soft[i][window] = part
        whole_masks[s][window] = cleaned
        # the model's agreement with its own cleaned mask: soft Dice at the model's resolution
        # (at most 1: filled holes count as 0.75 in `part`, which the raw sum does not hold)
        agreement[s] = min(1.0, 2 * float((part * cleaned).sum()) / (float(sums[i]) + int(np.count_nonzero(cleaned))))
        column = mean_column(cleaned)
        columns[s] = column + window[1].start if column is not None else None
        features[s] = Q.structure_features(p, cleaned, kept[s], agreement[s], size)
    shape = (item.geom.orig_height, item.geom.orig_width)
    runs = item.geom.runs_above(soft)
    encoded = dict(zip(structures, M.EncodedMask.from_runs(runs, shape), strict=True))
    boxes = {s: (int(first.min()), int(rows[0]), int(last.max()), int(rows[-1])) if len(rows) else None
             for s, (rows, first, last) in zip(structures, runs, strict=True)}
    values = measure_boxes(boxes, encoded["heart"].area if "heart" in encoded else None, item.spacing)
    values["mm_calibration"] = item.calibration
    fit = atlas.fit(whole_masks) if atlas is not None else None
    features, scored = Q.score_image(
        scorer, features, agreement, kept, columns, values["ctr"],
        item.rim if item.rim is not None else Q.rim_share(item.image),
        Q.tta_agreement(whole_masks, tta, list(structures)) if tta is not None else None, fit)
    look = None
    if scorer is not None and scorer.appearance is not None:
        thumb = item.thumb if item.thumb is not None else (
            thumbnail(item.image, item.geom.film_box()) if item.image.size else None)
        look = scorer.appearance.look(thumb) if thumb is not None else None
    scored["input_check"] = item.header or check_input(whole_masks, item.geom.film_box(), fit, look)
    if scored["input_check"] != INPUT_OK:  # not a film the model can read: first in the review worklist
        scored["quality"] = 0.0
    return Result(item.uid, encoded, {**values, **scored}, features=features)


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


# ---------------------------------------------------------------- the loop


@dataclass
class LabelSummary:
    run_id: int
    model: str
    selected: int
    labelled: int
    skipped: int
    failed: int
    device: str


def retire_other_versions(engine: Engine, lm: LoadedModel) -> dict[str, int]:
    """Keep what another checkpoint stored under ``lm``'s name (an earlier shipped default,
    a model retrained under the same name) under ``NAME@SHA12`` instead: its measurements,
    masks, reviews and label runs, in one transaction. Labelling then does the images again
    with this checkpoint, and the old rows stay queryable side by side. Returns
    ``{kept name: images}``."""
    r, m = D.label_runs, D.measurements
    moved: dict[str, int] = {}
    with engine.begin() as conn:
        runs = conn.execute(select(r.c.id, r.c.model_sha256).where(
            r.c.model == lm.name, r.c.model_sha256.isnot(None), r.c.model_sha256 != lm.sha256)).all()
        by_sha: dict[str, list[int]] = {}
        for run in runs:
            by_sha.setdefault(run.model_sha256, []).append(run.id)
        for sha, ids in sorted(by_sha.items()):
            kept = f"{lm.name}@{sha[:12]}"
            uids = [u for part in D.chunks(ids) for u in conn.execute(
                select(m.c.uid).where(m.c.model == lm.name, m.c.run_id.in_(part))).scalars()]
            for part in D.chunks(uids):
                for table in (D.masks, D.reviews):
                    conn.execute(update(table).where(table.c.model == lm.name, table.c.uid.in_(part))
                                 .values(model=kept))
                conn.execute(update(m).where(m.c.model == lm.name, m.c.uid.in_(part)).values(model=kept))
            for part in D.chunks(ids):
                conn.execute(update(r).where(r.c.id.in_(part)).values(model=kept))
            moved[kept] = len(uids)
    for kept, n in moved.items():
        if n:
            log.warning("%d images labelled by an earlier %s (another checkpoint) are kept as model %r; "
                        "they are labelled again with this one", n, lm.name, kept)
    return moved


def labelled_uids(engine: Engine, model: str, uids: Sequence[str]) -> set[str]:
    t = D.measurements
    with engine.connect() as conn:
        return {row.uid for row in D.rows_in(conn, select(t.c.uid).where(t.c.model == model), t.c.uid, uids)}


@dataclass(frozen=True)
class LabelOptions:
    """Every setting of one labelling run, whichever executor runs it (the CLI's options)."""

    model: str = "default"  # 'default' (shipped), a registered name, or a checkpoint path
    device: str = "auto"  # auto, cpu or cuda (locally also cuda:N)
    batch_size: int | None = None  # None: as many films as the device holds (model.auto_batch_size)
    cache_dir: str | None = None
    workers: int | None = None  # the local loop's processes that decode and post-process [cores]
    tta: bool = False  # two test-time-augmented copies per image, for the quality score (3x the model's work)
    progress: bool = True


@dataclass
class BatchDone:
    """What one written batch adds to its run (what a progress hook sees)."""

    labelled: int
    failed: int
    pid: int
    host: str


class BatchLabeller:
    """The work of one batch, the same under every executor: :meth:`load` (the cache's
    entries, collecting what is missing, and the model's inputs), :meth:`infer` (the model,
    and its test-time-augmented copies), :meth:`post` (masks, measurements, quality) and
    :meth:`write` (one transaction). Calling it does all four in this process (a Ray actor);
    the local loop runs the same steps overlapped."""

    def __init__(self, engine: Engine, lm: LoadedModel, options: LabelOptions, run_id: int) -> None:
        self.engine, self.lm, self.options, self.run_id = engine, lm, options, run_id
        self.scorer = tta_scorer(lm) if options.tta else lm.quality
        self.settings = Settings(lm.spec.size, lm.spec.mode)

    def load(self, chunk: Sequence[Selected], pool: Executor | None = None
             ) -> tuple[list[Item], list[Result], np.ndarray | None]:
        items, errors = load_batch(self.engine, chunk, self.settings, self.options.cache_dir, pool,
                                   self.lm.spec.fixups)
        inputs = model_inputs([it.image for it in items], self.lm.spec, [it.rim_box for it in items]) if items else None
        return items, errors, inputs

    def infer(self, items: Sequence[Item], inputs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch's probabilities, and those of its tta copies (None without ``tta``)."""
        return forward(self.lm, items, inputs), forward_tta(self.lm, items) if self.options.tta else None

    def post(self, items: Sequence[Item], probs: np.ndarray, copies: np.ndarray | None) -> list[Result]:
        return postprocess_all(items, probs, self.lm.spec.structures, self.scorer, copies)

    def write(self, results: Sequence[Result]) -> BatchDone:
        write_batch(self.engine, results, self.lm.name, self.run_id)
        failed = sum(r.error is not None for r in results)
        return BatchDone(len(results) - failed, failed, os.getpid(), socket.gethostname())

    def __call__(self, chunk: Sequence[Selected]) -> BatchDone:
        items, errors, inputs = self.load(chunk)
        results = self.post(items, *self.infer(items, inputs)) if items else []
        return self.write(results + errors)


class LabelRun:
    r"""One labelling run, opened the same way whichever executor labels it: the model (its
    name, file and hash), the selection's images it has not labelled yet (sorted by uid),
    and, once an executor :meth:`start`\ s it, its ``label_runs`` row; :meth:`settle` records
    how it ended."""

    def __init__(self, engine: Engine, selection: Selection, options: LabelOptions, model_device: str) -> None:
        self.engine, self.selection, self.options = engine, selection, options
        self.lm = resolve_model(engine, options.model, model_device)
        if options.tta:
            tta_scorer(self.lm)  # a model without a tta score fails here, before any work
        retire_other_versions(engine, self.lm)
        self.done = labelled_uids(engine, self.lm.name, [it.uid for it in selection.items])
        self.todo = sorted((it for it in selection.items if it.uid not in self.done), key=lambda it: it.uid)
        self.run_id: int | None = None
        self.failed = 0  # as the executor received them (a batch retried after its write counts once)

    def start(self, device: str) -> BatchLabeller:
        """Insert the run's row (``device``: where it runs, as the row records it) and return
        the batch work bound to it; runs left ``running`` by a dead process are marked first."""
        mark_abandoned_runs(self.engine)
        with self.engine.begin() as conn:
            inserted = conn.execute(D.label_runs.insert().values(
                model=self.lm.name, model_sha256=self.lm.sha256, selection=self.selection.description,
                device=device, host=socket.gethostname(), pid=os.getpid(), started_at=D.utcnow(),
                n_selected=len(self.selection.items), n_labelled=0, n_skipped=len(self.done), n_failed=0,
                status="running", heart_definition=self.lm.spec.heart_definition))
            self.run_id = cast(int, cast(Any, inserted.inserted_primary_key)[0])
        return BatchLabeller(self.engine, self.lm, self.options, self.run_id)

    def count(self, batch: BatchDone) -> None:
        self.failed += batch.failed

    def settle(self, status: str) -> None:
        """The run's end and counts: images labelled from what is stored (a batch that ran
        twice, killed after its write and retried, is not counted twice), failures as the
        executor received them."""
        m, runs = D.measurements, D.label_runs
        with self.engine.begin() as conn:
            labelled = conn.execute(select(func.count()).select_from(m).where(m.c.run_id == self.run_id)).scalar()
            conn.execute(update(runs).where(runs.c.id == self.run_id).values(
                ended_at=D.utcnow(), status=status, n_labelled=labelled, n_failed=self.failed))

    def summary(self) -> LabelSummary:
        run_id = self.run_id
        if run_id is None:
            raise LabelError("a labelling run has no summary before an executor starts it")
        with self.engine.connect() as conn:
            row = conn.execute(select(D.label_runs).where(D.label_runs.c.id == run_id)).one()
        return LabelSummary(run_id, self.lm.name, len(self.selection.items), row.n_labelled, len(self.done),
                            row.n_failed, row.device)


class LabelExecutor(Protocol):
    """Who labels a :class:`LabelRun`'s batches: :class:`Local` (this machine) or
    :class:`pipeline.distributed.Ray` (a cluster). Both run :class:`BatchLabeller`."""

    def refuse(self, options: LabelOptions) -> None:
        """Raise :class:`LabelError` (one line, naming the option) for a setting it cannot honour."""

    def model_device(self, options: LabelOptions) -> str:
        """Where the run's own copy of the model loads (the one that names and hashes it)."""

    def execute(self, run: LabelRun) -> None:
        """Start ``run``, label its images, and settle it however it ends."""


def label(engine: Engine, selection: Selection, options: LabelOptions | None = None,
          executor: LabelExecutor | None = None) -> LabelSummary:
    """Label the images of ``selection`` not yet labelled by ``options.model``, with
    ``executor`` (default: :class:`Local`). A re-run skips what is done.

    Torch's CPU thread count is the caller's to set (the CLI's ``--threads``, or a Ray
    worker's setup): this function changes no process-wide state.
    """
    options = options or LabelOptions()
    executor = executor or Local()
    executor.refuse(options)
    run = LabelRun(engine, selection, options, executor.model_device(options))
    executor.execute(run)
    return run.summary()


@dataclass
class Local:
    """The local loop. On a GPU, the batches before the one in the model are post-processed
    (in processes) and written (in a writer thread) meanwhile, and the next two load (in
    threads); the loop waits only when more than :data:`WRITES_IN_FLIGHT` are. On a CPU the
    model already takes every core: overlapping only makes them compete (measured: 0.50 vs
    0.58 of model-only throughput on 2 cores), so each batch is post-processed and written
    before the next runs."""

    def refuse(self, options: LabelOptions) -> None:
        return None  # every option is the local loop's own

    def model_device(self, options: LabelOptions) -> str:
        return options.device

    def execute(self, run: LabelRun) -> None:
        lm, options = run.lm, run.options
        work = run.start(str(lm.device))
        bs = options.batch_size or auto_batch_size(lm)
        processes = options.workers or os.cpu_count() or 2  # a GPU box needs many CPU hands to feed the GPU
        status = "failed"
        try:
            bar = tqdm(total=len(run.todo), desc=f"label {lm.name}", unit="img", disable=not options.progress)

            def finish(n: int, futures: list[Future], errors: list[Result]) -> None:
                done = work.write([r for f in futures for r in f.result()] + errors)
                run.count(done)
                bar.update(done.labelled + done.failed)
                log.info("run %d: batch %d written (%d images)", run.run_id, n, done.labelled)

            depth = WRITES_IN_FLIGHT if lm.device.type == "cuda" else 0
            with ThreadPoolExecutor(2) as loaders, ThreadPoolExecutor(1) as writer, \
                    process_pool(processes) as procs:
                written: deque[Future] = deque()
                for n, (items, errors, inputs) in enumerate(_prefetch(work, run.todo, bs, loaders, procs), start=1):
                    futures: list[Future] = []
                    if items:
                        probs, copies = work.infer(items, inputs)
                        # a task per worker, each a slice of the batch; workers need no pixels, only geometry
                        share = max(1, -(-len(items) // processes))
                        futures = [procs.submit(postprocess_all, [dataclasses.replace(it, image=_NO_PIXELS)
                                                                  for it in items[i:i + share]],
                                                probs[i:i + share], lm.spec.structures, work.scorer,
                                                copies[i:i + share] if copies is not None else None)
                                   for i in range(0, len(items), share)]
                    written.append(writer.submit(finish, n, futures, errors))
                    while len(written) > depth:
                        written.popleft().result()  # a failed write stops the run here
                while written:
                    written.popleft().result()
            bar.close()
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            run.settle(status)


def mark_abandoned_runs(engine: Engine) -> list[int]:
    """Mark ``running`` runs of this host whose process is gone as ``interrupted``."""
    runs = D.label_runs
    with engine.begin() as conn:
        rows = conn.execute(select(runs.c.id, runs.c.pid).where(
            runs.c.status == "running", runs.c.host == socket.gethostname(), runs.c.pid.is_not(None))).all()
        gone = [r.id for r in rows if not _alive(r.pid)]
        for part in D.chunks(gone):
            conn.execute(update(runs).where(runs.c.id.in_(part), runs.c.status == "running")
                         .values(status="interrupted"))
    for run_id in gone:
        log.warning("label run %d was left running by a process that is gone: marked interrupted", run_id)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load_batch(engine: Engine, chunk: Sequence[Selected], settings: Settings, cache_dir: str | None,
               pool: Executor | None, fixups: tuple[str, ...] = FIXUPS) -> tuple[list[Item], list[Result]]:
    """A batch's model inputs from the cache (collected on the fly), and its failures;
    ``fixups``: the model's (``spec.fixups``): whether a film read inverted is turned back."""
    items, errors = [], []
    for sel, got in zip(chunk, fetch(engine, [(s.uid, s.path) for s in chunk], settings, cache_dir, pool),
                        strict=True):
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
                              thumbnail(image, got.geom.film_box()), calibration))
        else:
            errors.append(Result(sel.uid, error=f"{got.error_class}: {got.message}"))
    return items, errors


def _prefetch(work: BatchLabeller, todo: Sequence[Selected], bs: int, threads: Executor, procs: Executor
              ) -> Iterator[tuple[list[Item], list[Result], np.ndarray | None]]:
    """Batches whose images load (decoding what is missing) and are normalised for the model
    while the previous batch runs in it: the model's loop only runs the model."""
    chunks = list(D.chunks(todo, bs))
    ahead: list[Future] = [threads.submit(work.load, c, procs) for c in chunks[:2]]
    for i in range(len(chunks)):
        current = ahead.pop(0)
        if i + 2 < len(chunks):
            ahead.append(threads.submit(work.load, chunks[i + 2], procs))
        yield current.result()

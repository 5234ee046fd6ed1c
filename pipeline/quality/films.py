"""The films a quality score is fitted on, labelled as labelling labels them.

They come from one of two places:

* **a cross-validation run** (``RUN_DIR`` of ``cxrlabel train --folds K``): each fold's model
  labels its own held-out films; by default each fold's last epoch (``final.pt``), as long as
  the model a run on every film ships, since the score's features read the model's
  confidence, which grows with training (:func:`from_folds`);
* **the database**: the films with manual masks, or masks a person corrected in review, that
  the model did not train on (a checkpoint records the films it trained on); the model labels
  them, and the leave-fold-out folds group them by patient (:func:`from_database`).

Either gives the films and their folds (:class:`Chosen`), before any is labelled; :func:`label`
then labels them all in one pass. Every film goes through the labelling path
(:func:`pipeline.label.reframe`, :func:`pipeline.label.postprocess` at cache geometry), as it is
and, with ``shifts``, through each equipment-like shift of :mod:`pipeline.shifts` at two
strengths. Each mask gives one row: the score's features, its fit to an atlas of the other
folds' annotated masks, and its true Dice (lungs in their source's own convention:
:func:`pipeline.masks.overlap_ignored`); each film its true and measured CTR."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine
from tqdm.auto import tqdm

from pipeline import CxrlabelError
from pipeline.imaging import Geometry
from pipeline.label import Item, postprocess, reframe
from pipeline.masks import LUNGS, overlap_ignored
from pipeline.measure import bbox, measure
from pipeline.metrics import dice
from pipeline.model import LoadedModel, infer, read_checkpoint, resolve_model
from pipeline.quality.features import SHAPE, Atlas, tta_agreement, tta_copies
from pipeline.quality.inputs import Appearance, thumbnail
from pipeline.quality.score import recipe_of
from pipeline.shifts import SHIFTS, apply

STRENGTHS = (0.5, 1.0)  # of each shift (the inversion only at full strength)

WIDEN = {0.5: 1.15, 1.0: 1.3}  # strength: heart widening factor of the "widened" variant (bench/ctr_bands.py)


class FitError(CxrlabelError):
    pass


def variants(shifts: bool = False, widened: bool = False) -> list[tuple[str, float]]:
    """``(shift, strength)`` of every variant of a film: as it is; with ``shifts`` each shift
    at each strength; with ``widened`` its heart widened as :mod:`pipeline.train.enlarge` does
    (a synthetic enlarged heart)."""
    out = [("none", 0.0)]
    if shifts:
        out += [(name, s) for name in SHIFTS for s in (STRENGTHS if name != "inverted" else (1.0,))]
    return out + ([("widened", s) for s in WIDEN] if widened else [])


def make_variant(name: str, strength: float, image: np.ndarray, masks: np.ndarray, structures: Sequence[str],
                 rng: np.random.Generator, film: tuple[float, float, float, float] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """The image and its true masks put through one variant of :func:`variants`, and where
    the film then lies in the image (``film``: where it lay before, as
    :meth:`pipeline.imaging.Geometry.film_box` gives it; None: the whole image). A shift
    that moves the anatomy (a crop, a rotation, another aspect) moves the film's edges with
    it, so labelling judges a film cut short (:func:`pipeline.label.reframe`) as it would
    judge the real one."""
    side = image.shape[-1]
    film = film or (0.0, 0.0, side - 1.0, side - 1.0)
    if name == "none":
        return image, masks, film
    if name == "widened":  # the thorax's borders stay put, and with them the film's
        from pipeline.train.enlarge import widen_heart
        return (*widen_heart(image, masks, list(structures), WIDEN[strength]), film)
    where = np.zeros((1, side, side), masks.dtype)
    x0, y0, x1, y1 = (int(round(v)) for v in film)
    where[0, y0:y1 + 1, x0:x1 + 1] = 1
    shifted, moved = apply(name, image, np.concatenate([masks, where]), strength, rng)
    box = bbox(moved[-1] > 0.5)
    return shifted, moved[:-1], (float(box[0]), float(box[1]), float(box[2]), float(box[3])) if box else film


def true_dice(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Per structure the truth draws, the Dice of the cleaned mask against it; lungs in their
    source's own convention (pixels the source also drew as heart or cardiomediastinum count
    in neither mask)."""
    ignored = overlap_ignored(truth)
    out = {}
    for s, p in pred.items():
        if s not in truth:
            continue
        if s in ignored:
            keep = ~ignored[s]
            out[s] = dice(p & keep, truth[s] & keep)
        else:
            out[s] = dice(p, truth[s])
    return out


def ctr_fields(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The true and measured CTR of a film (None unless the truth draws the heart alone and
    both lungs), and the measured heart and thoracic widths as shares of the true ones."""
    if not {"heart", *LUNGS} <= set(truth):
        return {"ctr_true": None, "ctr_pred": None, "heart_width_ratio": None, "thoracic_width_ratio": None}
    t = measure({s: truth[s] for s in ("heart", *LUNGS)})
    p = measure({s: pred[s] for s in ("heart", *LUNGS) if s in pred})

    def ratio(key: str) -> float | None:
        return p[key] / t[key] if p.get(key) and t.get(key) else None
    return {"ctr_true": t["ctr"], "ctr_pred": p["ctr"], "heart_width_ratio": ratio("heart_width_px"),
            "thoracic_width_ratio": ratio("thoracic_width_px")}


def label_films(lm: LoadedModel, ds, indices: Sequence[int], fold: int, atlas: Atlas | None,
                kinds: Sequence[tuple[str, float]], rng: np.random.Generator, tta: bool = False,
                bar: tqdm | None = None, sources: dict[str, str] | None = None) -> list[dict]:
    """One row per (film of ``ds`` at ``indices``, variant of ``kinds``, structure the model
    labels): the score's features as labelling measures them, the atlas's fit, the true Dice
    (None where the film's source does not draw the structure) and the film's CTR fields."""
    structures = list(lm.spec.structures)
    names = ds.structures
    size = ds.images.shape[-1]
    geom = Geometry.fit(size, size, size, "pad")  # masks come back at cache geometry
    rows = []
    for i in indices:
        film = ds.geoms[i].film_box() if ds.geoms else None
        made = [make_variant(name, s, ds.images[i], ds.masks[i], names, rng, film) for name, s in kinds]
        images = [img for img, _, _ in made]
        probs = reframe(lm, images, [box for _, _, box in made], infer(lm, images))  # as `label` does
        results = [postprocess(Item(ds.uids[i], img, geom), p, structures) for img, p in zip(images, probs,
                                                                                           strict=True)]
        agreement = _tta_features(lm, images, results, structures) if tta else [{}] * len(results)
        for (name, strength), (_, truth_masks, _), r, extra in zip(kinds, made, results, agreement, strict=True):
            pred = {s: r.masks[s].decode() for s in structures}  # cache geometry: the cleaned masks
            truth = {s: truth_masks[j] > 0.5 for j, s in enumerate(names) if ds.valid[i, j]}
            scores = true_dice(pred, truth)
            shape = atlas.fit(pred) if atlas is not None else {}
            ctr = ctr_fields(pred, truth)
            for s in structures:
                rows.append({"fold": fold, "uid": ds.uids[i], "source": (sources or {}).get(ds.uids[i]),
                             "shift": name, "strength": strength,
                             "image": f"{fold}/{ds.uids[i]}/{name}/{strength}", "structure": s,
                             "dice": scores.get(s), "heuristic": r.measurements["quality"], **r.features[s],
                             **({SHAPE: shape[s]} if s in shape else {}), **ctr,
                             **({"tta": extra[s]} if extra else {})})
        if bar is not None:
            bar.update(1)
    return rows


def _tta_features(lm: LoadedModel, images: list[np.ndarray], results: list, structures: list[str],
                  ) -> list[dict[str, float]]:
    """Per image, per structure: :func:`pipeline.quality.tta_agreement` of its masks with those
    of its two test-time-augmented copies (as ``label --tta`` computes it)."""
    probs = infer(lm, [c for img in images for c in tta_copies(img)])
    return [tta_agreement({s: r.masks[s].decode() for s in structures}, [probs[2 * n], probs[2 * n + 1]],
                          structures) for n, r in enumerate(results)]


def appearance_of(ds) -> Appearance:
    """The look of every annotated film of the dataset (:class:`pipeline.quality.inputs.Appearance`)."""
    return Appearance(np.stack([thumbnail(ds.images[i], ds.geoms[i].film_box() if ds.geoms else None)
                                for i in range(len(ds.uids))]))


def atlas_of(ds, structures: Sequence[str], leave_out: Collection[int] = ()) -> Atlas | None:
    """The atlas of the dataset's films whose source draws every one of ``structures``, but
    ``leave_out``; None when no film draws them all."""
    skip = set(leave_out)
    cols = [ds.structures.index(s) for s in structures]
    keep = [i for i in range(len(ds.uids)) if ds.valid[i, cols].all() and i not in skip]
    return Atlas.build(ds.masks[keep][:, cols], list(structures)) if keep else None


@dataclass
class Fold:
    """One fold: the films it holds out (indices into the dataset), the model that labels them
    (a checkpoint loaded when its turn comes), and the films its atlas leaves out."""

    k: int
    model: LoadedModel | Path
    held: list[int]
    atlas_leave_out: Collection[int]


@dataclass
class Chosen:
    """The films a score is fitted on, before any is labelled: the dataset, its folds, and
    what they are in words (the score's provenance)."""

    ds: object  # pipeline.train.data.Dataset
    folds: list[Fold]
    structures: list[str]
    sources: dict[str, str]  # uid: images.source
    source: str
    fold_models: dict | None  # how the models that label them were trained (None: the model itself)
    atlas_leave_out: Collection[int]  # of the atlas the fitted score keeps
    images: int


@dataclass
class Films:
    """The labelled films' rows, what they came from, and the atlas the fitted score keeps."""

    rows: list[dict]
    folds: int
    source: str  # in words, for the score's provenance
    fold_models: dict | None  # how the models that labelled them were trained (None: the model itself)
    atlas: Atlas | None
    images: int = 0
    appearance: Appearance | None = None  # the annotated films' look, for the input check


def _dataset(engine: Engine, training: dict, cache: str | None, masks: tuple[str, ...] = ("manual",),
             review_model: str = "default"):
    """The annotated films at the model's cache size, with every structure its training read
    (a cardiomediastinum too, so a lung drawn behind it is compared in its own convention)."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.data import load_dataset
    cfg = TrainConfig.from_dict({**training, "masks": masks, "review_model": review_model, "sources": ()})
    return load_dataset(engine, cfg, cache)


def from_folds(engine: Engine, run_dir: Path, cache: str | None = None, checkpoint: str = "final",
               shifts: bool = False) -> Chosen:
    """The held-out films of each fold of the cross-validation in ``run_dir``, each labelled
    by its fold's ``checkpoint`` (``final``: its last epoch; ``best``: its best on those very
    films, which flatters them)."""
    from pipeline.train.folds import SPLITS_FILE
    splits_path = Path(run_dir) / SPLITS_FILE
    if not splits_path.exists():
        raise FitError(f"{run_dir}: no {SPLITS_FILE}: name the folder of a `cxrlabel train --folds K` run")
    splits = json.loads(splits_path.read_text())
    trained = [k for k in range(len(splits["val"])) if _finished(Path(run_dir) / f"fold{k}", checkpoint)]
    if len(trained) < 2:
        raise FitError(f"{run_dir}: {len(trained)} fold(s) trained to the end; the score is judged leaving a fold "
                       "out, so it needs two or more: train more folds (`cxrlabel train --folds K --fold N`)")
    first = read_checkpoint(Path(run_dir) / f"fold{trained[0]}" / f"{checkpoint}.pt")
    ds = _dataset(engine, first.training, cache)
    folds = []
    for k in trained:
        held = ds.indices(splits["val"][k])
        folds.append(Fold(k, Path(run_dir) / f"fold{k}" / f"{checkpoint}.pt", held, held))
    source = (f"out-of-fold films of {Path(run_dir).name} ({len(trained)} folds, each fold's {checkpoint}.pt"
              f"{', with equipment-like shifts' if shifts else ''})")
    fold_models = {"checkpoint": checkpoint, "epochs": first.training.get("epochs"),
                   "epoch": first.info.get("epoch"), "training": recipe_of(first.training)}
    return Chosen(ds, folds, list(first.spec.labelled), _sources(engine, ds.uids), source, fold_models, (),
                  sum(len(f.held) for f in folds))


def _finished(fold: Path, checkpoint: str) -> bool:
    """The fold's checkpoint exists and its training reached its last epoch."""
    import torch
    if not (fold / f"{checkpoint}.pt").exists():
        return False
    if not (fold / "last.pt").exists():
        return True
    last = torch.load(fold / "last.pt", map_location="cpu", weights_only=True)
    return last["state"]["epoch"] >= last["config"]["epochs"]


def from_database(engine: Engine, lm: LoadedModel, cache: str | None = None, folds: int = 5, seed: int = 0,
                  sample: str | None = None, shifts: bool = False) -> Chosen:
    """The database's annotated films the model did not train on (manual masks, and masks
    people corrected in review of its own labels), all labelled by the model; ``sample``: only
    the films of that named sample. The leave-fold-out folds (``folds``) group them by patient."""
    from pipeline.train.folds import make_splits
    ck = read_checkpoint(lm.path)
    trained_on = ck.info.get("trained_uids")
    if trained_on is None and sample is None:
        raise FitError(f"{lm.path} does not record which films it trained on: name films it never saw with "
                       "--sample NAME (`cxrlabel groups sample`), or fit on its cross-validation with --cv RUN_DIR")
    ds = _dataset(engine, ck.training, cache, ("manual", "reviewed"), lm.name)
    keep = set(range(len(ds.uids))) - set(ds.indices(list(trained_on or [])))
    if sample is not None:
        keep &= set(ds.indices(_sample_uids(engine, sample)))
    usable = [i for i in sorted(keep) if any(ds.valid[i, ds.structures.index(s)] for s in lm.spec.structures)]
    if len(usable) < 2 * folds:
        raise FitError(f"{len(usable)} annotated film(s) the model {lm.name!r} did not train on"
                       f"{f' in sample {sample!r}' if sample else ''}: the score needs at least {2 * folds} "
                       f"({folds} folds of two): annotate or review more (`cxrlabel masks import`, `cxrlabel review`)")
    splits = make_splits([ds.uids[i] for i in usable], folds, seed=seed, groups=ds.patients)
    parts = []
    for k, held_uids in enumerate(splits.val):
        held = ds.indices(held_uids)
        others = set(usable) - set(held)  # the atlas of a fold: the other folds' films only
        parts.append(Fold(k, lm, held, [i for i in range(len(ds.uids)) if i not in others]))
    source = (f"{len(usable)} annotated films {lm.name} did not train on"
              f"{f' (sample {sample})' if sample else ''}, {folds} folds by patient"
              f"{', with equipment-like shifts' if shifts else ''}")
    return Chosen(ds, parts, list(lm.spec.structures), _sources(engine, ds.uids), source, None,
                  set(range(len(ds.uids))) - set(usable), len(usable))


def label(chosen: Chosen, kinds: Sequence[tuple[str, float]], tta: bool = False, seed: int = 0,
          progress: bool = True) -> Films:
    """Every chosen film through each variant of ``kinds``, labelled by its fold's model as
    labelling labels it, one row per mask (:func:`label_films`); with the atlas and look of
    the annotated films the fitted score keeps."""
    ds, rows = chosen.ds, []
    rng = np.random.default_rng(seed)  # one stream over the folds in turn: the variants' randomness
    with tqdm(total=chosen.images, desc="quality fit: label held-out films", unit="film",
              disable=not progress) as bar:
        for fold in chosen.folds:
            lm = fold.model if isinstance(fold.model, LoadedModel) else resolve_model(None, str(fold.model), "cpu")
            atlas = atlas_of(ds, chosen.structures, fold.atlas_leave_out)
            rows += label_films(lm, ds, fold.held, fold.k, atlas, kinds, rng, tta, bar, chosen.sources)
    return Films(rows, len(chosen.folds), chosen.source, chosen.fold_models,
                 atlas_of(ds, chosen.structures, chosen.atlas_leave_out), chosen.images, appearance_of(ds))


def _sources(engine: Engine, uids: Sequence[str]) -> dict[str, str]:
    """``{uid: images.source}``: the figures are also given per source (clinic, dataset)."""
    from sqlalchemy import select

    from pipeline import db as D
    with engine.connect() as conn:
        return {r.uid: r.source for r in D.rows_in(conn, select(D.images.c.uid, D.images.c.source),
                                                   D.images.c.uid, list(uids))}


def _sample_uids(engine: Engine, name: str) -> list[str]:
    from sqlalchemy import select

    from pipeline import db as D
    with engine.connect() as conn:
        uids = list(conn.execute(select(D.samples.c.uid).where(D.samples.c.name == name)).scalars())
    if not uids:
        raise FitError(f"no sample named {name!r}: see `cxrlabel groups samples`")
    return uids

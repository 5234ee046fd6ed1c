"""The fitted quality score: an estimated Dice per structure, where it is kept, and the fallback.

A :class:`QualityModel` maps :func:`pipeline.quality.features.design` of one image's
features to an estimated Dice per structure (ridge regression on ``log(1.01 - Dice)``, then
an isotonic map to Dice); the image's ``quality`` is their mean (:func:`score_image`). A
model's score is found in this order (:func:`scores_for`):

1. the database's ``quality_scores`` row for the model's file (its sha256), which
   ``cxrlabel quality fit`` writes (:mod:`pipeline.quality.fit`);
2. the file beside the checkpoint, ``<checkpoint>.quality.json`` (:func:`sidecar`; the shipped
   default carries one);
3. none: labelling falls back to :func:`heuristic` and stores no per-structure estimate.

A score fitted on fold models trained otherwise than the model it scores (another length,
augmentation: :data:`SCORE_RECIPE`) is used with a warning that names the difference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import db as D
from pipeline.masks import STRUCTURES
from pipeline.quality.features import FEATURES, SHAPE, Atlas, design, image_features, lungs_swapped
from pipeline.quality.inputs import Appearance
from pipeline.quality.trust import Trust

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityModel:
    """Per structure: a ridge regression from the standardised :func:`design` of the image's
    features to ``log(1.01 - Dice)`` (how the features rank the masks), then an isotonic map
    from that to Dice fitted on the same masks (so the score reads as a Dice). ``info``: how
    and on what it was fitted, and how well it did on masks it had not seen."""

    features: tuple[str, ...]
    mean: dict[str, list[float]]
    scale: dict[str, list[float]]
    coef: dict[str, list[float]]
    intercept: dict[str, float]
    knots: dict[str, list[float]]  # the isotonic map: ridge output (ascending) -> Dice
    values: dict[str, list[float]]
    info: dict
    atlas: Atlas | None = None  # where ``features`` has SHAPE: what post-processing fits masks to
    appearance: Appearance | None = None  # the annotated films' look: what the input check compares a film with
    trust: Trust | None = None  # the worklist's order (pipeline.quality.trust); None: by quality alone

    def estimate(self, features: dict[str, dict[str, float]]) -> dict[str, float]:
        """``{structure: {feature: value}}`` of one image -> estimated Dice per structure in
        ``[0, 1]``."""
        out = {}
        for s, x in design(features, self.features).items():
            if s in self.coef:
                raw = self.intercept[s] + ((x - self.mean[s]) / self.scale[s]) @ np.array(self.coef[s])
                out[s] = float(np.interp(raw, self.knots[s], self.values[s]))
        return out

    @classmethod
    def fit(cls, rows: list[dict], dice: list[float], structures: list[str],
            alpha: float = 1.0, info: dict | None = None, names: tuple[str, ...] = FEATURES,
            atlas: Atlas | None = None, appearance: Appearance | None = None, trust: Trust | None = None,
            ) -> QualityModel:
        """Fit on ``rows`` (each: the features ``names`` of one structure of one image, plus
        ``"structure"`` and ``"image"``, any key the image's rows share) and their true Dice.
        With :data:`SHAPE` among ``names``, ``atlas`` is the one labelling will fit masks to
        (needed to save the score, not to estimate from rows that carry the feature)."""
        images: dict = {}
        for r in rows:
            images.setdefault(r["image"], {})[r["structure"]] = r
        inputs = {key: design(group, names) for key, group in images.items()}
        mean, scale, coef, intercept, knots, values = {}, {}, {}, {}, {}, {}
        for s in structures:
            # a film whose source does not draw the structure (dice None) gives its context only
            pick = [i for i, r in enumerate(rows) if r["structure"] == s and dice[i] is not None]
            if not pick:
                continue
            x = np.array([inputs[rows[i]["image"]][s] for i in pick], np.float64)
            d = np.clip(np.array([dice[i] for i in pick], np.float64), 0, 1)
            y = np.log(1.01 - d)
            mu, sd = x.mean(axis=0), x.std(axis=0)
            sd[sd == 0] = 1.0
            z = (x - mu) / sd
            b = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
            mean[s], scale[s], coef[s], intercept[s] = mu.tolist(), sd.tolist(), b.tolist(), float(y.mean())
            # a higher ridge output means a larger expected error: Dice falls along it
            k, v = _isotonic(-(y.mean() + z @ b), d)
            knots[s], values[s] = (-k[::-1]).tolist(), v[::-1].tolist()
        return cls(tuple(names), mean, scale, coef, intercept, knots, values, info or {},
                   atlas if SHAPE in names else None, appearance, trust)

    def to_json(self) -> dict:
        if SHAPE in self.features and self.atlas is None:
            raise ValueError(f"a score that reads {SHAPE!r} is saved with the atlas it was measured against")
        return {"format": FORMAT, "features": list(self.features), "mean": self.mean, "scale": self.scale,
                "coef": self.coef, "intercept": self.intercept, "knots": self.knots, "values": self.values,
                "info": self.info, **({"atlas": self.atlas.to_json()} if self.atlas else {}),
                **({"appearance": self.appearance.to_json()} if self.appearance else {}),
                **({"trust": self.trust.to_json()} if self.trust else {})}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def from_json(cls, d: Any) -> QualityModel:
        """The score :meth:`to_json` gave; a ValueError for anything else (a foreign or damaged
        record, or an atlas cut short), never a score half read."""
        why = "not a quality model of this cxrlabel"
        try:
            # a score fitted before a feature was added reads the features it knows
            if d.get("format") == FORMAT and set(d["features"]) <= {*FEATURES, "tta", SHAPE} and (
                    SHAPE in d["features"]) == ("atlas" in d):
                return cls(tuple(d["features"]), d["mean"], d["scale"], d["coef"], d["intercept"], d["knots"],
                           d["values"], d.get("info", {}), Atlas.from_json(d["atlas"]) if "atlas" in d else None,
                           Appearance.from_json(d["appearance"]) if "appearance" in d else None,
                           Trust.from_json(d["trust"]) if "trust" in d else None)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why += f", or a damaged one ({type(e).__name__}: {e})"
        raise ValueError(why)

    @classmethod
    def load(cls, path: Path) -> QualityModel:
        """The score :meth:`save` wrote; a ValueError naming the file for anything else."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a quality model of this cxrlabel, or a damaged one (not JSON: {e}); "
                             "fit it again with `cxrlabel quality fit`") from e
        except ValueError as e:
            raise ValueError(f"{path}: {e} (fit it again with `cxrlabel quality fit`)") from e


FORMAT = "cxrlabel-quality-1"


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators), as
    knots (each pooled block's mean ``x``, ascending) and values for ``np.interp``."""
    order = np.argsort(x, kind="stable")
    blocks: list[list[float]] = []  # [sum of y, count, sum of x]
    for xi, yi in zip(x[order], y[order], strict=True):
        blocks.append([yi, 1, xi])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            y2, n2, x2 = blocks.pop()
            blocks[-1] = [blocks[-1][0] + y2, blocks[-1][1] + n2, blocks[-1][2] + x2]
    return (np.array([b[2] / b[1] for b in blocks]), np.array([b[0] / b[1] for b in blocks]))


def sidecar(checkpoint: str | Path, tta: bool = False) -> Path:
    """Where a checkpoint's quality model lives: ``model.pt`` -> ``model.quality.json`` (with
    ``tta``: ``model.quality-tta.json``, the score that also reads :func:`tta_agreement`)."""
    return Path(checkpoint).with_suffix(".quality-tta.json" if tta else ".quality.json")




# ---------------------------------------------------------------- which score a model carries

# What a fitted quality score's calibration depends on, of how its fold models were trained:
# its features read the model's confidence, which training length and augmentation shape. The
# value is what a checkpoint that does not record the option was trained with (it predates it).
SCORE_RECIPE: dict[str, Any] = {"epochs": None, "shifts": False, "widen": 0.0, "widen_ctr": None,
                                "loss": "dicece", "width_loss": 0.0}


def recipe_of(training: dict) -> dict[str, Any]:
    """The :data:`SCORE_RECIPE` part of a checkpoint's training configuration, as a score's
    JSON holds it (a checkpoint's tuples as lists), so the two compare as they are."""
    return {k: list(v) if isinstance(v := training.get(k, absent), tuple) else v
            for k, absent in SCORE_RECIPE.items()}


def recipe_differences(fold_models: Any, training: dict | None) -> list[tuple[str, Any, Any]]:
    """(option, the score's fold models', the model's) where the two were trained otherwise.
    ``fold_models`` is a score's free-form info (a hand-edited file may hold anything there:
    what is not a readable record is no record); a score that records only its folds' epochs
    (fitted before the rest was recorded) is compared on those."""
    if not isinstance(fold_models, dict) or not isinstance(training, dict):
        return []
    fitted = fold_models.get("training")
    if not isinstance(fitted, dict):
        fitted = {"epochs": fold_models.get("epochs")}
    ours = recipe_of(training)
    return [(k, theirs, ours[k]) for k, theirs in fitted.items()
            if k in SCORE_RECIPE and theirs != ours[k]
            and (k != "epochs" or isinstance(theirs, int) and isinstance(ours[k], int))]


def checked(score: QualityModel, where: str, structures: Sequence[str], training: dict | None) -> QualityModel:
    """``score`` if it can score this model's masks (a ValueError naming ``where`` if its atlas
    draws structures the model does not); a warning when its fold models were trained
    otherwise than this model (``training``, its configuration): one fitted on 60-epoch folds
    read the true Dice 0.04 low on 120-epoch ones, and one fitted without ``--shifts`` 0.05
    low on folds trained with them (bench/RESULTS.md)."""
    if score.atlas is not None and not set(score.atlas.structures) <= set(structures):
        raise ValueError(f"{where}: its atlas draws {', '.join(score.atlas.structures)}, the model "
                         f"{', '.join(structures)}: not this model's score")
    differ = recipe_differences(score.info.get("fold_models"), training)
    if differ:
        log.warning("%s was fitted on fold models trained with %s, the model with %s: its estimated Dice "
                    "may read off; refit it with `cxrlabel quality fit --cv RUN_DIR` on a cross-validation "
                    "of this recipe (each fold's --checkpoint final)", where,
                    ", ".join(f"{k} {a}" for k, a, _ in differ), ", ".join(f"{k} {b}" for k, _, b in differ))
    return score


def from_sidecar(checkpoint: Path, structures: Sequence[str], training: dict | None = None,
                 tta: bool = False) -> QualityModel | None:
    """The score in the file beside ``checkpoint`` (:func:`sidecar`), :func:`checked`; None
    when there is none, or with a warning when it cannot be read or applied (labelling goes
    on with the heuristic)."""
    where = sidecar(checkpoint, tta)
    if not where.exists():
        return None
    try:
        return checked(QualityModel.load(where), str(where), structures, training)
    except (ValueError, KeyError, OSError) as e:
        log.warning("%s; labelling uses the heuristic quality score", e)
        return None


def store(engine: Engine, model: str, sha256: str, score: QualityModel, tta: bool = False) -> None:
    """Keep ``score`` in the database as the one for the checkpoint of hash ``sha256``
    (replacing an earlier one of the same kind); ``model``: the name it was fitted under."""
    row = {"model_sha256": sha256, "tta": bool(tta), "model": model, "score": json.dumps(score.to_json()),
           "fitted_at": D.utcnow(), "origin": str(score.info.get("fitted_on", ""))[:400]}
    with engine.begin() as conn:
        D.upsert(conn, D.quality_scores, [row], ["model_sha256", "tta"])


def stored(engine: Engine | None, sha256: str, tta: bool = False) -> tuple[QualityModel, str] | None:
    """The database's score for the checkpoint of hash ``sha256`` and a line saying where it
    came from; None when there is none (or no database). A damaged row is an error naming it."""
    if engine is None:
        return None
    q = D.quality_scores
    with engine.connect() as conn:
        row = conn.execute(select(q.c.score, q.c.model, q.c.fitted_at)
                           .where(q.c.model_sha256 == sha256, q.c.tta == bool(tta))).first()
    if row is None:
        return None
    where = f"the database's quality_scores row for {sha256[:12]}{' (tta)' if tta else ''}"
    try:
        return QualityModel.from_json(json.loads(row.score)), f"{where}, fitted {row.fitted_at:%Y-%m-%d %H:%M}"
    except ValueError as e:
        raise ValueError(f"{where}: {e} (fit it again with `cxrlabel quality fit`)") from e


@dataclass(frozen=True)
class Scores:
    """A model's quality scores (plain, and the one that reads test-time augmentation) and
    where each came from (``heuristic`` where there is none)."""

    plain: QualityModel | None
    tta: QualityModel | None
    plain_from: str
    tta_from: str


def scores_for(engine: Engine | None, checkpoint: Path, sha256: str, structures: Sequence[str],
               training: dict | None) -> Scores:
    """The scores a checkpoint labels with: the database's first, else the file beside it,
    else none (see the module's docstring). A database score that cannot be applied is
    skipped with a warning, as a damaged file is."""
    found: list[tuple[QualityModel | None, str]] = []
    for tta in (False, True):
        score, origin = None, "none: the heuristic score" if not tta else "none"
        try:
            got = stored(engine, sha256, tta)
            if got is not None:
                score, origin = checked(got[0], got[1], structures, training), got[1]
        except ValueError as e:
            log.warning("%s; the file beside the checkpoint is used, if any", e)
        if score is None:
            score = from_sidecar(checkpoint, structures, training, tta)
            if score is not None:
                origin = str(sidecar(checkpoint, tta))
        found.append((score, origin))
    return Scores(found[0][0], found[1][0], found[0][1], found[1][1])


# ---------------------------------------------------------------- scoring one image


def score_image(scorer: QualityModel | None, features: dict[str, dict[str, float]],
                agreement: dict[str, float], kept: dict[str, float], columns: dict[str, float | None],
                ctr: float | None, rim: float, tta: dict[str, float] | None = None,
                atlas_fit: dict[str, float] | None = None, border: float = 0.0,
                ) -> tuple[dict[str, dict[str, float]], dict]:
    """One image's quality: its structures' ``features`` completed with the image's own
    (:func:`image_features`, ``border`` its :func:`pipeline.quality.features.heart_border`;
    and test-time augmentation's agreement and the atlas's fit where measured), and the
    measurements ``quality_<structure>`` (estimated Dice) and ``quality`` (their mean), or
    without a scorer the :func:`heuristic` and no estimates; and ``trust``, the worklist's
    order, where the scorer carries a :class:`pipeline.quality.trust.Trust`."""
    whole = image_features(ctr, columns, rim, border)
    features = {s: {**f, **whole} for s, f in features.items()}
    for extra, name in ((tta, "tta"), (atlas_fit, SHAPE)):
        for s, v in (extra or {}).items():
            features[s][name] = v
    estimates = scorer.estimate(features) if scorer is not None else {}
    values = {f"quality_{s}": estimates.get(s) for s in STRUCTURES}
    quality = float(np.mean(list(estimates.values()))) if estimates else heuristic(agreement, kept, columns, ctr)
    values["quality"] = quality
    values["trust"] = (scorer.trust(quality, border) if scorer is not None and scorer.trust is not None
                       and estimates else None)
    return features, values


def plausibility(columns: dict[str, float | None], ctr: float | None) -> float:
    """1.0 for anatomically plausible masks; lower for missing structures, lungs on the
    wrong side (a flipped image), or a CTR outside 0.25-0.85. ``columns``: each structure's
    mean foreground column (any resolution), None when it is empty."""
    score = 1.0
    for s in STRUCTURES:
        if columns.get(s) is None:
            score *= 0.3
    if lungs_swapped(columns):
        score *= 0.3
    if ctr is None or not 0.25 <= ctr <= 0.85:
        score *= 0.5
    return score


def heuristic(agreement: dict[str, float], kept: dict[str, float], columns: dict[str, float | None],
              ctr: float | None) -> float:
    """The score of a model without a fitted one, in [0, 1]: per structure, the soft Dice of
    the model's probabilities against its own cleaned mask (``agreement``) and the share of
    foreground the clean-up kept (``kept``); times :func:`plausibility`."""
    return float(np.mean(list(agreement.values())) * np.mean(list(kept.values()))
                 * plausibility(columns, ctr))

"""Evaluate a model's predicted masks against manual masks stored in the database.

Per-structure Dice in original geometry, and the CTR error (predicted CTR minus the CTR
measured on the manual masks), over images that have both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.masks import STRUCTURES, load_masks
from pipeline.measure import measure
from pipeline.metrics import dice

DECODED_AT_ONCE = 50  # images whose masks (up to 3000 x 3000 each, both kinds) are decoded together


class EvaluateError(CxrlabelError):
    pass


@dataclass
class Evaluation:
    model: str
    images: int
    dice: dict[str, dict[str, float]] = field(default_factory=dict)  # structure -> mean/sd/n
    ctr_error: dict = field(default_factory=dict)  # mean, mae, sd, n, left_out, left_out_reasons
    per_image: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "dice": self.dice,
                "ctr_error": self.ctr_error, "per_image": self.per_image}


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "n": int(arr.size)}


def evaluate(engine: Engine, model: str = "default", truth: str = "manual") -> Evaluation:
    """Dice per structure and CTR error of ``model``'s masks against ``truth`` masks."""
    if truth != "manual":
        raise EvaluateError(f"--truth {truth!r}: only 'manual' masks serve as truth")
    m = D.masks
    with engine.connect() as conn:
        manual = set(conn.execute(select(m.c.uid).where(m.c.kind == "manual").distinct()).scalars())
        predicted = set(conn.execute(select(m.c.uid).where(m.c.kind == "predicted",
                                                           m.c.model == model).distinct()).scalars())
        uids = sorted(manual & predicted)
        if not uids:
            raise EvaluateError(f"no image has both manual masks and masks from model {model!r}: "
                                "import annotated masks (`cxrlabel masks import`) and label those "
                                f"images (`cxrlabel label --all --model {model}`)")
        spacing = {u: (sx, sy) for u, sx, sy in D.rows_in(
            conn, select(D.images.c.uid, D.images.c.spacing_x, D.images.c.spacing_y), D.images.c.uid, uids)}
        ev = Evaluation(model, len(uids))
        scores: dict[str, list[float]] = {s: [] for s in STRUCTURES}
        errors: list[float] = []
        left_out: dict[str, int] = {}
        for chunk in D.chunks(uids, DECODED_AT_ONCE):
            t = load_masks(conn, chunk)
            p = load_masks(conn, chunk, kind="predicted", model=model)
            for uid in chunk:
                row: dict = {"uid": uid}
                for s in STRUCTURES:
                    if s in t[uid] and s in p[uid]:
                        row[s] = dice(p[uid][s], t[uid][s])
                        scores[s].append(row[s])
                true = measure(t[uid], spacing.get(uid, (None, None)))
                pred = measure(p[uid], spacing.get(uid, (None, None)))
                if true["ctr"] is not None and pred["ctr"] is not None:
                    row["ctr_true"], row["ctr_pred"] = true["ctr"], pred["ctr"]
                    errors.append(pred["ctr"] - true["ctr"])
                else:  # a CTR needs the heart and both lungs, in the truth and the prediction
                    row["ctr_missing"] = "; ".join(f"{kind} lacks {m['ctr_missing']}" for kind, m in
                                                   (("truth", true), ("prediction", pred)) if m["ctr_missing"])
                    left_out[row["ctr_missing"]] = left_out.get(row["ctr_missing"], 0) + 1
                ev.per_image.append(row)
    ev.dice = {s: _stats(v) for s, v in scores.items()}
    err = np.asarray(errors)
    ev.ctr_error = {"mean": float(err.mean()) if err.size else math.nan,
                    "mae": float(np.abs(err).mean()) if err.size else math.nan,
                    "sd": float(err.std(ddof=1)) if err.size > 1 else math.nan, "n": int(err.size),
                    "left_out": sum(left_out.values()), "left_out_reasons": left_out}
    return ev

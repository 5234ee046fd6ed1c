"""A site's CTR calibration: the CTR a clinic's own readers draw, from the model's.

Another clinic's readers outline the heart their own way, and its equipment frames films its
own way: the model's CTR is then precise but offset there (a hidden set of older films read
-0.010 on average). A few dozen of the clinic's annotated films measure the offset; the
calibration maps the model's CTR onto the clinic's convention, ``intercept + slope x CTR``
(``offset``: slope 1, the mean difference; ``linear``: least squares, which also undoes a
compressed range, at the price of more films). It is fitted per model (the exact weights,
by sha256) and site (a catalogue source, what a user names on loading a clinic's films), on
films the model never trained on, and ``label_results`` shows it beside the raw CTR as
``ctr_calibrated``, never instead of it.

Intervals are percentile bootstraps of the films (:data:`RESAMPLES`, seeded). The benefit is
judged as a user would meet it: leave-one-film-out MAE of the raw and the calibrated CTR on
the films behind it (``details``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D

KINDS = ("offset", "linear")
MIN_FILMS = {"offset": 10, "linear": 20}  # fewer and the interval is wider than the offset it corrects
RESAMPLES = 2000


class CalibrationError(CxrlabelError):
    pass


@dataclass
class Calibration:
    model: str
    model_sha256: str
    site: str
    kind: str
    intercept: float
    slope: float
    intercept_ci: tuple[float, float]
    slope_ci: tuple[float, float]
    films: int
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"model": self.model, "model_sha256": self.model_sha256, "site": self.site, "kind": self.kind,
                "intercept": self.intercept, "slope": self.slope, "intercept_ci": list(self.intercept_ci),
                "slope_ci": list(self.slope_ci), "films": self.films, **self.details}


def fit_line(pred: np.ndarray, true: np.ndarray, kind: str) -> tuple[float, float]:
    """``(intercept, slope)`` taking ``pred`` to ``true``: the mean difference (``offset``) or
    least squares (``linear``)."""
    if kind == "offset":
        return float(np.mean(true - pred)), 1.0
    slope, intercept = np.polyfit(pred, true, 1)
    return float(intercept), float(slope)


def fit(pred: np.ndarray, true: np.ndarray, kind: str = "offset", seed: int = 0) -> dict:
    """The calibration of ``pred`` onto ``true`` with bootstrap intervals and the
    leave-one-out figures (what a new film of the site would see)."""
    if kind not in KINDS:
        raise CalibrationError(f"calibration kind {kind!r}: use {' or '.join(KINDS)}")
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    n = len(pred)
    intercept, slope = fit_line(pred, true, kind)
    rng = np.random.default_rng(seed)
    boots = np.array([fit_line(pred[k], true[k], kind) for k in (rng.integers(0, n, n) for _ in range(RESAMPLES))
                      if kind == "offset" or np.ptp(pred[k]) > 0])
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    loo = np.empty(n)
    for k in range(n):
        keep = np.arange(n) != k
        a, b = fit_line(pred[keep], true[keep], kind)
        loo[k] = a + b * pred[k]
    return {"intercept": intercept, "slope": slope, "intercept_ci": (float(lo[0]), float(hi[0])),
            "slope_ci": (float(lo[1]), float(hi[1])),
            "raw": {"bias": float(np.mean(pred - true)), "mae": float(np.mean(np.abs(pred - true)))},
            "calibrated_loo": {"bias": float(np.mean(loo - true)), "mae": float(np.mean(np.abs(loo - true)))}}


def calibrate(engine: Engine, model: str, site: str, kind: str = "offset", min_films: int | None = None,
              store: bool = True) -> Calibration:
    """Fit ``model``'s CTR calibration at ``site`` on the site's films with manual heart and
    lung masks that the model labelled and never trained on; stored (replacing the model's
    earlier one there) unless ``store`` is False."""
    from pipeline.evaluate import NothingHeldOut, evaluate
    from pipeline.model import locate
    from pipeline.model.checkpoints import file_sha256
    with engine.connect() as conn:
        among = set(conn.execute(select(D.images.c.uid).where(D.images.c.source == site)).scalars())
        if not among:
            sites = sorted(conn.execute(select(D.images.c.source).distinct()).scalars())
            raise CalibrationError(f"no film of site {site!r} (a site is a catalogue source): the sources are "
                                   f"{', '.join(sites) or 'none yet'}")
    try:
        ev = evaluate(engine, model, among=among)
    except NothingHeldOut as e:
        raise CalibrationError(f"site {site!r}: {e}") from None
    rows = [r for r in ev.per_image if "ctr_true" in r]
    need = min_films or MIN_FILMS[kind]
    if len(rows) < need:
        raise CalibrationError(f"site {site!r}: {len(rows)} films with a CTR from manual heart and lung masks that "
                               f"{model!r} labelled and never trained on; a {kind} calibration needs {need}: annotate "
                               "more of the site's films (or lower --min-films, and read its wider interval)")
    pred = np.array([r["ctr_pred"] for r in rows], float)
    true = np.array([r["ctr_true"] for r in rows], float)
    got = fit(pred, true, kind)
    sha = file_sha256(locate(engine, model)[0])
    cal = Calibration(model, sha, site, kind, got["intercept"], got["slope"], got["intercept_ci"], got["slope_ci"],
                      len(rows), {"raw": got["raw"], "calibrated_loo": got["calibrated_loo"],
                                  "uids": sorted(r["uid"] for r in rows)})
    if store:
        save(engine, cal)
    return cal


def save(engine: Engine, cal: Calibration) -> None:
    c = D.ctr_calibrations
    row = {"model_sha256": cal.model_sha256, "site": cal.site, "model": cal.model, "kind": cal.kind,
           "intercept": cal.intercept, "slope": cal.slope, "intercept_low": cal.intercept_ci[0],
           "intercept_high": cal.intercept_ci[1], "slope_low": cal.slope_ci[0], "slope_high": cal.slope_ci[1],
           "films": cal.films, "details": json.dumps(cal.details), "fitted_at": D.utcnow()}
    with engine.begin() as conn:
        D.upsert(conn, c, [row], ["model_sha256", "site"])


def calibrations(engine: Engine) -> list[dict]:
    """Every stored calibration, for ``cxrlabel calibrate --list``."""
    c = D.ctr_calibrations
    with engine.connect() as conn:
        rows = conn.execute(select(c).order_by(c.c.model, c.c.site)).mappings().all()
    out = []
    for r in rows:
        details = json.loads(r["details"] or "{}")
        out.append({"model": r["model"], "site": r["site"], "kind": r["kind"], "intercept": round(r["intercept"], 4),
                    "slope": round(r["slope"], 4), "films": r["films"],
                    "mae_raw": round(details.get("raw", {}).get("mae", float("nan")), 4),
                    "mae_calibrated": round(details.get("calibrated_loo", {}).get("mae", float("nan")), 4),
                    "model_sha256": r["model_sha256"][:12], "fitted_at": r["fitted_at"]})
    return out


def forget(engine: Engine, model_sha256: str, site: str) -> int:
    c = D.ctr_calibrations
    with engine.begin() as conn:
        return conn.execute(delete(c).where(c.c.model_sha256 == model_sha256, c.c.site == site)).rowcount

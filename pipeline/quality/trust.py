"""The review worklist's order: how far a film's masks *and its CTR* can be trusted.

The quality score estimates Dice, and Dice barely weighs the few columns that set the heart's
width: a heart whose lower border the film hides (an apex in the diaphragm, a hazy film) keeps
a high Dice while its CTR reads low. :class:`Trust` reads two things of a labelled film, each
as where it falls among the films the score was fitted on (their empirical distribution, so
neither's scale dominates): its estimated quality, and how plainly the film shows the heart's
width-setting borders (:func:`pipeline.quality.features.heart_border`). Their weighted mean is
``measurements.trust`` in [0, 1]: 0 is reviewed first. The weight is the one that best finds
the films with the worst CTR error, chosen leaving each fold out (:func:`fit_trust`; 1 where
no fitting film has a true CTR); the quality stays the Dice estimate it is, and the worklist
orders by trust where a score has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.metrics import auc

KNOTS = 101  # quantiles kept of each distribution
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # the border's weights tried against quality's 1
WORST = 0.1  # what the weight is chosen for: the worst tenth of films by CTR error
UNCHOSEN = 1.0  # the weight where no fitting film has a true CTR to choose one on: the two read alike


@dataclass(frozen=True)
class Trust:
    """Where a film's quality and heart border fall among the fitting films' (``KNOTS``
    quantiles of each), weighted ``1 : weight``; ``films``: how many it was fitted on."""

    quality: tuple[float, ...]
    border: tuple[float, ...]
    weight: float
    films: int

    def __call__(self, quality: float, border: float) -> float:
        """0 (review first) to 1 (the most trusted)."""
        return float(_mixed(*self.shares(quality, border), self.weight))

    def shares(self, quality: float, border: float) -> tuple[float, float]:
        """The shares of the fitting films below ``quality`` and below ``border``."""
        return _share_below(self.quality, quality), _share_below(self.border, border)

    def to_json(self) -> dict:
        return {"quality": list(self.quality), "heart_border": list(self.border), "weight": self.weight,
                "films": self.films}

    @classmethod
    def from_json(cls, d: dict) -> Trust:
        """What :meth:`to_json` wrote; a ValueError for anything else."""
        q, b = tuple(map(float, d["quality"])), tuple(map(float, d["heart_border"]))
        if len(q) != KNOTS or len(b) != KNOTS or np.any(np.diff(q) < 0) or np.any(np.diff(b) < 0):
            raise ValueError(f"a trust of {len(q)} and {len(b)} quantiles, not {KNOTS} ascending each")
        return cls(q, b, float(d["weight"]), int(d["films"]))


def _share_below(knots: Sequence[float], x: float) -> float:
    """The share of the fitting films below ``x``, read off the quantiles (ties: the middle)."""
    k = np.asarray(knots)
    levels = np.linspace(0.0, 1.0, len(k))
    lo, hi = np.searchsorted(k, x, "left"), np.searchsorted(k, x, "right")
    if hi > lo:  # x is a knot, or several
        return float((levels[lo] + levels[hi - 1]) / 2)
    return float(np.interp(x, k, levels))


def _mixed(quality_share, border_share, weight: float):
    """The trust of films at these shares (floats or arrays), weighted ``1 : weight``."""
    return (quality_share + weight * border_share) / (1.0 + weight)


def made(quality: np.ndarray, border: np.ndarray, weight: float) -> Trust:
    """The trust of films with these qualities and borders, at ``weight``."""
    levels = np.linspace(0.0, 1.0, KNOTS)
    return Trust(tuple(np.quantile(quality, levels).tolist()), tuple(np.quantile(border, levels).tolist()),
                 float(weight), len(quality))


def finds_worst(trust: Sequence[float] | np.ndarray, errors: Sequence[float | None]) -> float:
    """The AUROC of finding the worst tenth of films by CTR error (``errors``: None for a film
    without a true CTR) from ``trust`` (or any score where low means doubted); NaN with under
    10 films that have a CTR error."""
    err = np.array([np.nan if e is None else e for e in errors], float)
    known = ~np.isnan(err)
    if known.sum() < 10:
        return float("nan")
    worst = err[known] >= np.quantile(err[known], 1 - WORST)
    score = np.asarray(trust, float)[known]
    return auc(-score[worst], -score[~worst])


def fit_trust(films: list[dict]) -> Trust:
    """The trust of ``films`` (per film: ``estimate`` (its held-out quality), ``border``, ``fold``,
    ``ctr_error`` or None): the weight that, fitted on the other folds, best finds the worst
    tenth of each fold's films by CTR error (films with a true CTR); where no film has one (a
    source that draws no heart alone), :data:`UNCHOSEN`: quality and border read alike. Fitted
    on GeneralBlockchain alone and judged on Wingspan, that found the worst CTR errors at AUROC
    0.85 on the films as they are, the quality alone at 0.65 (bench/RESULTS.md)."""
    quality = np.array([f["estimate"] for f in films], float)
    border = np.array([f["border"] for f in films], float)
    folds = np.array([f["fold"] for f in films])
    errors = [f["ctr_error"] for f in films]
    weight = UNCHOSEN
    if len({f for f, e in zip(folds, errors, strict=True) if e is not None}) > 1:
        # each film's shares among the other folds' films, once: a weight only mixes them
        shares = np.zeros((len(films), 2))
        for k in sorted(set(folds)):
            t = made(quality[folds != k], border[folds != k], 0.0)
            shares[folds == k] = [t.shares(q, b) for q, b in zip(quality[folds == k], border[folds == k], strict=True)]
        best = -1.0
        for w in WEIGHTS:
            held = _mixed(shares[:, 0], shares[:, 1], w)
            found = finds_worst(held, errors)  # NaN (under 10 films with a CTR): never chosen
            if found > best + 1e-9:
                best, weight = found, w
    return made(quality, border, weight)


def held_out_trust(films: list[dict]) -> list[float]:
    """Each film's trust by one fitted (weight chosen too) on the other folds' films alone."""
    folds = np.array([f["fold"] for f in films])
    out = [0.0] * len(films)
    for k in sorted(set(folds)):
        t = fit_trust([f for f, j in zip(films, folds, strict=True) if j != k])
        for n in np.flatnonzero(folds == k):
            out[n] = t(films[n]["estimate"], films[n]["border"])
    return out

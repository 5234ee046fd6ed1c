import numpy as np
import pytest

from pipeline.quality.fit import roc_auc
from pipeline.quality.trust import KNOTS, Trust, fit_trust, held_out_trust, made


def test_trust_ranks_by_quality_and_the_hearts_border_against_the_fitting_films():
    rng = np.random.default_rng(0)
    quality, border = rng.uniform(0.85, 0.99, 500), rng.uniform(-0.2, 0.8, 500)
    t = made(quality, border, 1.0)
    assert t(0.86, 0.5) < t(0.98, 0.5)  # a lower quality is trusted less
    assert t(0.95, -0.1) < t(0.95, 0.7)  # so is a border the film does not show
    assert t(0.80, -1.0) == 0.0 and t(1.0, 2.0) == 1.0  # beyond every fitting film
    assert t(float(np.median(quality)), float(np.median(border))) == pytest.approx(0.5, abs=0.02)
    blind = made(quality, border, 0.0)
    assert blind(0.95, -0.1) == blind(0.95, 0.7)  # weight 0: the quality's rank alone
    again = Trust.from_json(t.to_json())
    assert again == t and len(again.quality) == KNOTS
    with pytest.raises(ValueError, match="quantiles"):
        Trust.from_json({**t.to_json(), "quality": t.to_json()["quality"][:50]})
    with pytest.raises(ValueError, match="ascending"):
        Trust.from_json({**t.to_json(), "heart_border": t.to_json()["heart_border"][::-1]})


def _films(n: int = 600, seed: int = 1) -> list[dict]:
    """Films whose CTR error follows a hidden border more than their (Dice) quality."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        quality, border = rng.uniform(0.88, 0.99), rng.uniform(-0.2, 0.8)
        err = abs(rng.normal(0, 0.01)) + 0.05 * (border < 0.1) + 0.2 * (0.99 - quality) * rng.uniform()
        out.append({"estimate": quality, "border": border, "fold": i % 5, "ctr_error": err if i % 3 else None})
    return out


def test_the_borders_weight_is_chosen_held_out_to_find_the_worst_ctr_errors():
    films = _films()
    t = fit_trust(films)
    assert t.weight > 0 and t.films == len(films)
    held = held_out_trust(films)
    known = [n for n, f in enumerate(films) if f["ctr_error"] is not None]
    err = np.array([films[n]["ctr_error"] for n in known])
    worst = err >= np.quantile(err, 0.9)
    by_trust = roc_auc(-np.array([held[n] for n in known]), worst)
    by_quality = roc_auc(-np.array([films[n]["estimate"] for n in known]), worst)
    assert by_trust > by_quality + 0.1
    # films with no true CTR anywhere: nothing to choose a weight on, so the two read alike
    assert fit_trust([{**f, "ctr_error": None} for f in films]).weight == 1.0

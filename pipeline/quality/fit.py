"""Fitting a model's quality score on annotated films it did not train on (``cxrlabel quality fit``).

One pass: the films (:func:`pipeline.quality.films.from_folds` or
:func:`~pipeline.quality.films.from_database`), each film's variants labelled once with their
features (:func:`pipeline.quality.films.label`), then the fit (:func:`fit_films`). The score is fitted leaving one
fold out at a time and judged on that fold (:func:`judge`: Spearman and MAE against the true
mean Dice, calibration by decile, the AUROC of finding the worst tenth of films by CTR
error), then fitted on every fold, stored and drawn."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine

from pipeline.metrics import auc
from pipeline.model import resolve_model
from pipeline.quality.features import FEATURES, SHAPE
from pipeline.quality.films import Films, FitError, from_database, from_folds, label, variants
from pipeline.quality.score import QualityModel, store
from pipeline.quality.trust import WORST, finds_worst, fit_trust, held_out_trust
from pipeline.regular import check_output_file


def held_out_estimates(rows: list[dict], structures: Sequence[str], alpha: float = 1.0,
                       names: tuple[str, ...] = FEATURES) -> list[float | None]:
    """Each mask's estimate by a score fitted on the other folds (None for masks of no fold
    with a true Dice to fit on)."""
    estimate: list[float | None] = [None] * len(rows)
    for k in sorted({r["fold"] for r in rows}):  # the score never sees the films it is judged on
        train = [r for r in rows if r["fold"] != k]
        model = QualityModel.fit(train, [r["dice"] for r in train], list(structures), alpha, names=names)
        estimate_into(estimate, model, rows, [n for n, r in enumerate(rows) if r["fold"] == k], names)
    return estimate


def estimate_into(estimate: list, score: QualityModel, rows: list[dict], which, names) -> None:
    """``score``'s estimate of the masks ``which`` (indices into ``rows``), each image's
    structures read together as labelling reads them, written into ``estimate``."""
    images: dict[str, dict[str, int]] = {}
    for n in which:
        images.setdefault(rows[n]["image"], {})[rows[n]["structure"]] = n
    for members in images.values():
        got = score.estimate({s: {f: rows[n][f] for f in names} for s, n in members.items()})
        for s, n in members.items():
            estimate[n] = got.get(s)


@dataclass
class Judged:
    """How a score's held-out estimates compare with the truth, per film (variant)."""

    films: int
    spearman: float  # of the estimated with the true mean Dice
    mae: float
    heuristic_spearman: float  # the fallback score's, for comparison
    worst_share: float  # of the films with true mean Dice < 0.9, the share in the worst tenth by estimate
    auroc: float  # of finding the worst tenth by CTR error from the estimate (films with a true CTR)
    ctr_films: int
    calibration: list[list[float]]  # per decile of the estimate: mean estimate, mean true, films
    true: list[float] = field(default_factory=list, repr=False)
    estimate: list[float] = field(default_factory=list, repr=False)
    by_source: dict[str, Judged] = field(default_factory=dict, repr=False)  # the same, per images.source
    trust_auroc: float = math.nan  # the same AUROC by the worklist's trust (pipeline.quality.trust), held out
    auroc_dice: float = math.nan  # of finding the worst tenth by true mean Dice from the estimate
    trust_auroc_dice: float = math.nan  # the same by the trust
    unseen: dict[str, Judged] = field(default_factory=dict, repr=False)  # per source: fitted without its films

    def as_dict(self) -> dict:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()
               if k not in ("true", "estimate", "by_source", "unseen")}
        return (out | ({"by_source": {k: j.as_dict() for k, j in self.by_source.items()}} if self.by_source else {})
                | ({"unseen_source": {k: j.as_dict() for k, j in self.unseen.items()}} if self.unseen else {}))


def _films(rows: list[dict], keep) -> list[list[int]]:
    """The indices of ``rows`` grouped by film (variant), each row kept where ``keep(n, row)``."""
    groups: dict[str, list[int]] = {}
    for n, r in enumerate(rows):
        if keep(n, r):
            groups.setdefault(r["image"], []).append(n)
    return list(groups.values())


def _ctr_error(row: dict) -> float | None:
    """A film's absolute CTR error (any of its rows carries it), None without a true CTR."""
    return (abs(row["ctr_pred"] - row["ctr_true"]) if row.get("ctr_true") is not None
            and row.get("ctr_pred") is not None else None)


def per_image(rows: list[dict], estimate: Sequence[float | None]) -> list[dict]:
    """Per film (variant): its true and estimated mean Dice over the structures its source
    draws, the heuristic score, and its CTR error (None without a true CTR)."""
    out = []
    for members in _films(rows, lambda n, r: r["dice"] is not None and estimate[n] is not None):
        first = rows[members[0]]
        out.append({"source": first.get("source"), "true": float(np.mean([rows[n]["dice"] for n in members])),
                    "estimate": float(np.mean([estimate[n] for n in members])),
                    "heuristic": first["heuristic"], "ctr_error": _ctr_error(first), "shift": first["shift"]})
    return out


def trust_films(rows: list[dict], estimate: Sequence[float | None]) -> list[dict]:
    """Per film (variant), what :mod:`pipeline.quality.trust` reads: its quality as labelling
    stores it (the mean estimate over every structure), its heart border, fold and CTR error."""
    out = []
    for members in _films(rows, lambda n, r: estimate[n] is not None):
        first = rows[members[0]]
        dice = [rows[n]["dice"] for n in members if rows[n]["dice"] is not None]
        out.append({"estimate": float(np.mean([estimate[n] for n in members])), "border": first["heart_border"],
                    "fold": first["fold"], "ctr_error": _ctr_error(first),
                    "dice": float(np.mean(dice)) if dice else None})
    return out


def judge(rows: list[dict], estimate: Sequence[float | None], source: str | None = None) -> Judged:
    """The held-out figures of ``estimate`` (see :class:`Judged`); ``source``: of that
    source's films only."""
    films = [f for f in per_image(rows, estimate) if source is None or f["source"] == source]
    if not films:
        raise FitError(f"no held-out film{f' of source {source}' if source else ''} with a true mask")
    true = np.array([f["true"] for f in films])
    est = np.array([f["estimate"] for f in films])
    heur = np.array([f["heuristic"] for f in films])
    errors = [f["ctr_error"] for f in films]
    return Judged(len(films), spearman(est, true), float(np.mean(np.abs(est - true))), spearman(heur, true),
                  worst_share(est, true), finds_worst(est, errors), sum(e is not None for e in errors),
                  calibration(est, true), true.tolist(), est.tolist(), auroc_dice=finds_worst(est, (1 - true).tolist()))


def judge_trust(judged: Judged, films: list[dict], trust: Sequence[float]) -> None:
    """Into ``judged``: how well ``trust`` (per film of ``films``, :func:`trust_films`) finds the
    worst tenth by CTR error and by true mean Dice."""
    judged.trust_auroc = finds_worst(trust, [f["ctr_error"] for f in films])
    known = [n for n, f in enumerate(films) if f["dice"] is not None]
    judged.trust_auroc_dice = finds_worst([trust[n] for n in known], [1 - films[n]["dice"] for n in known])


def unseen_sources(rows: list[dict], structures: Sequence[str], alpha: float = 1.0,
                   names: tuple[str, ...] = FEATURES) -> dict[str, Judged]:
    """Per source (``images.source``) of two or more: the score and the trust fitted on the
    other sources' films alone, judged on its films, as on a clinic's films of equipment and
    readers the score never saw. A structure no other source draws has no estimate there (the
    heart alone, fitted on a source that draws the cardiomediastinum): its films' mean Dice is
    then the other structures'."""
    sources = sorted({r["source"] for r in rows if r.get("source")})
    out: dict[str, Judged] = {}
    for src in sources if len(sources) > 1 else ():
        others = [r for r in rows if r.get("source") != src]
        if not any(r["dice"] is not None for r in others):
            continue
        score = QualityModel.fit(others, [r["dice"] for r in others], list(structures), alpha, names=names)
        estimate: list[float | None] = [None] * len(rows)
        estimate_into(estimate, score, rows, [n for n, r in enumerate(rows) if r.get("source") == src], names)
        try:
            judged = judge(rows, estimate, src)
        except FitError:  # no structure of its films has both a truth and an estimate
            continue
        if all("heart_border" in r for r in rows):
            trust = fit_trust(trust_films(others, held_out_estimates(others, structures, alpha, names)))
            films = trust_films(rows, estimate)
            judge_trust(judged, films, [trust(f["estimate"], f["border"]) for f in films])
        out[src] = judged
    return out


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's rho and the AUROC)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - counts + (counts - 1) / 2)[inverse]


def spearman(a, b) -> float:
    """Spearman's rho; NaN with under two values or where either side never varies."""
    a, b = rank(np.asarray(a, float)), rank(np.asarray(b, float))
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and np.ptp(a) > 0 and np.ptp(b) > 0 else math.nan


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties count half):
    :func:`pipeline.metrics.auc` of the two sides."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    return auc(score[positive], score[~positive])


def worst_share(score: np.ndarray, true: np.ndarray, bad: float = 0.9, worst: float = WORST) -> float:
    """Share of the films with true Dice below ``bad`` that the lowest ``worst`` of ``score`` holds."""
    flagged = np.argsort(score, kind="stable")[:max(1, int(round(worst * len(score))))]
    n_bad = int(np.sum(true < bad))
    return float(np.sum(true[flagged] < bad) / n_bad) if n_bad else math.nan


def calibration(est: np.ndarray, true: np.ndarray, bins: int = 10) -> list[list[float]]:
    """Per decile of the estimate: ``[mean estimate, mean true Dice, films]``."""
    if not len(est):
        return []
    edges = np.quantile(est, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, est, "right") - 1, 0, bins - 1)
    return [[round(float(est[which == b].mean()), 4), round(float(true[which == b].mean()), 4),
             int(np.sum(which == b))] for b in range(bins) if np.any(which == b)]


FEW_FILMS = 50  # below it, a worst tenth of under 5 films: an AUROC that one film moves by 0.1 or more


@dataclass
class Fitted:
    """A fitted score and its held-out figures (and the one that reads test-time augmentation)."""

    score: QualityModel
    judged: Judged
    tta_score: QualityModel | None = None
    tta_judged: Judged | None = None
    stored: list[str] = field(default_factory=list)  # where each was kept, in words
    films: int = 0  # distinct annotated films behind the figures (each is judged in several variants)

    def too_few(self) -> str | None:
        """A plain warning when too few films stand behind the held-out figures, else None."""
        if self.films >= FEW_FILMS:
            return None
        return (f"only {self.films} films stand behind these figures (their worst tenth is {self.films // 10} "
                f"film(s)): read them as rough, not as the score's accuracy; {FEW_FILMS} or more annotated or "
                "reviewed films give figures you can quote")


def fit_films(films: Films, structures: Sequence[str], alpha: float = 1.0, tta: bool = False,
              ) -> tuple[QualityModel, Judged, QualityModel | None, Judged | None]:
    """The score fitted on every fold of ``films`` and judged leaving each out; with ``tta``
    (rows that carry it) also the score that reads test-time augmentation."""
    rows = [r for r in films.rows if r["shift"] != "widened"]  # bench/ctr_bands.py's synthetic hearts: not here
    if not any(r["dice"] is not None for r in rows):
        raise FitError("no labelled film has a true mask: nothing to fit on")
    base = FEATURES + ((SHAPE,) if films.atlas is not None and all(SHAPE in r for r in rows) else ())
    out: list = []
    for names in (base, base + ("tta",)) if tta else (base,):
        estimate = held_out_estimates(rows, structures, alpha, names)
        judged = judge(rows, estimate)
        if not out:  # the plain score's figures per source
            sources = sorted({r["source"] for r in rows if r.get("source")} if len({r.get("source") for r in rows}) > 1
                             else set())
            judged.by_source = {src: judge(rows, estimate, src) for src in sources}
        held_out = {"spearman": round(judged.spearman, 4), "mae": round(judged.mae, 4),
                    "auroc_worst_tenth_ctr": _rounded(judged.auroc),
                    "worst_10pct_share_below_0_9": _rounded(judged.worst_share)}
        info = {"fitted": datetime.date.today().isoformat(), "fitted_on": films.source,
                "films": films.images, "masks": sum(r["dice"] is not None for r in rows), "folds": films.folds,
                "shifts": sorted({r["shift"] for r in rows} - {"none"}), "features": list(names),
                "fold_models": films.fold_models,
                "held_out": held_out,
                "calibration": judged.calibration}
        if judged.by_source:
            info["held_out_by_source"] = {src: {"films": j.films, "spearman": round(j.spearman, 4),
                                                "mae": round(j.mae, 4), "auroc_worst_tenth_ctr": _rounded(j.auroc)}
                                          for src, j in judged.by_source.items()}
        if films.fold_models is None:
            info.pop("fold_models")
        trust = None
        if all("heart_border" in r for r in rows):  # rows measured before the feature existed: no trust
            per_film = trust_films(rows, estimate)
            judge_trust(judged, per_film, held_out_trust(per_film))
            trust = fit_trust(per_film)
            held_out["auroc_worst_tenth_ctr_by_trust"] = _rounded(judged.trust_auroc)
            info["trust_weight"] = trust.weight
        held_out["auroc_worst_tenth_dice"] = _rounded(judged.auroc_dice)
        if judged.trust_auroc_dice == judged.trust_auroc_dice:
            held_out["auroc_worst_tenth_dice_by_trust"] = _rounded(judged.trust_auroc_dice)
        if names == base:  # the plain score's figures on a source it never saw
            judged.unseen = unseen_sources(rows, structures, alpha, names)
            if judged.unseen:
                info["held_out_unseen_source"] = {src: _figures(j) for src, j in judged.unseen.items()}
        score = QualityModel.fit(rows, [r["dice"] for r in rows], list(structures), alpha, info, names, films.atlas,
                                 films.appearance, trust)
        out += [score, judged]
    return (out[0], out[1], *(out[2:] if tta else (None, None)))


def _rounded(x: float) -> float | None:
    return round(x, 4) if x == x else None


def _figures(j: Judged) -> dict:
    """What a score keeps of a judgement (``info``), NaN as None."""
    return {"films": j.films, "spearman": _rounded(j.spearman), "mae": _rounded(j.mae),
            "auroc_worst_tenth_dice": _rounded(j.auroc_dice), "auroc_worst_tenth_ctr": _rounded(j.auroc),
            "auroc_worst_tenth_dice_by_trust": _rounded(j.trust_auroc_dice),
            "auroc_worst_tenth_ctr_by_trust": _rounded(j.trust_auroc)}


def fit(engine: Engine, model: str = "default", cv: Path | None = None, checkpoint: str = "final",
        sample: str | None = None, folds: int = 5, shifts: bool = False, tta: bool = False, alpha: float = 1.0,
        out: Path | None = None, figure: Path | None = None, cache: str | None = None, seed: int = 0,
        progress: bool = True, force: bool = False) -> Fitted:
    """Fit ``model``'s quality score on films it did not train on (a cross-validation run
    ``cv`` of its recipe, or the database's annotated films), store it in the database for the
    model's checkpoint and, with ``out``, also in that file (never inside the installed
    package); with ``figure``, draw the held-out calibration there. A score whose held-out
    figures say it ranks nothing (:func:`not_worth_installing`) replaces no score but with
    ``force``."""
    lm = resolve_model(engine, model, "cpu")
    if out is not None:
        refuse_package_path(out)
        for path in (out, tta_path(out)):
            check_output_file(path, _is_score_file, FitError, "score file")
    if figure is not None:
        check_output_file(figure, _is_our_figure, FitError, "figure")
    chosen = (from_folds(engine, cv, cache, checkpoint, shifts) if cv is not None
              else from_database(engine, lm, cache, folds, seed, sample, shifts))  # the films,
    films = label(chosen, variants(shifts), tta, seed, progress)  # each variant's features,
    try:  # and the score fitted on them
        score, judged, tta_score, tta_judged = fit_films(films, lm.spec.structures, alpha, tta)
    except np.linalg.LinAlgError as e:
        raise FitError(f"--alpha {alpha:g}: the ridge regression is singular on these films ({e}); use a "
                       "positive --alpha (1 is the default)") from None
    for name, j in (("the score", judged), ("the score with --tta", tta_judged)):
        if j is not None and not force and (why := not_worth_installing(j)):
            raise FitError(f"{name} was not kept: {why}. Fit on more, and more varied, annotated films, or keep "
                           "it anyway with --force")
    result = Fitted(score, judged, tta_score, tta_judged, films=films.images)
    for s, is_tta in ((score, False), (tta_score, True)):
        if s is None:
            continue
        store(engine, lm.name, lm.sha256, s, is_tta)
        result.stored.append(f"the database (quality_scores, {lm.name} {lm.sha256[:12]}{', tta' if is_tta else ''})")
        if out is not None:
            path = out if not is_tta else tta_path(out)
            s.save(path)
            result.stored.append(str(path))
    if figure is not None:
        calibration_figure(judged, figure, f"{lm.name}: {films.source}")
    return result


MIN_SPEARMAN = 0.3  # held out, with the true mean Dice: the shipped scores read 0.75-0.81; 0.3 ranks little


def not_worth_installing(j: Judged) -> str | None:
    """Why a fitted score should not replace the one a model labels with, from its held-out
    figures (None: keep it): figures missing or NaN (too few films, or films that differ in
    nothing: four copies of one film gave Spearman NaN and then read every film 0.9738), or a
    Spearman below :data:`MIN_SPEARMAN`."""
    if j.films < 3 or not math.isfinite(j.spearman) or not math.isfinite(j.mae):
        return (f"its held-out figures are missing ({j.films} films; Spearman {j.spearman:.3f}, MAE {j.mae:.4f}): "
                "the films do not differ enough to rank them")
    if j.spearman < MIN_SPEARMAN:
        return f"held out it ranks the films at Spearman {j.spearman:.3f}, below the floor of {MIN_SPEARMAN}"
    return None


def tta_path(out: Path) -> Path:
    """Where ``--out``'s test-time-augmentation score goes, beside it."""
    return out.with_name(out.name.replace(".quality.json", ".quality-tta.json") if out.name.endswith(".quality.json")
                         else out.stem + "-tta" + out.suffix)


FIGURE_SOFTWARE = "cxrlabel"  # the PNG tEXt Software of our figures: how a later run knows one it may replace


def _is_score_file(path: Path) -> bool:
    QualityModel.from_json(json.loads(path.read_text()))
    return True


def _is_our_figure(path: Path) -> bool:
    head = path.read_bytes()[:4096]
    return head.startswith(b"\x89PNG") and b"Software\x00" + FIGURE_SOFTWARE.encode() in head


def refuse_package_path(path: Path) -> None:
    """A fitted score is the user's data: never written inside the installed package."""
    from importlib.resources import files
    package = Path(str(files("pipeline"))).resolve()
    target = Path(path).resolve()
    if target == package or package in target.parents:
        raise FitError(f"{path}: inside the installed cxrlabel package; keep the score in the database (the "
                       "default) or name a file of your own with --out")


def calibration_figure(judged: Judged, path: Path, title: str) -> Path:
    """Estimated against true mean Dice per held-out film, with the deciles' means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    est, true = np.array(judged.estimate), np.array(judged.true)
    table = np.array(judged.calibration, float).reshape(-1, 3)
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    lo = float(min(est.min(initial=1), true.min(initial=1), 0.8)) - 0.02
    ax.plot([lo, 1], [lo, 1], color="k", lw=0.8, ls="--", label="perfect calibration")
    ax.scatter(est, true, s=5, alpha=0.35, color="tab:gray", label="held-out films")
    ax.plot(table[:, 0], table[:, 1], "o-", color="tab:red", label="deciles of the estimate")
    ax.set(xlim=(lo, 1.005), ylim=(lo, 1.005), xlabel="estimated Dice (quality)", ylabel="true mean Dice",
           title=f"{title[:70]}\nheld out: Spearman {judged.spearman:.2f}, MAE {judged.mae:.3f}, "
                 f"AUROC {judged.auroc:.2f}")
    ax.title.set_fontsize(8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": FIGURE_SOFTWARE})
    plt.close(fig)
    return Path(path)

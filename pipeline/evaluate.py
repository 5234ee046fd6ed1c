"""Evaluate a model's predicted masks against manual masks stored in the database.

Per-structure Dice in original geometry, and the CTR's agreement with the CTR measured on
the manual masks over images that have both, as the CTR literature reports it: bias (mean of
predicted minus true), MAE, the 95% limits of agreement (bias ± 1.96 SD, Bland and Altman
1986), and the share of films off by more than 0.03, overall and by true-CTR band
(:data:`CTR_BANDS`), where a bias in the enlarged hearts would hide in the overall mean.
:func:`bland_altman_figure` draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.masks import CARDIOMEDIASTINUM, TRAINED, heart_definition, load_masks, overlap_ignored
from pipeline.measure import measure
from pipeline.metrics import dice

DECODED_AT_ONCE = 50  # images whose masks (up to 3000 x 3000 each, both kinds) are decoded together
# true-CTR bands: normal, borderline, and the enlarged hearts where cardiomegaly is read
CTR_BANDS = (("< 0.45", 0.0, 0.45), ("0.45-0.50", 0.45, 0.50), ("0.50-0.55", 0.50, 0.55),
             ("0.55-0.60", 0.55, 0.60), (">= 0.60", 0.60, 10.0))
OFF_BY = 0.03  # a CTR this far from the truth moves a film across the 0.5 line in practice


class EvaluateError(CxrlabelError):
    pass


class NothingHeldOut(EvaluateError):
    """Every film to evaluate is one the model trained on: nothing to say of new films."""


@dataclass
class Evaluation:
    model: str
    images: int
    heart_definition: str = "heart"  # what the model's `heart` is (see :func:`heart_definition`)
    notes: list[str] = field(default_factory=list)  # what a reader must know to read the figures
    dice: dict[str, dict[str, float]] = field(default_factory=dict)  # structure -> mean/sd/n
    ctr_error: dict = field(default_factory=dict)  # mean, mae, sd, n, left_out, left_out_reasons
    per_image: list[dict] = field(default_factory=list)
    # of the films with both kinds of masks, those the model trained on (or a patient's it did);
    # None: its checkpoint does not say. Left out unless include_trained; then counted in `images`
    trained: int | None = None
    include_trained: bool = False

    def as_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "heart_definition": self.heart_definition,
                "trained_films": self.trained, "include_trained": self.include_trained,
                "notes": self.notes, "dice": self.dice, "ctr_error": self.ctr_error, "per_image": self.per_image}


def trained_films(engine: Engine, model: str, uids: list[str]) -> set[str] | None:
    """Those of ``uids`` that ``model`` trained on, or that show a patient it trained on (its
    checkpoint's ``trained_uids``, the catalogue's patient ids); None when the checkpoint
    cannot be found or does not record its training films."""
    from pipeline.model import ModelError, locate, read_checkpoint
    try:
        trained = read_checkpoint(locate(engine, model)[0]).info.get("trained_uids")
    except ModelError:
        return None
    if trained is None:
        return None
    i = D.images
    with engine.connect() as conn:
        patients = {p for _, p in D.rows_in(conn, select(i.c.uid, i.c.patient_id), i.c.uid, list(trained)) if p}
        of = dict(D.rows_in(conn, select(i.c.uid, i.c.patient_id), i.c.uid, uids))
    trained = set(trained)
    return {u for u in uids if u in trained or (of.get(u) and of[u] in patients)}


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "n": int(arr.size)}


def agreement(true: np.ndarray, pred: np.ndarray) -> dict:
    """Bias, MAE, SD, 95% limits of agreement and the share off by more than :data:`OFF_BY`
    of ``pred`` against ``true`` (NaN where there is nothing to say)."""
    err = np.asarray(pred, float) - np.asarray(true, float)
    n = int(err.size)
    sd = float(err.std(ddof=1)) if n > 1 else math.nan
    bias = float(err.mean()) if n else math.nan
    return {"n": n, "bias": bias, "mae": float(np.abs(err).mean()) if n else math.nan, "sd": sd,
            "loa": [bias - 1.96 * sd, bias + 1.96 * sd],
            "off_by_0.03": float((np.abs(err) > OFF_BY).mean()) if n else math.nan}


def agreement_by_band(true: np.ndarray, pred: np.ndarray) -> dict[str, dict]:
    """:func:`agreement` within each true-CTR band of :data:`CTR_BANDS`."""
    true, pred = np.asarray(true, float), np.asarray(pred, float)
    return {name: agreement(true[(true >= lo) & (true < hi)], pred[(true >= lo) & (true < hi)])
            for name, lo, hi in CTR_BANDS}


def evaluate(engine: Engine, model: str = "default", truth: str = "manual", include_trained: bool = False,
             among: set[str] | None = None) -> Evaluation:
    """Dice per structure and the CTR's agreement of ``model``'s masks against ``truth``
    masks. Lungs are compared in their source's own convention (pixels the source also drew
    as heart left out: :func:`pipeline.masks.overlap_ignored`). A model whose `heart` is the
    cardiomediastinum has it compared with manual cardiomediastinum masks, and says so.

    Films the model trained on (:func:`trained_films`) read better than new ones: they are
    left out, and counted, unless ``include_trained`` (then the figures say so); when every
    film is one, :class:`NothingHeldOut` says so. ``among``: only these uids (a selection)."""
    if truth != "manual":
        raise EvaluateError(f"--truth {truth!r}: only 'manual' masks serve as truth")
    ref, model = model, db_name(engine, model)
    uids = _films_with_both(engine, model, among)
    trained = trained_films(engine, ref, uids)
    if trained and not include_trained:
        if len(trained) == len(uids):
            raise NothingHeldOut(f"all {len(uids)} films with manual masks and masks by model {model!r} are films it "
                                 "trained on (or of patients it trained on): figures on them read better than on "
                                 "new films. See its cross-validated figures (the model card), annotate films it "
                                 "never saw, or show these anyway, marked as such, with --include-trained")
        uids = [u for u in uids if u not in trained]
    with engine.connect() as conn:
        ev = Evaluation(model, len(uids), heart_definition(conn, model),
                        trained=None if trained is None else len(trained), include_trained=include_trained)
        ev.notes += _notes(ev, model)
        scores, left_out = _score_films(conn, ev, uids)
    ev.dice = {s: _stats(v) for s, v in scores.items() if v}
    scored = [r for r in ev.per_image if "ctr_true" in r]
    truth_ctr = np.array([r["ctr_true"] for r in scored], float)
    pred_ctr = np.array([r["ctr_pred"] for r in scored], float)
    a = agreement(truth_ctr, pred_ctr)
    ev.ctr_error = {"mean": a["bias"], "mae": a["mae"], "sd": a["sd"], "n": a["n"], "loa": a["loa"],
                    "off_by_0.03": a["off_by_0.03"], "left_out": sum(left_out.values()),
                    "left_out_reasons": left_out, "bands": agreement_by_band(truth_ctr, pred_ctr)}
    return ev


def db_name(engine: Engine, model: str) -> str:
    """The name ``model``'s rows carry in the database: a checkpoint path's (as ``label
    --model PATH`` stored them), else ``model`` itself (a registered or kept name)."""
    from pipeline.model import ModelError, locate
    if model == "default" or not (model.endswith(".pt") or Path(model).exists()):
        return model
    try:
        return locate(engine, model)[1]
    except ModelError:
        return model


def common_held_out(engine: Engine, models: list[str], among: set[str] | None = None) -> set[str]:
    """The films every one of ``models`` labelled, that have manual masks, and that none of
    them trained on (nor a patient of): where they compare on equal terms (an adapted model
    trained on its parent's films and the clinic's, so its parent is judged on the clinic's
    other films too). One line naming the way on when none is left."""
    uids: set[str] | None = None
    for m in models:
        got = set(_films_with_both(engine, db_name(engine, m), among))
        uids = got if uids is None else uids & got
    trained: set[str] = set()
    for m in models:
        trained |= trained_films(engine, m, sorted(uids or ())) or set()
    left = (uids or set()) - trained
    if not left:
        raise NothingHeldOut(f"no film with manual masks is labelled by {', '.join(models)} and unseen by all of "
                             f"them ({len(trained)} are films one of them trained on): annotate films none of them "
                             "saw, label them with each model, and compare again")
    return left


def _films_with_both(engine: Engine, model: str, among: set[str] | None) -> list[str]:
    """The films (of ``among``, when given) with manual masks and ``model``'s, sorted; a
    one-line error naming the way on when there is none."""
    m = D.masks
    with engine.connect() as conn:
        manual = set(conn.execute(select(m.c.uid).where(m.c.kind == "manual").distinct()).scalars())
        predicted = set(conn.execute(select(m.c.uid).where(m.c.kind == "predicted",
                                                           m.c.model == model).distinct()).scalars())
        if not predicted and conn.execute(select(D.measurements.c.model).limit(1)).first() is not None:
            from pipeline.groups import missing_name  # another model labelled: its name was meant
            if missing := missing_name(conn, labelled_by=model):
                raise EvaluateError(missing)
    uids = [u for u in sorted(manual & predicted) if among is None or u in among]
    if not uids:
        raise EvaluateError(f"no image has both manual masks and masks from model {model!r}"
                            + (" in this selection" if among is not None else "")
                            + ": import annotated masks (`cxrlabel masks import`) and label those "
                            f"images (`cxrlabel label --all --model {model}`)")
    return uids


def _notes(ev: Evaluation, model: str) -> list[str]:
    """What a reader must know to read ``ev``'s figures: films the model trained on, and a
    heart that is the cardiomediastinum."""
    notes = []
    if ev.trained is None:
        notes.append(f"model {model}'s checkpoint does not say which films it trained on: some of these "
                     "may be among them, and read better than new films would")
    elif ev.trained and ev.include_trained:
        notes.append(f"{ev.trained} of these {ev.images} films the model trained on (or their patients): "
                     "these figures read better than on films it never saw")
    elif ev.trained:
        notes.append(f"{ev.trained} films the model trained on (or their patients) are left out "
                     "(--include-trained shows them, marked)")
    if ev.heart_definition != "heart":
        notes.append(f"model {model}'s heart is the cardiomediastinum (heart and upper mediastinum; "
                     "its label runs say so): its Dice is against manual cardiomediastinum "
                     "masks, and its CTR reads low in enlarged hearts; label again with a current model")
    return notes


def _score_films(conn, ev: Evaluation, uids: list[str]) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Each film's Dice per structure and its CTRs (``ev.per_image``), a few dozen films'
    masks decoded at a time; the Dice values per structure and the reasons films were left
    out of the CTR error, with their counts."""
    older = ev.heart_definition != "heart"
    spacing = {u: (sx, sy) for u, sx, sy in D.rows_in(
        conn, select(D.images.c.uid, D.images.c.spacing_x, D.images.c.spacing_y), D.images.c.uid, uids)}
    scores: dict[str, list[float]] = {s: [] for s in TRAINED}
    left_out: dict[str, int] = {}
    for chunk in D.chunks(uids, DECODED_AT_ONCE):
        t = load_masks(conn, chunk)
        p = load_masks(conn, chunk, kind="predicted", model=ev.model)
        for uid in chunk:
            row: dict = {"uid": uid}
            named = {(CARDIOMEDIASTINUM if older and s == "heart" else s): m for s, m in p[uid].items()}
            ignored = overlap_ignored(t.get(uid, {}))
            for s in TRAINED:
                if s in t[uid] and s in named:
                    keep = ~ignored[s] if s in ignored else slice(None)
                    row[s] = dice(named[s][keep], t[uid][s][keep])
                    scores[s].append(row[s])
            true = measure(t[uid], spacing.get(uid, (None, None)))
            pred = measure(p[uid], spacing.get(uid, (None, None)))
            if true["ctr"] is not None and pred["ctr"] is not None:
                row["ctr_true"], row["ctr_pred"] = true["ctr"], pred["ctr"]
            else:  # a CTR needs the heart and both lungs, in the truth and the prediction
                row["ctr_missing"] = "; ".join(f"{kind} lacks {m['ctr_missing']}" for kind, m in
                                               (("truth", true), ("prediction", pred)) if m["ctr_missing"])
                left_out[row["ctr_missing"]] = left_out.get(row["ctr_missing"], 0) + 1
            ev.per_image.append(row)
    return scores, left_out


def bland_altman_figure(ev: Evaluation, path: Path) -> Path:
    """The CTR's Bland-Altman plot (difference against the mean of the two readings, bias and
    95% limits of agreement) beside its bias per true-CTR band with 95% intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in ev.per_image if "ctr_true" in r]
    if not rows:
        raise EvaluateError(f"model {ev.model}: no image has a CTR in both its truth and its prediction")
    true = np.array([r["ctr_true"] for r in rows])
    pred = np.array([r["ctr_pred"] for r in rows])
    e = ev.ctr_error
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    ax.scatter((true + pred) / 2, pred - true, s=10, alpha=0.7)
    for y, style, label in ((e["mean"], "-", f"bias {e['mean']:+.4f}"),
                            (e["loa"][0], "--", f"95% limits {e['loa'][0]:+.3f}, {e['loa'][1]:+.3f}"),
                            (e["loa"][1], "--", None)):
        if y == y:
            ax.axhline(y, color="k", lw=0.9, ls=style, label=label)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(xlabel="mean of the two CTRs", ylabel="CTR: model - truth",
           title=f"{ev.model}: CTR agreement, {len(rows)} films (MAE {e['mae']:.4f})"
           + (f"\n{ev.trained} of them films it trained on: reads better than new films"
              if ev.include_trained and ev.trained else ""))
    ax.legend(fontsize=8, loc="lower left")
    names = [name for name, _, _ in CTR_BANDS]
    bands = [e["bands"][n] for n in names]
    means = [b["bias"] for b in bands]
    half = [1.96 * b["sd"] / math.sqrt(b["n"]) if b["n"] > 1 else 0.0 for b in bands]
    bx.bar(range(len(names)), [m if m == m else 0 for m in means], yerr=half, capsize=3, color="tab:blue")
    top = max([abs(m) + h for m, h in zip(means, half, strict=True) if m == m] + [0.005])
    for k, b in enumerate(bands):  # above each bar's interval, never under it
        bx.text(k, top * 1.15, f"n={b['n']}", ha="center", va="bottom", fontsize=7)
    bx.set_ylim(-top * 1.4, top * 1.45)
    bx.axhline(0, color="k", lw=0.8)
    bx.set_xticks(range(len(names)), names, fontsize=8)
    bx.set(xlabel="true CTR", ylabel="bias (95% interval)", title="bias by true-CTR band")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""The paper's loop, simulated honestly: label unseen images, review them, retrain, compare.

For each chosen fold k of a 5-fold split of the annotated images (the split of
``cxrlabel train --folds 5``):

* ``val``: fold k (manual masks): what every model is judged on;
* ``pool``: fold k+1, treated as archive images nobody annotated (their manual masks are
  taken out of a private copy of the database and kept aside);
* ``base``: the other three folds.

1. **before**: train on ``base`` (manual masks only).
2. Label ``pool`` with it through the labelling path (quality score included: the shipped
   recipe's fitted score, ``models/default/model.quality.json``).
3. Review, as a reviewer following the worklist would: the worst ``--flag`` share by
   estimated quality is corrected (the masks redrawn from the kept-aside manual masks, as
   polygons through :func:`pipeline.review.save`); the rest is accepted as the model drew it.
4. **after**: train on ``base`` + the reviewed ``pool`` (``--masks manual,reviewed,accepted``).
5. **ceiling**: train on ``base`` + ``pool`` with their real manual masks.

Each model is judged on ``val`` as it is and under the equipment-like shifts of the quality
bench (`bench/quality.py`'s rows), so the table shows what reviewing bought against what
full annotation would have.

Usage: python bench/review_loop.py --db sqlite:///data/catalogue.db --cache data/cache \\
           [--folds 0 1] [--epochs 60] [--flag 0.3] [--work runs/review_loop]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import collect_rows  # noqa: E402

from pipeline import db as D  # noqa: E402
from pipeline import review as R  # noqa: E402
from pipeline.groups import select_images  # noqa: E402
from pipeline.label import LabelOptions, label  # noqa: E402
from pipeline.masks import load_masks  # noqa: E402
from pipeline.model import register_model  # noqa: E402
from pipeline.quality import Atlas, QualityModel, sidecar  # noqa: E402
from pipeline.resources import resource  # noqa: E402
from pipeline.train import TrainConfig, train  # noqa: E402
from pipeline.train.data import annotated_uids, patient_groups  # noqa: E402
from pipeline.train.folds import SPLITS_FILE, make_splits  # noqa: E402


def trained(engine, cfg: TrainConfig, where: Path, val: list[str], cache: str) -> Path:
    """Train (or resume) one model held out on ``val``, laid out as a one-fold CV run so
    `bench/quality.py`'s rows can judge it."""
    train(engine, cfg, where / "fold0", cache, "cpu", held_out=val)
    (where / SPLITS_FILE).write_text(json.dumps({"folds": 1, "val_frac": 0, "seed": cfg.seed, "uids": val,
                                                 "val": [val]}))
    return where / "fold0" / "best.pt"


def fold_score(engine, held_out: set[str]) -> QualityModel:
    """The shipped quality score, its atlas rebuilt from the masks this fold trains on (the
    shipped atlas holds every annotated image: the held-out and pool images among them)."""
    score = QualityModel.load(resource("models", "default", "model.quality.json"))
    if score.atlas is None:
        return score
    with engine.connect() as c:
        masks = load_masks(c, [u for u in annotated_uids(engine) if u not in held_out])
    drawn = [np.stack([m[s] for s in score.atlas.structures]) for m in masks.values()
             if all(s in m for s in score.atlas.structures)]
    return dataclasses.replace(score, atlas=Atlas.build(drawn, score.atlas.structures))


def judged(url: str, run: Path, cache: str) -> dict:
    """Mean Dice per structure on the held-out images as they are, and under the shifts."""
    rows = [r for r in collect_rows(D.connect(url), run, cache, seed=0) if r["shift"] != "widened"]
    clean = [r for r in rows if r["shift"] == "none"]
    shifted = [r for r in rows if r["shift"] != "none"]
    structures = sorted({r["structure"] for r in rows})
    return {"clean": {s: float(np.mean([r["dice"] for r in clean if r["structure"] == s])) for s in structures},
            "shifted": float(np.mean([r["dice"] for r in shifted]))}


def one_fold(args, k: int) -> dict:
    work = args.work / f"fold{k}"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "catalogue.db"
    for leftover in (db, work / "catalogue.db-wal", work / "catalogue.db-shm"):
        leftover.unlink(missing_ok=True)  # a stale write-ahead log would replay an earlier run's edits
    shutil.copy(args.db_file, db)
    url = f"sqlite:///{db}"
    engine = D.connect(url)
    uids = annotated_uids(engine)
    with engine.connect() as c:
        splits = make_splits(uids, 5, 0.2, 0, patient_groups(c, uids))  # a patient's films share a fold
    val, pool = splits.val[k], splits.val[(k + 1) % 5]
    if len(uids) != args.expect:
        raise SystemExit(f"{db}: {len(uids)} annotated images, expected {args.expect}: a stale copy?")
    with engine.connect() as c:
        truth = load_masks(c, pool)
    with engine.begin() as c:  # the pool becomes unannotated archive images
        c.execute(D.masks.delete().where(D.masks.c.kind == "manual", D.masks.c.uid.in_(pool)))
    cfg = TrainConfig.from_preset("cxr_deep", epochs=args.epochs, threads=args.threads)
    out: dict = {"fold": k, "annotated": len(uids), "val": len(val), "pool": len(pool), "epochs": args.epochs}
    started = time.time()
    before = trained(engine, cfg, work / "before", val, args.cache)
    fold_score(engine, set(val)).save(sidecar(before))
    register_model(engine, "before", before, cfg.preset, cfg.as_dict(), {}, "", {})
    with engine.connect() as c:
        chosen = select_images(c, all_images=True)
    chosen.items = [it for it in chosen.items if it.uid in set(pool)]
    label(engine, chosen, LabelOptions(model="before", device="cpu", batch_size=8, cache_dir=args.cache, workers=1,
                                       progress=False))
    rows, _ = R.worklist(engine, "before", limit=len(pool))
    flagged = rows[:round(args.flag * len(rows))]  # worst estimated quality first
    for r in rows:
        if r in flagged:
            polygons = {s: R.polygons_of(m, detail=0.001) for s, m in truth[r["uid"]].items()}
            R.save(engine, r["uid"], "before", "simulated reviewer", 0, "corrected", polygons=polygons)
        else:
            R.save(engine, r["uid"], "before", "simulated reviewer", 0, "accepted")
    with engine.connect() as c:
        predicted = load_masks(c, pool, kind="predicted", model="before")
    from pipeline.metrics import dice
    pool_dice = {r["uid"]: float(np.mean([dice(predicted[r["uid"]][s], truth[r["uid"]][s])
                                          for s in truth[r["uid"]]])) for r in rows}
    flagged_uids = {r["uid"] for r in flagged}
    out["pool_dice_flagged"] = float(np.mean([pool_dice[u] for u in flagged_uids]))
    out["pool_dice_accepted"] = float(np.mean([d for u, d in pool_dice.items() if u not in flagged_uids]))
    out["pool_below_0_9_caught"] = (sum(pool_dice[u] < 0.9 for u in flagged_uids),
                                    sum(d < 0.9 for d in pool_dice.values()))
    after_cfg = TrainConfig.from_preset("cxr_deep", epochs=args.epochs, threads=args.threads,
                                        masks=("manual", "reviewed", "accepted"), review_model="before")
    trained(engine, after_cfg, work / "after", val, args.cache)
    # the ceiling: the pool annotated by hand after all
    from pipeline.masks import MASK_KEYS, mask_row
    with engine.begin() as c:
        D.upsert(c, D.masks, [mask_row(u, s, m) for u, ms in truth.items() for s, m in ms.items()], MASK_KEYS)
    trained(engine, cfg, work / "ceiling", val, args.cache)
    for name in ("before", "after", "ceiling"):
        out[name] = judged(url, work / name, args.cache)
    out["seconds"] = time.time() - started
    (work / "result.json").write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True, help="sqlite:///PATH of a catalogue with the manual masks (copied)")
    ap.add_argument("--cache")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--flag", type=float, default=0.3, help="share of the pool corrected, worst quality first")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", type=Path, default=Path("runs/review_loop"))
    ap.add_argument("--expect", type=int, default=100, help="annotated images the catalogue holds")
    args = ap.parse_args(argv)
    if not args.db.startswith("sqlite:///"):
        ap.error("--db must be a SQLite catalogue (it is copied for each fold)")
    args.db_file = Path(args.db.removeprefix("sqlite:///"))
    results = [one_fold(args, k) for k in args.folds]
    print(f"{len(results)} folds, {args.epochs} epochs, {args.flag:.0%} of each pool corrected (worst quality "
          "first), the rest accepted")
    print("| fold | model | trained on | heart | left lung | right lung | mean Dice under shifts |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        n_base = r["annotated"] - r["val"] - r["pool"]
        for name, what in (("before", f"{n_base} manual"),
                           ("after", f"{n_base} manual + {r['pool']} reviewed"),
                           ("ceiling", f"{n_base + r['pool']} manual")):
            c = r[name]["clean"]
            print(f"| {r['fold']} | {name} | {what} | {c['heart']:.4f} | {c['left_lung']:.4f} | "
                  f"{c['right_lung']:.4f} | {r[name]['shifted']:.4f} |")
        caught, bad = r["pool_below_0_9_caught"]
        print(f"| {r['fold']} | review | pool Dice: corrected {r['pool_dice_flagged']:.4f}, accepted "
              f"{r['pool_dice_accepted']:.4f}; flagged {caught} of {bad} below 0.9 | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

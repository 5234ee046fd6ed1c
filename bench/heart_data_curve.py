"""A learning curve for the heart: how the held-out CTR error falls with heart-annotated films.

Prepares, for each chosen fold of a cross-validation run, a copy of the catalogue in which
that fold's training films keep only every ``--keep``-th of one source's manual masks
(``--source``, default ``wingspan``, the films with a heart-only outline), taken in order of
their true CTR so every band keeps its share. The fold's held-out films and every other
source are untouched, and the stored splits are reused: a film whose masks are dropped
leaves training (``pipeline.train.folds``), nothing moves between folds. Prints the
``cxrlabel train`` command for each fold; once they have run, ``--cv OUT/keepN`` (a folder
linking each fold's run) is what ``bench/heart_folds.py`` reads, against the full run's
same folds.

Usage: python bench/heart_data_curve.py --db sqlite:///data/twosrc.db --cv runs/cxr_deep_2src_cv \\
           --fold 2 --fold 3 --keep 2 --out runs/curve
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from sqlalchemy import delete, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import db as D  # noqa: E402
from pipeline.masks import load_masks  # noqa: E402
from pipeline.measure import measure  # noqa: E402
from pipeline.train.folds import SPLITS_FILE  # noqa: E402


def every_kth_by_ctr(ctrs: dict[str, float], keep: int) -> set[str]:
    """The films kept: every ``keep``-th in order of CTR (ties by uid), the first included."""
    order = sorted(ctrs, key=lambda u: (ctrs[u], u))
    return set(order[::keep])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True, help="sqlite:///PATH of the catalogue the full run trained on (copied)")
    ap.add_argument("--cv", type=Path, required=True, help="the full cross-validation run (its splits.json)")
    ap.add_argument("--fold", type=int, action="append", required=True, help="a fold to prepare (repeatable)")
    ap.add_argument("--keep", type=int, default=2, help="keep every KEEP-th training film of --source [2]")
    ap.add_argument("--source", default="wingspan", help="the source thinned [wingspan]")
    ap.add_argument("--out", type=Path, required=True, help="where the catalogue copies and runs go")
    args = ap.parse_args(argv)
    if not args.db.startswith("sqlite:///"):
        sys.exit("--db: a sqlite:/// catalogue (it is copied, never written)")
    if args.keep < 2:
        sys.exit("--keep: 2 or more (1 keeps every film: that is the full run)")
    splits = json.loads((args.cv / SPLITS_FILE).read_text())
    combined = args.out / f"keep{args.keep}"
    combined.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.cv / SPLITS_FILE, combined / SPLITS_FILE)
    for k in args.fold:
        db = args.out / f"keep{args.keep}_fold{k}.db"
        run = args.out / f"keep{args.keep}_fold{k}"
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.cv / SPLITS_FILE, run / SPLITS_FILE)
        shutil.copy(args.db.removeprefix("sqlite:///"), db)
        engine = D.connect(f"sqlite:///{db}")
        with engine.begin() as c:
            films = {u for (u,) in c.execute(select(D.images.c.uid).where(D.images.c.source == args.source))}
            trained = sorted(films - set(splits["val"][k]))
            masks = load_masks(c, trained, kind="manual")
            ctrs = {u: ctr for u in trained if (ctr := measure(masks[u])["ctr"]) is not None}
            drop = sorted(set(ctrs) - every_kth_by_ctr(ctrs, args.keep))
            c.execute(delete(D.masks).where(D.masks.c.uid.in_(drop), D.masks.c.kind == "manual"))
        engine.dispose()
        link = combined / f"fold{k}"
        if not link.exists():
            link.symlink_to(Path("..") / run.name / f"fold{k}")
        print(f"fold {k}: {len(ctrs) - len(drop)} of {len(ctrs)} {args.source} training films kept; train with\n"
              f"  cxrlabel --db sqlite:///{db} train --model cxr_deep --folds {splits['folds']} --fold {k} "
              f"--name keep{args.keep}_fold{k} --run-dir {run}")
    print(f"then: python bench/heart_folds.py --db {args.db} --cv {combined}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

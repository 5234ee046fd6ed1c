"""bench/heart_data_curve.py: a fold's training thinned to every k-th heart-annotated film."""

import dataclasses
import json

from sqlalchemy import select

from pipeline import db as D
from pipeline.masks import load_masks
from pipeline.measure import measure
from pipeline.train.data import annotated_uids
from pipeline.train.folds import make_splits, update_splits


def test_a_thinned_fold_keeps_its_held_out_films_and_every_band(annotated_db, tmp_path):
    from bench import heart_data_curve

    eng = D.connect(f"sqlite:///{annotated_db}")
    with eng.connect() as c:
        source = dict(c.execute(select(D.images.c.uid, D.images.c.source)).all())
    uids = annotated_uids(eng)
    eng.dispose()
    cv = tmp_path / "cv"
    cv.mkdir()
    splits = make_splits(uids, folds=5)
    (cv / "splits.json").write_text(json.dumps(dataclasses.asdict(splits)))
    out = tmp_path / "curve"
    assert heart_data_curve.main(["--db", f"sqlite:///{annotated_db}", "--cv", str(cv), "--fold", "1",
                                  "--keep", "2", "--out", str(out)]) == 0

    thinned = D.connect(f"sqlite:///{out / 'keep2_fold1.db'}")
    left = set(annotated_uids(thinned))
    wingspan_training = {u for u in uids if source[u] == "wingspan"} - set(splits.val[1])
    dropped = set(uids) - left
    # half of the fold's Wingspan training films go; nothing else does
    assert dropped <= wingspan_training and len(dropped) == len(wingspan_training) // 2
    with thinned.connect() as c:
        masks = load_masks(c, sorted(wingspan_training), kind="manual")
    thinned.dispose()
    eng = D.connect(f"sqlite:///{annotated_db}")
    with eng.connect() as c:
        before = load_masks(c, sorted(wingspan_training), kind="manual")
    eng.dispose()
    ctr = {u: measure(m)["ctr"] for u, m in before.items()}
    kept = sorted(ctr[u] for u in masks)
    # every other film by CTR: the smallest and the spread of sizes stay
    assert kept[0] == min(ctr.values()) and kept[-1] >= sorted(ctr.values())[-2]
    # the stored splits lose exactly the dropped films when that fold trains, and move nothing
    again, joined, gone = update_splits(splits, sorted(left))
    assert not joined and set(gone) == dropped and again.val[1] == splits.val[1]
    assert (out / "keep2" / "fold1").is_symlink() and (out / "keep2" / "splits.json").exists()

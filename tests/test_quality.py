import shutil

import numpy as np
import pytest
from sqlalchemy import text

from pipeline.groups import select_images
from pipeline.imaging import Geometry
from pipeline.label import Item, LabelOptions, label, postprocess
from pipeline.model import register_model
from pipeline.quality import FEATURES, QualityModel, sidecar
from pipeline.report import report
from pipeline.shifts import SHIFTS, apply

STRUCTURES = ("heart", "left_lung", "right_lung")


def _blobs(scale: float = 1.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    probs = np.stack([1 / (1 + np.exp((((xx - cx) ** 2 + (yy - 34) ** 2) / 40 - r) * scale))
                      for cx, r in ((32, 6), (48, 7), (16, 7))])
    return np.clip(probs + rng.normal(0, noise, probs.shape), 0, 1).astype(np.float32)


def _synthetic_rows(n: int = 300, seed: int = 0):
    """Masks whose true Dice falls as their features worsen, plus noise."""
    rng = np.random.default_rng(seed)
    rows, dice = [], []
    for image in range(n):
        badness = rng.uniform(0, 1)
        for s in STRUCTURES:
            f = {k: rng.normal(0, 0.2) for k in FEATURES}
            f["uncertain"] += 3 * badness
            f["edge_margin"] -= badness
            rows.append({"structure": s, "image": image, **f})
            dice.append(float(np.clip(0.98 - 0.3 * badness + rng.normal(0, 0.01), 0, 1)))
    return rows, dice


def test_the_fitted_score_ranks_and_estimates_dice(tmp_path):
    rows, dice = _synthetic_rows()
    model = QualityModel.fit(rows[:600], dice[:600], list(STRUCTURES), info={"calibration": [[0.9, 0.9, 3]]})
    est = [model.estimate({s: r for r in rows[n:n + 3] for s in [r["structure"]]})[rows[m]["structure"]]
           for n in range(600, len(rows), 3) for m in range(n, n + 3)]
    true = np.array(dice[600:])
    assert np.corrcoef(np.argsort(np.argsort(est)), np.argsort(np.argsort(true)))[0, 1] > 0.9
    assert np.mean(np.abs(np.array(est) - true)) < 0.05 and all(0 <= e <= 1 for e in est)  # spread: 0.3
    model.save(tmp_path / "m.quality.json")
    again = QualityModel.load(tmp_path / "m.quality.json")
    image = {r["structure"]: r for r in rows[:3]}
    assert again.estimate(image) == model.estimate(image)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a quality model"):
        QualityModel.load(tmp_path / "bad.json")


def test_postprocess_scores_with_a_fitted_model_and_falls_back_without():
    geom = Geometry.fit(700, 640, 64)
    item = Item("u", np.zeros((64, 64), np.uint8), geom)
    crisp, blurry = postprocess(item, _blobs(), STRUCTURES), postprocess(item, _blobs(0.15, 0.1), STRUCTURES)
    assert set(crisp.features) == set(STRUCTURES) and set(crisp.features["heart"]) == set(FEATURES)
    assert crisp.measurements["quality_heart"] is None  # no fitted score: the heuristic only
    assert crisp.features["heart"]["uncertain"] < blurry.features["heart"]["uncertain"]
    rows, dice = _synthetic_rows()
    scored = postprocess(item, _blobs(), STRUCTURES, QualityModel.fit(rows, dice, list(STRUCTURES)))
    per = [scored.measurements[f"quality_{s}"] for s in STRUCTURES]
    assert all(0 <= q <= 1 for q in per)
    # three round blobs side by side are no chest: the input check says so and quality is 0,
    # the per-structure estimates stay (a film that passes reads their mean: test_label_stores...)
    assert scored.measurements["input_check"] != "ok" and scored.measurements["quality"] == 0.0


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_every_shift_keeps_the_image_a_cache_entry_and_moves_masks_with_geometry(name):
    img = np.zeros((64, 64), np.uint8)
    img[20:44, 10:30] = 200
    masks = np.zeros((3, 64, 64), np.float32)
    masks[0, 20:44, 10:30] = 1
    out, moved = apply(name, img, masks, 1.0, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8 and moved.shape == masks.shape
    if name in ("rotation", "crop", "aspect"):
        # the mask follows the bright block it outlines
        inside = out[moved[0] > 0.5]
        assert not np.array_equal(moved, masks) and inside.mean() > 150
    else:
        assert np.array_equal(moved, masks)
    if name == "inverted":
        assert np.array_equal(out, 255 - img)


def test_label_stores_estimates_and_the_report_draws_their_calibration(annotated_engine, tiny_model, tmp_path):
    model = tmp_path / "m" / "best.pt"
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    rows, dice = _synthetic_rows()
    QualityModel.fit(rows, dice, list(STRUCTURES), info={
        "held_out": {"spearman": 0.8, "mae": 0.02}, "calibration": [[0.8, 0.82, 10], [0.95, 0.94, 30]]}
    ).save(sidecar(model))
    register_model(annotated_engine, "m", model, "tiny", {}, {}, "")
    with annotated_engine.begin() as c:  # an AP film among them
        c.execute(text("UPDATE images SET view = 'AP' WHERE uid = (SELECT MIN(uid) FROM images)"))
    with annotated_engine.connect() as c:
        chosen = select_images(c, all_images=True, limit=6)
    label(annotated_engine, chosen, LabelOptions(model="m", device="cpu", batch_size=3, cache_dir=str(tmp_path / "c"),
                                                 workers=1, progress=False))
    with annotated_engine.connect() as c:
        res = c.execute(text("SELECT * FROM label_results ORDER BY uid")).mappings().all()
    assert len(res) == 6 and all(r["quality_heart"] is not None for r in res)
    for r in res:  # the estimates' mean, or 0 for a film the input check flags (a tiny model's odd masks)
        assert r["input_check"] is not None
        assert r["quality"] == (pytest.approx(np.mean([r[f"quality_{s}"] for s in STRUCTURES]))
                                if r["input_check"] == "ok" else 0.0)
    assert res[0]["view"] == "AP" and "magnified" in res[0]["ctr_note"]
    assert all(r["ctr_note"] is None for r in res if r["view"] == "PA")
    with annotated_engine.begin() as c:
        c.execute(text("INSERT INTO samples (name, uid, created_at) SELECT 'six', uid, CURRENT_TIMESTAMP "
                       "FROM measurements"))
    files = report(annotated_engine, tmp_path / "r", "m", sample="six")
    assert files.images == 6 and files.calibration is not None and files.calibration.stat().st_size > 5000


def test_isotonic_map_pools_adjacent_violators():
    from pipeline.quality.score import _isotonic
    knots, values = _isotonic(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]))
    assert knots.tolist() == [1, 2.5, 4] and values.tolist() == [1, 2.5, 4]


def test_tta_agreement_is_high_when_the_copies_agree():
    import cv2

    from pipeline.quality import TTA_SHIFT, tta_agreement
    probs = np.zeros((3, 256, 256), np.float32)
    for i, (y, x) in enumerate(((120, 128), (110, 190), (110, 66))):
        cv2.circle(probs[i], (x, y), 30, 1.0, -1)
    masks = {s: probs[i] > 0.5 for i, s in enumerate(STRUCTURES)}
    move = np.float32([[1, 0, TTA_SHIFT[0]], [0, 1, TTA_SHIFT[1]]])
    moved = np.stack([cv2.warpAffine(p, move, (256, 256)) for p in probs])
    agree = tta_agreement(masks, [moved, probs], list(STRUCTURES))
    assert all(v < np.log(1.01 - 0.99) for v in agree.values())  # the shift is undone
    elsewhere = np.roll(probs, 20, axis=2)
    assert all(tta_agreement(masks, [moved, elsewhere], list(STRUCTURES))[s] > agree[s] for s in STRUCTURES)


def test_label_tta_needs_its_score_and_fills_the_estimates(annotated_engine, tiny_model, tmp_path):
    from pipeline.label import LabelError
    model = tmp_path / "t" / "best.pt"
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    with annotated_engine.connect() as c:
        chosen = select_images(c, all_images=True, limit=4)
    with pytest.raises(LabelError, match="no quality score for test-time augmentation"):
        label(annotated_engine, chosen, LabelOptions(model=str(model), device="cpu", batch_size=2,
                                                     cache_dir=str(tmp_path / "c"), workers=1, progress=False,
                                                     tta=True))
    rows, dice = _synthetic_rows()
    for r in rows:
        r["tta"] = -r["uncertain"]
    QualityModel.fit(rows, dice, list(STRUCTURES), names=FEATURES + ("tta",)).save(sidecar(model, tta=True))
    s = label(annotated_engine, chosen, LabelOptions(model=str(model), device="cpu", batch_size=2,
                                                     cache_dir=str(tmp_path / "c"), workers=1, progress=False,
                                                     tta=True))
    assert s.labelled == 4
    with annotated_engine.connect() as c:
        res = c.execute(text("SELECT quality, quality_heart FROM label_results")).all()
    assert len(res) == 4 and all(0 <= q <= 1 and qh is not None for q, qh in res)


def test_auc_is_the_mann_whitney_statistic():
    from pipeline.metrics import auc
    assert auc([0.6, 0.7], [0.4, 0.5]) == 1.0 and auc([0.4], [0.6]) == 0.0
    assert auc([0.5, 0.6], [0.5, 0.4]) == pytest.approx(0.875)  # one tie counts half
    assert np.isnan(auc([], [0.5]))


def test_report_compares_two_groups_with_their_roc(annotated_engine, tiny_model, tmp_path):
    register_model(annotated_engine, "m", tiny_model, "tiny", {}, {}, "")
    with annotated_engine.begin() as c:
        uids = [u for (u,) in c.execute(text("SELECT uid FROM images ORDER BY uid LIMIT 8"))]
        c.execute(text("DELETE FROM groups"))
        for n, u in enumerate(uids):
            c.execute(text("INSERT INTO groups (uid, group_name, rule, assigned_at) VALUES "
                           "(:u, :g, 'test', CURRENT_TIMESTAMP)"), {"u": u, "g": "big" if n % 2 else "small"})
    with annotated_engine.connect() as c:
        chosen = select_images(c, all_images=True, limit=8)
    label(annotated_engine, chosen, LabelOptions(model="m", device="cpu", batch_size=4, cache_dir=str(tmp_path / "c"),
                                                 workers=1, progress=False))
    with annotated_engine.begin() as c:  # a measured CTR for every image, the big ones larger
        c.execute(text("UPDATE measurements SET ctr = 0.4 + 0.01 * (SELECT COUNT(*) FROM groups g "
                       "WHERE g.uid <= measurements.uid)"))
        c.execute(text("UPDATE measurements SET ctr = ctr + 0.2 WHERE uid IN "
                       "(SELECT uid FROM groups WHERE group_name = 'big')"))
        c.execute(text("UPDATE measurements SET input_check = 'ok'"))  # a tiny model's masks may not pass
    files = report(annotated_engine, tmp_path / "r", "m", ["big", "small"])
    assert files.roc is not None and files.roc.stat().st_size > 5000 and files.histogram.exists()
    assert report(annotated_engine, tmp_path / "r1", "m", ["big"]).roc is None


def test_a_ring_shaped_prediction_with_a_large_filled_hole_scores_without_error():
    # an inverted film can give a ring: the hole is filled, which once made agreement > 1
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(xx - 32, yy - 32)
    ring = ((r > 10) & (r < 14)).astype(np.float32) * 0.99
    probs = np.stack([ring, np.zeros_like(ring), np.zeros_like(ring)])
    out = postprocess(Item("ring", np.zeros((64, 64), np.uint8), Geometry.fit(64, 64, 64, "pad")), probs, STRUCTURES)
    assert out.masks["heart"].decode()[32, 32]  # the hole is filled
    assert 0 <= out.measurements["quality"] <= 1


def test_the_score_knows_how_much_of_the_film_a_collimator_rim_covers():
    from pipeline.quality import rim_share
    film = np.full((200, 200), 90, np.uint8)
    film[::2] = 60  # texture: no flat band anywhere
    assert rim_share(film) == 0
    film[:20], film[:, 180:] = 235, 235  # a rim 20 deep on top and on the right
    assert rim_share(film) == pytest.approx(1 - 180 * 180 / 200 ** 2)
    geom = Geometry.fit(64, 64, 64)
    probs = np.zeros((3, 64, 64), np.float32)
    probs[:, 10:60, 0:30] = 0.9
    features = postprocess(Item("u", np.zeros((64, 64), np.uint8), geom, rim=0.25), probs, list(STRUCTURES)).features
    assert all(f["rim"] == 0.25 for f in features.values())


def test_heart_border_reads_whether_the_film_shows_the_hearts_width_setting_borders():
    import cv2

    from pipeline.quality import heart_border
    from tests.conftest import WINGSPAN

    def read(path, mask=False):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        return cv2.resize(img, (256, 256), interpolation=cv2.INTER_NEAREST if mask else cv2.INTER_AREA)

    uid = sorted(p.stem for p in (WINGSPAN / "png").glob("*.png"))[0]
    film = read(WINGSPAN / "png" / f"{uid}.png")
    heart, left, right = (read(WINGSPAN / "mask" / s / f"{uid}.png", True) >= 128
                          for s in ("heart", "left_lung", "right_lung"))
    plain = heart_border(film, heart, left | right)
    assert 0.0 < plain <= 2.0
    # the film runs on in the heart's grey past the border the mask stops at: no step there
    cols = np.flatnonzero(heart.any(axis=0))
    rows = np.flatnonzero(heart[:, cols[-1]])
    hidden = film.copy()
    hidden[rows[0] - 3:rows[-1] + 4, cols[-1] + 1:cols[-1] + 12] = int(film[heart].mean())
    assert heart_border(hidden, heart, left | right) < min(0.05, plain / 2)
    # nothing to read without a heart or lungs
    assert heart_border(film, np.zeros_like(heart), left | right) == 0.0
    assert heart_border(film, heart, np.zeros_like(heart)) == 0.0
    # postprocess stores it among every structure's features
    probs = np.stack([heart, left, right]).astype(np.float32) * 0.98
    out = postprocess(Item(uid, film, Geometry.fit(256, 256, 256, "pad")), probs, list(STRUCTURES))
    assert all(f["heart_border"] == pytest.approx(plain) for f in out.features.values())


def _drawn(engine, n: int) -> list[dict[str, np.ndarray]]:
    """The manual masks of ``n`` annotated images whose every structure is drawn."""
    from pipeline.masks import load_masks
    from pipeline.train.data import annotated_uids
    with engine.connect() as c:
        masks = load_masks(c, annotated_uids(engine))
    return [m for _, m in sorted(masks.items()) if set(STRUCTURES) <= set(m)][:n]


def test_the_atlas_tells_drawn_shapes_from_odd_ones(annotated_engine):
    from pipeline.quality import Atlas
    drawn = _drawn(annotated_engine, 24)
    atlas = Atlas.build([np.stack([m[s] for s in STRUCTURES]) for m in drawn[:20]], STRUCTURES)
    assert atlas.masks.shape == (20, 3, 32, 32)
    assert atlas.fit(drawn[0]) == {s: 1.0 for s in STRUCTURES}  # itself
    for unseen in drawn[20:]:  # a person's masks of another film fit better than the same masks gone odd
        fit = atlas.fit(unseen)
        swapped = atlas.fit({**unseen, "left_lung": unseen["right_lung"], "right_lung": unseen["left_lung"]})
        h, w = unseen["heart"].shape
        square = np.zeros((h, w), bool)
        square[h // 4:h // 2, w // 4:3 * w // 4] = True  # a block where the heart should be
        blocky = atlas.fit({**unseen, "heart": square})
        assert fit["left_lung"] > swapped["left_lung"] and fit["right_lung"] > swapped["right_lung"]
        assert fit["heart"] > blocky["heart"] and min(fit.values()) > 0.8
    nothing = atlas.fit({s: np.zeros((50, 40), bool) for s in STRUCTURES})  # no mask at all: the worst fit
    assert nothing == {s: 0.0 for s in STRUCTURES}
    again = Atlas.from_json(atlas.to_json())
    assert again.structures == atlas.structures and np.array_equal(again.masks, atlas.masks)


def test_a_score_fitted_on_models_trained_otherwise_is_used_with_a_warning(tmp_path, caplog):
    import logging

    from pipeline.quality import SCORE_RECIPE, recipe_of
    from pipeline.quality import from_sidecar as _quality_model
    from pipeline.train.config import TrainConfig
    # a checkpoint that predates an option was trained without it: what TrainConfig defaults to
    defaults = TrainConfig.from_preset("tiny").as_dict()
    assert all(absent == defaults[k] for k, absent in SCORE_RECIPE.items() if k != "epochs")
    rows, dice = _synthetic_rows()
    model = tmp_path / "model.pt"
    QualityModel.fit(rows, dice, list(STRUCTURES), info={"fold_models": {"checkpoint": "best", "epochs": 60}}
                     ).save(sidecar(model))  # a score fitted before the augmentation was recorded
    with caplog.at_level(logging.WARNING, logger="pipeline.quality.score"):
        assert _quality_model(model, STRUCTURES, {"epochs": 60, "shifts": True}) is not None
        assert not caplog.records  # the same training length, and nothing else recorded: nothing to say
        assert _quality_model(model, STRUCTURES, {"epochs": 160}) is not None  # still the best score there is
    assert "fitted on fold models trained with epochs 60" in caplog.text and "with epochs 160" in caplog.text
    assert "--checkpoint final" in caplog.text and "cxrlabel quality fit" in caplog.text
    caplog.clear()
    shifted = recipe_of({"epochs": 160, "shifts": True, "widen_ctr": [0.35, 0.72]})
    QualityModel.fit(rows, dice, list(STRUCTURES), info={"fold_models": {"epochs": 160, "training": shifted}}
                     ).save(sidecar(model))
    with caplog.at_level(logging.WARNING, logger="pipeline.quality.score"):
        assert _quality_model(model, STRUCTURES, {"epochs": 160, "shifts": True, "widen_ctr": (0.35, 0.72)}) is not None
        assert not caplog.records  # a tuple in the checkpoint, a list in the score's JSON: the same
        assert _quality_model(model, STRUCTURES, {"epochs": 160, "widen": 0.0}) is not None  # predates --shifts
    assert "with shifts True, widen_ctr [0.35, 0.72]" in caplog.text
    assert "with shifts False, widen_ctr None" in caplog.text
    assert "epochs" not in caplog.text
    caplog.clear()
    for odd in ("sixty", ["x"], {"epochs": "60"}, {"training": "x"}):  # a hand-edited record: no record, never a stop
        QualityModel.fit(rows, dice, list(STRUCTURES), info={"fold_models": odd}).save(sidecar(model))
        with caplog.at_level(logging.WARNING, logger="pipeline.quality.score"):
            assert _quality_model(model, STRUCTURES, {"epochs": 160}) is not None
    assert not caplog.records


def test_a_score_with_an_atlas_reads_the_masks_shape_and_keeps_its_atlas(annotated_engine, tmp_path):
    from pipeline.quality import SHAPE, Atlas
    from pipeline.quality import from_sidecar as _quality_model
    drawn = _drawn(annotated_engine, 10)
    atlas = Atlas.build([np.stack([m[s] for s in STRUCTURES]) for m in drawn], STRUCTURES)
    rows, dice = _synthetic_rows()
    for r in rows:
        r[SHAPE] = -r["uncertain"]
    names = FEATURES + (SHAPE,)
    with pytest.raises(ValueError, match="saved with the atlas"):  # a score that could not be applied
        QualityModel.fit(rows, dice, list(STRUCTURES), names=names).save(tmp_path / "no.quality.json")
    score = QualityModel.fit(rows, dice, list(STRUCTURES), names=names, atlas=atlas)
    geom = Geometry.fit(700, 640, 64)
    out = postprocess(Item("u", np.zeros((64, 64), np.uint8), geom), _blobs(), STRUCTURES, score)
    assert all(0 < f[SHAPE] <= 1 for f in out.features.values())
    assert all(0 <= out.measurements[f"quality_{s}"] <= 1 for s in STRUCTURES)
    model = tmp_path / "model.pt"
    score.save(sidecar(model))
    again = _quality_model(model, STRUCTURES)
    assert again.estimate(out.features) == score.estimate(out.features)
    assert _quality_model(model, ("heart",)) is None  # its atlas draws lungs this model does not
    import json
    good = json.loads(sidecar(model).read_text())
    damaged = {"bits cut short": {"bits": good["atlas"]["bits"][:40]}, "bits not base64": {"bits": "@@@"},
               "images not a number": {"images": "x"}, "structures not a list": {"structures": 3}}
    for what, change in damaged.items():  # refused whole, naming the file: never an atlas padded with zeros
        sidecar(model).write_text(json.dumps({**good, "atlas": {**good["atlas"], **change}}))
        with pytest.raises(ValueError, match=f"{sidecar(model).name}: not a quality model.*damaged"):
            QualityModel.load(sidecar(model))
        assert _quality_model(model, STRUCTURES) is None, what  # labelling goes on with the heuristic
    good["no_atlas"] = good.pop("atlas")  # the features read the atlas, the file has none
    sidecar(model).write_text(json.dumps(good))
    with pytest.raises(ValueError, match="not a quality model"):
        QualityModel.load(sidecar(model))


def test_the_atlas_frame_and_the_hearts_step_read_as_their_definitions():
    """atlas_frame resizes the masks as the channels of one image, and heart_border's means
    are integer sums: both give, bit for bit, what each mask resized alone and NumPy's float32
    mean of the gathered pixels give."""
    import cv2

    from pipeline.quality.features import _mean_under, atlas_frame

    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = rng.integers(8, 300, 2)
        masks = [rng.random((h, w)) > rng.random() for _ in range(rng.integers(1, 7))]
        union = np.logical_or.reduce(masks)
        if not union.any():
            continue
        ys, xs = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
        box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        alone = np.stack([cv2.resize(m[box].astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA) > 0.5
                          for m in masks])
        assert np.array_equal(atlas_frame(masks), alone)
        image = rng.integers(0, 256, (h, w)).astype(np.uint8)
        assert _mean_under(image, masks[0] | union) == np.asarray(image, np.float32)[masks[0] | union].mean()

"""The input check: is this a frontal chest radiograph the model can read?"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.quality import QualityModel
from pipeline.quality.inputs import OK, Appearance, anatomy, check, header_check, thumbnail


def _chest(side: int = 64) -> dict[str, np.ndarray]:
    """Masks laid out as on a PA film: the patient's right lung on the image's left, the
    smaller left lung on the image's right, the heart low between them leaning to the left lung."""
    yy, xx = np.mgrid[:side, :side]
    right = ((xx - 18) / 10) ** 2 + ((yy - 30) / 20) ** 2 <= 1
    left = ((xx - 46) / 9) ** 2 + ((yy - 30) / 19) ** 2 <= 1
    heart = ((xx - 35) / 9) ** 2 + ((yy - 42) / 7) ** 2 <= 1
    return {"heart": heart, "left_lung": left & ~heart, "right_lung": right & ~heart}


def test_a_chest_laid_out_as_on_a_pa_film_passes_and_each_way_of_breaking_it_is_named():
    chest = _chest()
    a = anatomy(chest)
    assert a["lung_order"] > 0 and a["heart_side"] > 0 and a["lung_ratio"] < 1 and a["heart_low"] > 0.5
    assert check(chest) == OK
    mirrored = {s: np.fliplr(m) for s, m in chest.items()}
    mirrored = {"heart": mirrored["heart"], "left_lung": mirrored["right_lung"], "right_lung": mirrored["left_lung"]}
    assert check(mirrored).startswith("flipped left-right")  # the larger lung and the heart on the image's right
    assert check({s: np.rot90(m) for s, m in chest.items()}).startswith("not a frontal chest film, or turned")
    upside = {s: np.flipud(m) for s, m in chest.items()}
    assert check(upside).startswith("upside down")
    assert check(dict(chest, left_lung=np.zeros_like(chest["left_lung"]))).startswith("not a chest film?")
    film = (0.0, 0.0, 40.0, 63.0)  # the film ends inside the left lung: cut off there
    assert check(chest, film).startswith("cropped?")
    assert check(chest, atlas_fit={"heart": 0.5, "left_lung": 0.6, "right_lung": 0.6}).startswith("unlike any")


def test_the_catalogues_header_speaks_first():
    assert header_check("CT", None, None) == "not a radiograph: Modality CT"
    assert header_check("DX", "KNEE", "AP") == "not a chest film: body part KNEE"
    assert header_check("CR", "CHEST", "LL").startswith("lateral view (LL)")
    assert header_check("CR", "chest", "PA") is None and header_check(None, None, None) is None


def test_an_appearance_knows_a_film_turned_and_one_unlike_any_chest():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    films = []
    for _ in range(20):  # dark lungs either side of a bright middle, brighter below: a chest-like film
        base = 120 + 60 * (yy / 96) + 40 * np.exp(-((xx - 50) / 12) ** 2) + rng.normal(0, 8, (96, 96))
        lungs = ((((xx - 28) / 14) ** 2 + ((yy - 40) / 26) ** 2 <= 1)
                 | (((xx - 70) / 13) ** 2 + ((yy - 40) / 25) ** 2 <= 1))
        films.append(np.clip(np.where(lungs, base - 80, base), 0, 255).astype(np.uint8))
    looks = Appearance(np.stack([thumbnail(f) for f in films[1:]]))
    upright = looks.look(thumbnail(films[0]))
    assert upright["upright"] > 0.8 and upright["turned"] < upright["upright"]
    assert check(_chest(), look=upright) == OK
    turned = looks.look(thumbnail(np.rot90(films[0]).copy()))
    assert check(_chest(), look=turned).startswith("turned?")
    noise = looks.look(rng.integers(0, 255, (24, 24), dtype=np.uint8))
    assert check(_chest(), look=noise).startswith("not a chest film? it looks like no annotated chest film")
    assert looks.look(thumbnail(films[1]), leave_out=0)["upright"] < 0.999  # itself left out
    again = Appearance.from_json(looks.to_json())
    assert np.array_equal(again.thumbs, looks.thumbs)
    with pytest.raises(ValueError, match="bytes where its"):
        Appearance.from_json({**looks.to_json(), "images": 3})


def test_a_fitted_score_keeps_its_appearance(tmp_path):
    from pipeline.quality import FEATURES
    rows = [{"structure": s, "image": i, **{k: float(np.sin(i + j)) for j, k in enumerate(FEATURES)}}
            for i in range(30) for s in ("heart", "left_lung", "right_lung")]
    looks = Appearance(np.zeros((2, 24, 24), np.uint8) + np.arange(24, dtype=np.uint8))
    score = QualityModel.fit(rows, [0.9 + 0.002 * (n % 30) for n in range(len(rows))], ["heart", "left_lung",
                                                                                         "right_lung"],
                             appearance=looks)
    score.save(tmp_path / "s.quality.json")
    again = QualityModel.load(tmp_path / "s.quality.json")
    assert again.appearance is not None and np.array_equal(again.appearance.thumbs, looks.thumbs)


def test_films_outside_the_ctr_norms_are_marked_and_flagged_films_leave_the_statistics(engine):
    from sqlalchemy import text

    from pipeline.results import read_only_query, statement
    films = [("adult_pa", "PA", 40, "ok"), ("adult_ap", "AP", 40, "ok"), ("child_pa", "PA", 9, "ok"),
             ("child_ap", "ap", 3, "ok"), ("unknown_age", "PA", None, None),
             ("turned", "PA", 50, "turned? it looks more like a chest film turned a quarter or half")]
    with engine.begin() as c:
        for uid, view, age, check in films:
            c.execute(text("INSERT INTO images (uid, source, view, age, loaded_at) "
                           "VALUES (:u, 'csv', :v, :a, '2026-01-01')"), {"u": uid, "v": view, "a": age})
            c.execute(text("INSERT INTO measurements (uid, model, ctr, quality, input_check, labelled_at) "
                           "VALUES (:u, 'm', 0.5, 0.9, :k, '2026-01-01')"), {"u": uid, "k": check})
    rows = {r["uid"]: r for r in read_only_query(engine, statement(
        "SELECT uid, outside_norms, in_statistics FROM label_results")).rows}
    assert {u: r["outside_norms"] for u, r in rows.items()} == {
        "adult_pa": None, "adult_ap": "AP view", "child_pa": "child", "child_ap": "AP view, child",
        "unknown_age": None, "turned": None}  # marked, never refused
    assert {u for u, r in rows.items() if r["in_statistics"] == 0} == {"turned"}


def _anatomy_from_pixels(masks, film):
    """The input check's anatomy by its definition, over each mask's pixel coordinates."""
    x0, y0, x1, y1 = film
    fx0, fy0, fx1, fy1 = int(np.ceil(x0)), int(np.ceil(y0)), int(np.floor(x1)), int(np.floor(y1))
    (ly, lx), (ry, rx), (hy, hx) = (np.nonzero(masks[s]) for s in ("left_lung", "right_lung", "heart"))
    left, right = min(lx.min(), rx.min()), max(lx.max(), rx.max())
    top, bottom = min(ly.min(), ry.min()), max(ly.max(), ry.max())
    width, height = right - left + 1, bottom - top + 1
    edge = 0.0
    for xs, ys in ((lx, ly), (rx, ry)):
        edge = max(edge, len(np.unique(ys[(xs <= fx0) | (xs >= fx1)])) / len(np.unique(ys)),
                   len(np.unique(xs[(ys <= fy0) | (ys >= fy1)])) / len(np.unique(xs)))
    return {"lung_share": min(len(lx), len(rx)) / max((fx1 - fx0 + 1) * (fy1 - fy0 + 1), 1),
            "side_by_side": max(min(ly.max(), ry.max()) - max(ly.min(), ry.min()) + 1, 0)
            / (min(np.ptp(ly), np.ptp(ry)) + 1),
            "lung_order": (lx.mean() - rx.mean()) / width, "heart_side": (hx.mean() - (left + right) / 2) / width,
            "heart_right": float(np.mean(hx > (left + right) / 2)), "lung_ratio": len(lx) / len(rx),
            "heart_low": (hy.mean() - top) / height, "lungs_tall": height / width, "edge_share": edge}


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10 ** 6), film=st.tuples(st.floats(-3, 12), st.floats(-3, 12), st.floats(40, 70),
                                                    st.floats(40, 70)))
def test_anatomy_read_from_row_and_column_counts_is_its_pixel_definition(seed, film):
    """The check reads each mask through its row and column counts (a tenth of the time of
    listing its pixels): the same numbers, to the last bit, as from the pixels themselves."""
    rng = np.random.default_rng(seed)
    masks = {}
    for s in ("heart", "left_lung", "right_lung"):
        m = np.zeros((64, 64), bool)
        y, x = rng.integers(0, 60, 2)
        h, w = rng.integers(1, 40, 2)
        m[y:y + h, x:x + w] = rng.random(m[y:y + h, x:x + w].shape) > rng.uniform(0, 0.8)
        m[y, x] = True
        masks[s] = m
    assert anatomy(masks, film) == _anatomy_from_pixels(masks, film)

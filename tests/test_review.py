import numpy as np
import pytest
from sqlalchemy import select, text

from pipeline import db as D
from pipeline import review as R
from pipeline.masks import STRUCTURES, load_masks, mask_row
from pipeline.measure import measure


def pretend_labelled(engine, n: int = 4, model: str = "m") -> list[str]:
    """The first ``n`` fully annotated images 'labelled' by ``model``: their manual masks stored
    as the model's (run-length, as labelling stores them), with measurements and qualities."""
    with engine.connect() as c:
        uids = sorted(c.execute(text("SELECT uid FROM masks WHERE kind = 'manual' GROUP BY uid "
                                     "HAVING COUNT(*) = 3")).scalars())[:n]
        truth = load_masks(c, uids)
    from pipeline.masks import EncodedMask
    with engine.begin() as c:
        for k, uid in enumerate(uids):
            rows = [mask_row(uid, s, EncodedMask.of(truth[uid][s], "rle"), kind="predicted", model=model)
                    for s in STRUCTURES]
            D.upsert(c, D.masks, rows, ("uid", "structure", "kind", "model"))
            m = measure(truth[uid])
            c.execute(D.measurements.insert().values(
                uid=uid, model=model, labelled_at=D.utcnow(), quality=0.9 + 0.02 * k, quality_heart=0.9,
                **{key: m[key] for key in ("ctr", "heart_width_px", "thoracic_width_px", "heart_x0", "heart_x1",
                                           "lungs_x0", "lungs_x1")}))
    return uids


@pytest.fixture
def labelled(annotated_engine):
    return annotated_engine, pretend_labelled(annotated_engine)


def test_worklist_puts_the_worst_first_and_filters(labelled):
    engine, uids = labelled
    rows, counts = R.worklist(engine, "m")
    assert [r["uid"] for r in rows] == uids  # quality rises with k
    assert counts == {"images": 4, "reviewed": 0, "accepted": 0, "rejected": 0, "corrected": 0}
    rows, _ = R.worklist(engine, "m", R.Filters(quality_min=0.915))
    assert [r["uid"] for r in rows] == uids[1:]
    assert R.worklist(engine, "m", R.Filters(reviewed=True))[0] == []
    assert R.neighbours(engine, "m", uids[1]) == (uids[0], uids[2])
    assert R.neighbours(engine, "m", uids[0]) == (None, uids[1])


def test_worklist_puts_the_least_trusted_first_and_films_without_trust_after(labelled):
    engine, uids = labelled
    with engine.begin() as c:  # trust reverses the quality order for three films; the fourth has none
        for uid, trust in zip(uids[:3], (0.8, 0.5, 0.2), strict=True):
            c.execute(D.measurements.update().where(D.measurements.c.uid == uid).values(trust=trust))
    rows, _ = R.worklist(engine, "m")
    assert [r["uid"] for r in rows] == [uids[2], uids[1], uids[0], uids[3]]
    assert [r["trust"] for r in rows] == [0.2, 0.5, 0.8, None]
    assert R.neighbours(engine, "m", uids[1]) == (uids[2], uids[0])
    assert R.neighbours(engine, "m", uids[0]) == (uids[1], uids[3])
    assert R.neighbours(engine, "m", uids[3]) == (uids[0], None)


def test_accept_correct_and_reject_are_stored_apart_from_the_model(labelled):
    engine, uids = labelled
    view = R.image_view(engine, uids[0], "m")
    assert set(view["polygons"]) == set(STRUCTURES) and view["version"] == 0
    assert all(len(p[0]) >= 3 for p in view["polygons"].values())
    # accept the first image
    after = R.save(engine, uids[0], "m", "dr. a", 0, "accepted")
    assert after["version"] == 1 and after["state"] == "accepted"
    # correct the second image's heart: widen it by 10% about its centre
    v = R.image_view(engine, uids[1], "m")
    heart = np.asarray(v["polygons"]["heart"][0], float)
    cx = heart[:, 0].mean()
    wider = np.column_stack([cx + (heart[:, 0] - cx) * 1.1, heart[:, 1]]).tolist()
    after = R.save(engine, uids[1], "m", "dr. b", v["version"], "corrected", polygons={"heart": [wider]})
    assert after["drawn_by"]["heart"] == "person" and after["drawn_by"]["left_lung"] == "model"
    # reject the third
    R.save(engine, uids[2], "m", "dr. a", 0, "rejected", note="motion blur")
    with engine.connect() as c:
        res = {r.uid: r for r in c.execute(text("SELECT uid, review, ctr, reviewed_ctr FROM label_results"))}
        kinds = sorted(c.execute(text("SELECT kind, COUNT(*) FROM masks WHERE model = 'm' GROUP BY kind")).all())
        predicted_heart = load_masks(c, [uids[1]], kind="predicted", model="m")[uids[1]]["heart"]
        reviewed_heart = load_masks(c, [uids[1]], kind="reviewed", model="m")[uids[1]]["heart"]
    assert res[uids[0]].review == "accepted" and res[uids[0]].reviewed_ctr == pytest.approx(res[uids[0]].ctr)
    assert res[uids[1]].review == "corrected"
    assert res[uids[1]].reviewed_ctr == pytest.approx(res[uids[1]].ctr * 1.1, rel=0.03)
    assert res[uids[2]].review == "rejected" and res[uids[2]].reviewed_ctr is None
    assert res[uids[3]].review is None
    assert kinds == [("predicted", 12), ("reviewed", 1)]  # the model's masks are all still there
    assert reviewed_heart.sum() > predicted_heart.sum() * 1.05
    _, counts = R.worklist(engine, "m")
    assert counts == {"images": 4, "reviewed": 3, "accepted": 1, "rejected": 1, "corrected": 1}


def test_two_browsers_never_lose_each_others_work(labelled):
    engine, uids = labelled
    v = R.image_view(engine, uids[0], "m")
    lung = v["polygons"]["left_lung"]
    heart = v["polygons"]["heart"]
    # two reviewers opened version 0; each corrects a different structure: both kept (merged)
    R.save(engine, uids[0], "m", "a", 0, "corrected", polygons={"left_lung": lung})
    R.save(engine, uids[0], "m", "b", 0, "corrected", polygons={"heart": heart})
    # a third, also from version 0, touches the heart again: refused, naming who saved it
    with pytest.raises(R.ReviewConflict, match="b saved heart"):
        R.save(engine, uids[0], "m", "c", 0, "corrected", polygons={"heart": heart})
    # and a whole-image decision from the stale version is refused too
    with pytest.raises(R.ReviewConflict):
        R.save(engine, uids[0], "m", "c", 0, "accepted")
    with engine.connect() as c:
        history = c.execute(select(D.reviews.c.reviewer, D.reviews.c.structure).order_by(D.reviews.c.id)).all()
    assert history == [("a", "left_lung"), ("b", "heart")]
    # the same race decided by the database: an insert of a version that exists fails
    fresh = R.image_view(engine, uids[0], "m")
    R.save(engine, uids[0], "m", "c", fresh["version"], "accepted")


@pytest.mark.parametrize("polygons, message", [
    ({"heart": []}, "at least one polygon"),
    ({"heart": [[[0, 0], [1, 1]]]}, "3 to"),
    ({"heart": [[[0, 0], [1, "x"], [2, 2]]]}, "pairs of finite numbers"),
    ({"heart": [[[0, 0], [1, float("nan")], [5, 2]]]}, "finite"),
    ({"spleen": [[[0, 0], [1, 1], [2, 0]]]}, "polygons for"),
])
def test_bad_corrections_are_refused_and_store_nothing(labelled, polygons, message):
    engine, uids = labelled
    with pytest.raises(R.ReviewError, match=message):
        R.save(engine, uids[0], "m", "a", 0, "corrected", polygons=polygons)
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM reviews")).scalar() == 0
        assert c.execute(text("SELECT COUNT(*) FROM masks WHERE kind = 'reviewed'")).scalar() == 0


def test_decisions_need_a_reviewer_and_a_known_image(labelled):
    engine, uids = labelled
    with pytest.raises(R.ReviewError, match="reviewer"):
        R.save(engine, uids[0], "m", " ", 0, "accepted")
    with pytest.raises(R.ReviewError, match="unknown decision"):
        R.save(engine, uids[0], "m", "a", 0, "deleted")
    with pytest.raises(R.ReviewError, match="no labels"):
        R.image_view(engine, "nope", "m")


def test_states_follow_the_latest_decision(labelled):
    engine, uids = labelled
    R.save(engine, uids[0], "m", "a", 0, "rejected", structure="heart")
    with engine.connect() as c:
        assert R.states(c, "m", uids)[uids[0]] == {"heart": "rejected"}
    R.save(engine, uids[0], "m", "b", 1, "accepted")  # a later whole-image decision covers the heart
    with engine.connect() as c:
        got = R.states(c, "m", uids)
    assert got[uids[0]] == {"heart": "accepted", "left_lung": "accepted", "right_lung": "accepted", "": "accepted"}
    assert uids[1] not in got


def test_display_png_is_the_image_at_display_size(labelled):
    engine, uids = labelled
    png, scale = R.display_png(engine, uids[0], side=256)
    import cv2
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint8 and max(img.shape) == 256 and 0 < scale <= 1


def test_training_takes_reviewed_and_accepted_masks_but_validates_on_manual_only(annotated_engine, tmp_path):
    from pipeline.model import read_checkpoint
    from pipeline.train import TrainConfig, cross_validate
    from pipeline.train.data import load_dataset
    engine = annotated_engine
    uids = pretend_labelled(engine, 3, model="default")
    with engine.begin() as c:  # these three become images nobody annotated, only reviewed
        c.execute(D.masks.delete().where(D.masks.c.kind == "manual", D.masks.c.uid.in_(uids)))
    v = R.image_view(engine, uids[0], "default")
    R.save(engine, uids[0], "default", "a", 0, "corrected", polygons={"heart": v["polygons"]["heart"]})
    R.save(engine, uids[1], "default", "a", 0, "accepted")
    R.save(engine, uids[2], "default", "a", 0, "rejected")
    cache = str(tmp_path / "cache")
    only_manual = load_dataset(engine, TrainConfig.from_preset("tiny"), cache)
    assert only_manual.counts() == {"manual": len(only_manual.uids)} and not set(uids) & set(only_manual.uids)
    cfg = TrainConfig.from_preset("tiny", masks=("manual", "reviewed", "accepted"), epochs=1, folds=2, threads=1)
    ds = load_dataset(engine, cfg, cache)
    assert ds.counts() == {"manual": len(only_manual.uids), "reviewed": 1, "accepted": 1}
    assert set(ds.manual) == set(only_manual.uids)
    cv = cross_validate(engine, cfg, tmp_path / "run", cache, "cpu", progress=False, dataset=ds)
    assert not {uids[0], uids[1]} & {u for r in cv.results for u in r.held_out}  # never validated on
    assert cv.images == {"manual": len(only_manual.uids), "reviewed": 1, "accepted": 1}
    from pipeline.model import register_model
    register_model(engine, "looped", tmp_path / "run" / "fold0" / "best.pt", cfg.preset, cfg.as_dict(), {}, ds.hash,
                   {"training_images": ds.counts()})
    from pipeline.model import list_models
    assert {m["name"]: m["trained_on"] for m in list_models(engine)}["looped"] == \
        f"manual {len(only_manual.uids)}, reviewed 1, accepted 1"
    info = read_checkpoint(tmp_path / "run" / "fold0" / "best.pt").info
    assert info["images"]["reviewed"] == 1 and info["images"]["accepted"] == 1
    with pytest.raises(Exception, match="includes manual"):
        TrainConfig.from_preset("tiny", masks=("reviewed",))


def test_polygons_of_never_yields_fewer_than_three_vertices():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 10:12] = True  # a two-pixel-wide sliver
    mask[20:21, 20:35] = True  # and a one-pixel line
    for poly in R.polygons_of(mask):
        assert len(poly) >= 3
    filled = R.mask_of(R.polygons_of(mask), 40, 40)
    assert filled[10:25, 10:12].all()


def test_reviews_work_the_same_on_postgresql(engine):
    """The `engine` fixture runs this on SQLite and PostgreSQL: saves, the version check, the
    view's review state."""
    mask = np.zeros((60, 80), bool)
    with engine.begin() as c:
        c.execute(text("INSERT INTO images (uid, source, loaded_at) VALUES ('p1', 'csv', '2026-01-01')"))
        rows = []
        for k, s in enumerate(STRUCTURES):
            m = mask.copy()
            m[10:50, 5 + 25 * k:25 + 25 * k] = True
            rows.append(mask_row("p1", s, m.astype(np.uint8), kind="predicted", model="m"))
        D.upsert(c, D.masks, rows, ("uid", "structure", "kind", "model"))
        c.execute(D.measurements.insert().values(uid="p1", model="m", ctr=0.3, quality=0.9, labelled_at=D.utcnow()))
    v = R.image_view(engine, "p1", "m")
    R.save(engine, "p1", "m", "a", 0, "corrected", polygons={"heart": [[[5, 10], [40, 10], [40, 49], [5, 49]]]})
    with pytest.raises(R.ReviewConflict):
        R.save(engine, "p1", "m", "b", v["version"], "corrected", polygons={"heart": v["polygons"]["heart"]})
    with engine.connect() as c:
        row = c.execute(text("SELECT review, reviewed_ctr FROM label_results WHERE uid = 'p1'")).one()
    assert row.review == "corrected" and row.reviewed_ctr == pytest.approx(36 / 45)  # heart 5-40, lungs 30-74


def test_a_flagged_films_stored_reason_shows_wherever_the_flag_does(labelled):
    """The contact sheet said "not read as a chest film" of chest films the check had flagged
    as cropped, and the worklist and page showed quality 0.000 without a reason: each now shows
    the stored reason."""
    from pipeline.report import flag_caption
    from pipeline.webapp import create_app

    engine, uids = labelled
    reason = "cropped? a lung runs off the film's edge"
    with engine.begin() as c:
        c.execute(text("UPDATE measurements SET input_check = :r, quality = 0 WHERE uid = :u"),
                  {"r": reason, "u": uids[0]})
    page = create_app(engine, "m").test_client().get("/", headers={"Host": "127.0.0.1:8765"})
    assert page.status_code == 200 and "flagged: cropped? a lung runs off the film&#39;s edge" in page.text
    assert R.image_view(engine, uids[0], "m")["measurements"]["input_check"] == reason
    assert flag_caption(reason) == "flag: cropped?"
    assert flag_caption("flipped left-right (or situs inversus)? the heart and left lung lie on the image's left") \
        == "flag: flipped left-right?"


def test_report_prints_the_groups_numbers_and_the_aucs_interval(annotated_engine, tmp_path):
    """`report` printed only file paths: it now prints each group's count, CTR summary and
    share above 0.5, and the AUC with its 95% interval (DeLong), and --json gives them all."""
    import json

    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.metrics import auc_interval

    uids = pretend_labelled(annotated_engine, 12, model="m")
    with annotated_engine.begin() as c:
        ctrs = dict(c.execute(text("SELECT uid, ctr FROM measurements WHERE model = 'm'")).all())
        ranked = sorted(uids, key=lambda u: ctrs[u])
        c.execute(D.groups.insert(), [{"uid": u, "group_name": "cardiomegaly" if k % 3 else "healthy", "rule": "t",
                                       "assigned_at": D.utcnow()} for k, u in enumerate(ranked)])
    args = ["--db", str(annotated_engine.url), "report", "--group", "cardiomegaly", "--group", "healthy",
            "--model", "m", "--per-film", "--out", str(tmp_path / "rep")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "cardiomegaly" in r.output and "above 0.5" in r.output and "95% CI" in r.output
    got = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    view = next(iter(got["summary"]["views"].values()))
    pos = [ctrs[u] for k, u in enumerate(ranked) if k % 3]
    neg = [ctrs[u] for k, u in enumerate(ranked) if not k % 3]
    assert view["groups"]["cardiomegaly"]["n"] == len(pos) and view["groups"]["healthy"]["n"] == len(neg)
    assert view["auc"]["auc"] == pytest.approx(auc_interval(pos, neg)[0])
    lo, hi = view["auc"]["ci95"]
    assert lo <= view["auc"]["auc"] <= hi and got["files"]["histogram"].endswith(".png")

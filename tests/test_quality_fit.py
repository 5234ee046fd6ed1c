"""`cxrlabel quality fit`: a model's quality score fitted on annotated films it did not train on
(the database's, or a cross-validation's held-out folds), kept in the database, used by `label`."""

import json
import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from pipeline import db as D
from pipeline.cli import cli
from pipeline.model import read_checkpoint, resolve_model
from pipeline.quality import QualityModel, sidecar, stored
from pipeline.quality.films import true_dice
from pipeline.quality.fit import FitError, calibration, fit, roc_auc, spearman

pytestmark = pytest.mark.slow


def test_a_score_fitted_on_the_databases_films_is_kept_there_and_labels_with_it(annotated_engine, tiny_model,
                                                                                 tmp_path):
    cache = str(tmp_path / "cache")
    trained = set(read_checkpoint(tiny_model).info["trained_uids"])
    with annotated_engine.connect() as conn:
        annotated = set(conn.execute(select(D.masks.c.uid).where(D.masks.c.kind == "manual")).scalars())
    assert trained < annotated  # the tiny model held a fifth of the films out
    result = fit(annotated_engine, str(tiny_model), folds=3, figure=tmp_path / "cal.png", cache=cache,
                 progress=False)
    info = result.score.info
    assert info["films"] == len(annotated - trained)  # only films the model never trained on
    assert info["folds"] == 3 and "did not train on" in info["fitted_on"]
    j = result.judged
    assert j.films == len(annotated - trained) and -1 <= j.spearman <= 1 and 0 <= j.mae < 0.5
    assert 0 <= j.auroc <= 1 and j.ctr_films > 10  # the Wingspan films carry a true CTR
    # the worklist's trust is fitted beside the score and judged held out the same way
    assert result.score.trust is not None and result.score.trust.films == j.films
    assert 0 <= j.trust_auroc <= 1 and info["held_out"]["auroc_worst_tenth_ctr_by_trust"] is not None
    assert sum(n for _, _, n in j.calibration) == j.films and len(j.calibration) == 10
    # the worst tenth by true mean Dice too, by the score and by the trust
    assert 0 <= j.auroc_dice <= 1 and 0 <= j.trust_auroc_dice <= 1
    assert info["held_out"]["auroc_worst_tenth_dice"] == round(j.auroc_dice, 4)
    # each source judged by a score and trust fitted on the other source's films alone
    assert set(j.unseen) == {"generalblockchain", "wingspan"} == set(info["held_out_unseen_source"])
    assert j.unseen["wingspan"].films == j.by_source["wingspan"].films
    assert j.unseen["wingspan"].estimate != j.by_source["wingspan"].estimate  # another fit
    assert j.unseen["wingspan"].ctr_films > 10 and 0 <= j.unseen["wingspan"].trust_auroc <= 1
    assert math.isnan(j.unseen["generalblockchain"].auroc)  # no heart-only truth there: no CTR error
    assert result.films == j.films and (result.too_few() is None) == (j.films >= 50)
    assert (tmp_path / "cal.png").stat().st_size > 1000
    from pipeline.quality.fit import _is_our_figure
    assert _is_our_figure(tmp_path / "cal.png")  # a later fit may replace it; a foreign PNG it refuses
    # kept in the database for this very checkpoint; labelling finds it before any file
    lm = resolve_model(annotated_engine, str(tiny_model), "cpu")
    assert stored(annotated_engine, lm.sha256) is not None
    assert lm.scores.plain_from.startswith("the database's quality_scores row")
    assert lm.quality.estimate is not None and lm.quality.info["fitted_on"] == info["fitted_on"]
    from pipeline.groups import select_images
    from pipeline.label import LabelOptions, label
    with annotated_engine.connect() as conn:
        sel = select_images(conn, None, None, True, 3)
    label(annotated_engine, sel, LabelOptions(model=str(tiny_model), device="cpu", cache_dir=cache, progress=False))
    with annotated_engine.connect() as conn:
        q = conn.execute(select(D.measurements.c.quality, D.measurements.c.quality_heart,
                                D.measurements.c.trust)).all()
    assert len(q) == 3 and all(r.quality_heart is not None and 0 <= r.quality <= 1 for r in q)
    assert all(0 <= r.trust <= 1 for r in q)
    # `quality show` says which score and where from
    out = CliRunner().invoke(cli, ["--db", str(annotated_engine.url), "quality", "show", "--model",
                                   str(tiny_model), "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown[0]["score"] == "plain" and shown[0]["from"].startswith("the database")
    assert shown[0]["spearman"] == pytest.approx(j.spearman, abs=1e-4)
    assert shown[0]["auroc_worst_dice"] == pytest.approx(j.auroc_dice, abs=1e-4)


def test_quality_fit_refuses_what_it_cannot_hold_out(annotated_engine, tiny_model, tmp_path):
    inside = Path(str(files("pipeline"))) / "models" / "x.quality.json"
    with pytest.raises(FitError, match="inside the installed cxrlabel package"):
        fit(annotated_engine, str(tiny_model), out=inside, progress=False)
    assert not inside.exists()
    # a checkpoint that does not say which films it trained on: the user names films it never saw
    ck = read_checkpoint(tiny_model)
    ck.info.pop("trained_uids")
    from pipeline.model import write_checkpoint
    older = tmp_path / "older.pt"
    write_checkpoint(older, ck)
    with pytest.raises(FitError, match="does not record which films it trained on.*--sample"):
        fit(annotated_engine, str(older), progress=False)
    with pytest.raises(FitError, match="no sample named 'nosuch'"):
        fit(annotated_engine, str(older), sample="nosuch", progress=False)
    result = CliRunner().invoke(cli, ["--db", str(annotated_engine.url), "quality", "fit", "--model", str(older),
                                      "--cv", str(tmp_path)])
    assert result.exit_code == 1 and "no splits.json" in result.output and "Traceback" not in result.output


def test_a_score_fitted_on_cross_validation_folds_records_them_and_ships_as_a_file(annotated_engine, tmp_path):
    from pipeline.train import TrainConfig, cross_validate
    cfg = TrainConfig.from_preset("tiny", epochs=2, folds=2, threads=2)
    cross_validate(annotated_engine, cfg, tmp_path / "cv", str(tmp_path / "cache"), progress=False)
    model = tmp_path / "cv" / "fold0" / "final.pt"
    result = CliRunner().invoke(cli, ["--db", str(annotated_engine.url), "quality", "fit", "--model", str(model),
                                      "--cv", str(tmp_path / "cv"), "--out", str(sidecar(model)),
                                      "--cache", str(tmp_path / "cache"), "--tta"])
    assert result.exit_code == 0, result.output
    assert "score, held out (231 films, 231 with their variants)" in result.output
    assert "score with --tta" in result.output
    assert "  wingspan films only (131)" in result.output and "  generalblockchain films only (100)" in result.output
    score = QualityModel.load(sidecar(model))
    assert score.info["fold_models"]["checkpoint"] == "final" and score.info["folds"] == 2
    assert "out-of-fold films of cv" in score.info["fitted_on"]
    assert score.info["held_out_by_source"]["wingspan"]["films"] == 131
    assert QualityModel.load(sidecar(model, tta=True)).features[-1] == "tta"
    assert score.atlas is not None and score.atlas.structures == ("heart", "left_lung", "right_lung")


def test_the_fit_figures_are_the_usual_ones():
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0], bool)) == 0.5  # a tie counts half
    assert math.isnan(roc_auc(np.array([0.5]), np.array([1], bool)))
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    table = calibration(np.linspace(0.8, 1.0, 100), np.linspace(0.8, 1.0, 100))
    assert len(table) == 10 and sum(n for _, _, n in table) == 100 and table[0][0] == pytest.approx(table[0][1])


def test_a_lung_drawn_behind_the_heart_is_compared_in_its_own_convention():
    lung = np.zeros((20, 20), bool)
    lung[2:18, 10:18] = True
    heart = np.zeros((20, 20), bool)
    heart[8:16, 6:13] = True
    scr = lung & ~heart  # what the model draws: the lung as SCR does
    assert true_dice({"left_lung": scr}, {"left_lung": lung, "heart": heart})["left_lung"] == 1.0
    assert true_dice({"left_lung": scr}, {"left_lung": lung})["left_lung"] < 0.95  # no heart drawn: all counts


def test_a_fit_that_ranks_nothing_replaces_no_score_without_force(annotated_engine, tiny_model, tmp_path,
                                                                  monkeypatch):
    """Held-out figures that are NaN (films that do not differ: four copies of one film read
    Spearman NaN, then every film 0.9738) or below the floor keep the score a model has;
    --force keeps the new one; --json stays valid JSON (NaN as null)."""
    import pipeline.quality.fit as F
    from pipeline.quality.fit import Judged, not_worth_installing

    shipped = QualityModel.load(sidecar(resolve_model(None, "default", "cpu").path))
    blank = Judged(4, math.nan, math.nan, math.nan, math.nan, math.nan, 0, [])
    assert "missing" in not_worth_installing(blank)
    assert "below the floor" in not_worth_installing(Judged(40, 0.1, 0.05, 0.2, 0.5, 0.5, 30, []))
    assert not_worth_installing(Judged(40, 0.7, 0.02, 0.2, 0.5, 0.8, 30, [])) is None
    monkeypatch.setattr(F, "from_database", lambda *a, **k: None)
    monkeypatch.setattr(F, "label", lambda *a, **k: F.Films([], 0, "nothing", None, None))
    monkeypatch.setattr(F, "fit_films", lambda *a, **k: (shipped, blank, None, None))
    lm = resolve_model(annotated_engine, str(tiny_model), "cpu")
    with pytest.raises(FitError, match="not kept: its held-out figures are missing .*--force"):
        fit(annotated_engine, str(tiny_model), progress=False)
    assert stored(annotated_engine, lm.sha256) is None
    out = CliRunner().invoke(cli, ["--db", str(annotated_engine.url), "quality", "fit", "--model", str(tiny_model),
                                   "--force", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["score"]["spearman"] is None
    assert stored(annotated_engine, lm.sha256) is not None
    out = CliRunner().invoke(cli, ["--db", str(annotated_engine.url), "quality", "fit", "--model", str(tiny_model),
                                   "--alpha", "0"])
    assert out.exit_code != 0 and "--alpha" in out.output

"""Adapting a model to a clinic's films (`train --from`), a site's CTR calibration, and parent
and adapted model compared on the films neither trained on."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import func, select, text

from pipeline import db as D
from pipeline.calibration import CalibrationError, calibrate, fit
from pipeline.cli import cli
from pipeline.model import read_checkpoint
from pipeline.model.checkpoints import file_sha256
from pipeline.train.adapt import adapt, adaptation_config, teach_missing
from pipeline.train.config import TrainError
from pipeline.train.data import load_dataset
from tests.conftest import WINGSPAN

CLINIC_FILMS = 12


@pytest.fixture(scope="module")
def clinic(tiny_model, tmp_path_factory):
    """A clinic's database as a clinic's would be: only its own films, with heart and lung
    outlines (no cardiomediastinum), none of which the parent (`tiny_model`) trained on."""
    from pipeline.masks import import_png_dirs
    seen = set(read_checkpoint(tiny_model).info["trained_uids"])
    names = [p.name for p in sorted((WINGSPAN / "png").iterdir()) if p.stem not in seen][:CLINIC_FILMS]
    assert len(names) == CLINIC_FILMS
    root = tmp_path_factory.mktemp("clinic")
    for sub in ("png", "mask/heart", "mask/left_lung", "mask/right_lung"):
        (root / "films" / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(WINGSPAN / sub / n, root / "films" / sub / n)
    eng = D.connect(f"sqlite:///{root / 'clinic.db'}")
    import_png_dirs(eng, root / "films", images="png", source="clinic_a",
                    masks={s: f"mask/{s}" for s in ("heart", "left_lung", "right_lung")})
    eng.dispose()
    return root


@pytest.fixture
def clinic_db(clinic, tmp_path):
    shutil.copy(clinic / "clinic.db", tmp_path / "clinic.db")
    return f"sqlite:///{tmp_path / 'clinic.db'}"


def run(url, *args):
    return CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)


def test_train_from_adapts_the_parent_and_records_its_lineage(clinic_db, tiny_model, tmp_path, monkeypatch):
    """Plain `train` refuses a clinic's films (no cardiomediastinum); `train --from` adapts on them,
    the parent teaching the structure they do not draw, and the new model says whose it is."""
    monkeypatch.setenv("CXRLABEL_CACHE", str(tmp_path / "cache"))
    plain = run(clinic_db, "train", "--model", "tiny", "--epochs", "1", "--run-dir", str(tmp_path / "plain"))
    assert plain.exit_code != 0 and "no annotated image defines cardiomediastinum" in plain.output
    assert "--structures heart,left_lung,right_lung" in plain.output
    r = run(clinic_db, "train", "--from", str(tiny_model), "--epochs", "2", "--name", "clinic_tiny",
            "--run-dir", str(tmp_path / "adapted"))
    assert r.exit_code == 0, r.output
    assert f"adapted on {CLINIC_FILMS} films" in r.output and f"cardiomediastinum taught by run on {CLINIC_FILMS}" \
        in r.output
    ck = read_checkpoint(tmp_path / "adapted" / "best.pt")
    parent = read_checkpoint(tiny_model)
    assert ck.info["parent"] == {"name": "run", "sha256": file_sha256(tiny_model)}
    eng = D.connect(clinic_db)
    with eng.connect() as conn:
        films = sorted(conn.execute(select(D.images.c.uid)).scalars())
        row = conn.execute(select(D.models).where(D.models.c.name == "clinic_tiny")).mappings().one()
    assert ck.info["adapted_uids"] == films
    # its trained films are the parent's and the clinic's: evaluate and quality fit leave all out
    assert set(ck.info["trained_uids"]) == set(parent.info["trained_uids"]) | set(films)
    assert json.loads(row["metrics"])["parent"]["sha256"] == file_sha256(tiny_model)
    # the parent's network and input, a tenth of its learning rate, the pull toward its weights
    assert ck.spec.structures == parent.spec.structures and ck.spec.size == parent.spec.size
    assert ck.training["lr"] == pytest.approx(parent.training["lr"] * 0.1)
    assert ck.training["parent"] == file_sha256(tiny_model) and ck.training["pull"] > 0
    moved = [not torch.equal(ck.state_dict[k].float(), parent.state_dict[k].float())
             for k in parent.state_dict if parent.state_dict[k].is_floating_point()]
    assert any(moved)
    # labelling with it keeps the parent's rows beside its own
    assert run(clinic_db, "label", "--all", "--model", str(tiny_model)).exit_code == 0
    assert run(clinic_db, "label", "--all", "--model", "clinic_tiny").exit_code == 0
    with eng.connect() as conn:
        by_model = dict(conn.execute(select(D.measurements.c.model, func.count()).group_by(
            D.measurements.c.model)).all())
    eng.dispose()
    assert by_model == {"run": CLINIC_FILMS, "clinic_tiny": CLINIC_FILMS}
    status = run(clinic_db, "status").output
    assert f"clinic_tiny labels now, adapted from run (sha256 {file_sha256(tiny_model)[:12]}) on {CLINIC_FILMS} " \
        "films" in status


def test_train_from_source_adapts_on_that_sources_films_only(clinic_db, tiny_model, tmp_path, monkeypatch):
    """A clinic's database that also holds a public set (the demo's does): `--source` keeps the
    adaptation to the clinic's films; the checkpoint says so; an unknown source is refused."""
    from pipeline.masks import import_png_dirs
    monkeypatch.setenv("CXRLABEL_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "public"
    names = sorted(p.name for p in (WINGSPAN / "png").iterdir())[-4:]
    for sub in ("png", "mask/heart", "mask/left_lung", "mask/right_lung"):
        (other / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(WINGSPAN / sub / n, other / sub / f"pub_{n}")
    eng = D.connect(clinic_db)
    import_png_dirs(eng, other, images="png", source="public",
                    masks={s: f"mask/{s}" for s in ("heart", "left_lung", "right_lung")})
    with eng.connect() as conn:
        clinic = sorted(conn.execute(select(D.images.c.uid).where(D.images.c.source == "clinic_a")).scalars())
    eng.dispose()
    r = run(clinic_db, "train", "--from", str(tiny_model), "--epochs", "1", "--source", "clinic_a",
            "--run-dir", str(tmp_path / "a"), "--name", "clinic_only")
    assert r.exit_code == 0, r.output
    ck = read_checkpoint(tmp_path / "a" / "best.pt")
    assert ck.info["adapted_uids"] == clinic and list(ck.training["sources"]) == ["clinic_a"]
    r = run(clinic_db, "train", "--from", str(tiny_model), "--epochs", "1", "--source", "clinic_b",
            "--run-dir", str(tmp_path / "b"))
    assert r.exit_code != 0 and "no manual masks of source clinic_b" in r.output


def test_train_from_keeps_the_parents_network(clinic_db, tiny_model):
    for args, option in ((["--size", "128"], "--size"), (["--structures", "heart"], "--structures"),
                         (["--model", "cxr_small"], "--model cxr_small"), (["--folds", "3"], "--folds")):
        r = run(clinic_db, "train", "--from", str(tiny_model), *args)
        assert r.exit_code != 0 and option in r.output and "Traceback" not in r.output
    r = run(clinic_db, "train", "--pull", "5")
    assert r.exit_code == 2 and "--from" in r.output


def test_the_parent_teaches_only_what_a_film_does_not_draw(clinic_db, tiny_model, tmp_path):
    from pipeline.model import load_model
    parent, ck = load_model(tiny_model)
    cfg = adaptation_config(ck.training, ck.spec.as_dict(), "0" * 64)
    eng = D.connect(clinic_db)
    ds = load_dataset(eng, cfg, str(tmp_path / "cache"), every_structure=False)
    eng.dispose()
    drawn = ds.masks.copy()
    before = ds.valid.copy()
    assert not before[:, cfg.structures.index("cardiomediastinum")].any() and before[:, :3].all()
    taught = teach_missing(ds, list(range(len(ds.uids))), parent, cfg, torch.device("cpu"))
    assert taught == {"cardiomediastinum": len(ds.uids)} and ds.valid.all()
    assert np.array_equal(ds.masks[:, :3], drawn[:, :3])  # the clinic's outlines are kept as drawn
    j = cfg.structures.index("cardiomediastinum")
    soft = ds.masks[:, j]
    assert soft.max() <= 1 and soft.min() >= 0 and (soft > 0.5).any()


def test_the_pull_keeps_an_adaptation_nearer_its_parent(clinic_db, tiny_model, tmp_path):
    from pipeline.model import load_model
    from pipeline.train.loop import Start, Trainer
    _, ck = load_model(tiny_model)
    eng = D.connect(clinic_db)
    distance = {}
    for pull in (0.0, 3000.0):
        cfg = adaptation_config(ck.training, ck.spec.as_dict(), "0" * 64, epochs=2, pull=pull)
        ds = load_dataset(eng, cfg, str(tmp_path / "cache"), every_structure=False)
        start = Start(ck.state_dict, "tiny", "0" * 64, ())
        t = Trainer(eng, cfg, tmp_path / f"pull{pull}", str(tmp_path / "cache"), "cpu", ds, held_out=[], start=start)
        t.run(progress=False)
        distance[pull] = sum(float((p.detach() - p0).pow(2).sum())
                             for p, p0 in zip(t.model.parameters(), t.anchor, strict=True))
    eng.dispose()
    assert 0 < distance[3000.0] < 0.5 * distance[0.0]


def test_adapting_without_films_says_what_to_do(tmp_path, tiny_model):
    eng = D.connect(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(TrainError, match="no manual masks"):
        adapt(eng, str(tiny_model), tmp_path / "run", "x", str(tmp_path / "cache"), progress=False)
    eng.dispose()


def test_an_offset_calibration_recovers_a_shift_and_says_what_it_gains():
    rng = np.random.default_rng(0)
    true = rng.uniform(0.4, 0.65, 40)
    pred = true - 0.012 + rng.normal(0, 0.005, 40)
    got = fit(pred, true, "offset")
    assert got["intercept"] == pytest.approx(0.012, abs=0.003) and got["slope"] == 1.0
    assert got["intercept_ci"][0] < 0.012 < got["intercept_ci"][1]
    assert got["calibrated_loo"]["mae"] < got["raw"]["mae"] / 2
    assert abs(got["calibrated_loo"]["bias"]) < 0.002
    line = fit(pred * 0.8 + 0.1, true, "linear")  # a compressed range: the slope undoes it
    assert line["slope"] == pytest.approx(1.25, abs=0.1) and line["slope_ci"][0] < 1.25 < line["slope_ci"][1]


def test_a_sites_calibration_shows_beside_the_raw_ctr(clinic_db, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLABEL_CACHE", str(tmp_path / "cache"))
    assert run(clinic_db, "label", "--all", "--model", str(tiny_model)).exit_code == 0
    eng = D.connect(clinic_db)
    with pytest.raises(CalibrationError, match=f"offset calibration needs {CLINIC_FILMS + 1}: annotate more"):
        calibrate(eng, str(tiny_model), "clinic_a", min_films=CLINIC_FILMS + 1)
    r = run(clinic_db, "calibrate", "--model", str(tiny_model), "--source", "clinic_a", "--min-films", "3")
    assert r.exit_code == 0, r.output
    assert "offset calibration on" in r.output and "MAE" in r.output and "stored" in r.output
    with eng.connect() as conn:
        cal = conn.execute(select(D.ctr_calibrations)).mappings().one()
        rows = conn.execute(text("SELECT ctr, ctr_calibrated, ctr_calibration FROM label_results")).all()
    details = json.loads(cal["details"])
    assert cal["films"] == len(details["uids"]) >= 3 and cal["slope"] == 1.0
    with_ctr = [r for r in rows if r.ctr is not None]
    assert with_ctr and all(r.ctr_calibrated == pytest.approx(r.ctr + cal["intercept"]) for r in with_ctr)
    assert all(r.ctr_calibration.startswith("offset calibration for clinic_a") for r in rows)
    # another site, or another model's weights, is not calibrated by it
    assert run(clinic_db, "calibrate", "--model", str(tiny_model), "--source", "nowhere").exit_code == 1
    listed = run(clinic_db, "calibrate", "--list", "--json")
    assert json.loads(listed.output)[0]["site"] == "clinic_a"
    assert "calibration removed" in run(clinic_db, "calibrate", "--model", str(tiny_model), "--source", "clinic_a",
                                        "--drop").output
    with eng.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM label_results WHERE ctr_calibrated IS NOT NULL")).scalar() == 0
    eng.dispose()


def test_parent_and_adaptation_compare_on_the_films_neither_trained_on(clinic_db, tiny_model, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("CXRLABEL_CACHE", str(tmp_path / "cache"))
    r = run(clinic_db, "train", "--from", str(tiny_model), "--epochs", "1", "--val-frac", "0.34", "--name", "a",
            "--run-dir", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    held = json.loads((tmp_path / "a" / "splits.json").read_text())["val"][0]
    assert 0 < len(held) < CLINIC_FILMS
    for model in (str(tiny_model), "a"):
        assert run(clinic_db, "label", "--all", "--model", model).exit_code == 0
    r = run(clinic_db, "evaluate", "--model", "run", "--model", "a", "--json")
    assert r.exit_code == 0, r.output
    both = json.loads(r.output)
    assert [e["model"] for e in both] == ["run", "a"]
    assert all(sorted(p["uid"] for p in e["per_image"]) == sorted(held) for e in both)
    text = run(clinic_db, "evaluate", "--model", "run", "--model", "a").output
    assert f"on the same {len(held)} films" in text and "CTR bias" in text and "Dice heart" in text

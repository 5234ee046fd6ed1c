import dataclasses
import json

import numpy as np
import pytest
import torch
from sqlalchemy import select, text

from pipeline import db as D
from pipeline.model import ModelError, build_network, load_model, read_checkpoint
from pipeline.networks import NETWORKS, create_network
from pipeline.train import TrainConfig, TrainError, cross_validate, presets, train
from pipeline.train.average import WeightAverage
from pipeline.train.folds import make_splits, splits_for, update_splits
from pipeline.train.losses import seg_loss, width_loss

SMALL = {"unet": {"channels": (4, 8, 16)}, "segresnet": {"init_filters": 8},
         "segresnetvae": {"init_filters": 8, "input_image_size": (64, 64)},
         "dynunet": {"filters": (4, 8, 16, 32)}, "vnet": {}, "regunet": {"num_channel_initial": 4,
                                                                         "depth": 3},
         "simple_aspp": {"base": 4, "aspp_channels": 8}}


def test_every_paper_network_is_registered():
    assert set(NETWORKS) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_network_builds_and_runs(name):
    net = create_network(name, out_channels=3, **SMALL[name])
    out = net(torch.randn(2, 1, 64, 64))
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 3, 64, 64)


def test_reading_a_models_spec_never_imports_monai():
    """`quality show`, `models list` and `status` read checkpoints' specs: a registry look-up
    of names (pipeline.one_of), not MONAI's, whose import alone took 2 of `quality show`'s
    4.5 s. Building a network still imports it."""
    import subprocess
    import sys
    code = ("import sys\nfrom pipeline.model import read_checkpoint, model_scores\n"
            "from pipeline.train.config import TrainConfig\nTrainConfig.from_preset('cxr_deep')\n"
            "print('monai' in sys.modules)\n"
            "from pipeline.networks import create_network\ncreate_network('unet', channels=(4, 8, 16))\n"
            "print('monai' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_unknown_network_suggests_names():
    with pytest.raises(ValueError, match="did you mean 'unet'"):
        create_network("unett")
    with pytest.raises(TrainError, match="unknown preset.*did you mean 'cxr_deep'"):
        TrainConfig.from_preset("cxr_dep")


@pytest.mark.parametrize("name", sorted(presets()))
def test_presets_parse(name):
    cfg = TrainConfig.from_preset(name)
    assert cfg.network in NETWORKS and cfg.size >= 32
    if cfg.roi:
        assert cfg.roi <= cfg.size


def test_paper_presets_match_the_paper():
    p = presets()
    assert p["unet5"]["args"]["channels"] == [64, 128, 256, 512, 1024]
    assert p["unet7"]["args"]["channels"] == [16, 64, 128, 256, 512, 1024, 2048]
    assert p["unet7_res"]["args"]["num_res_units"] > 0 and p["unet7_res"]["size"] == 512
    assert {p[f"unet7_res_roi{r}"]["roi"] for r in (96, 384, 448)} == {96, 384, 448}


def test_model_takes_any_size():
    cfg = TrainConfig.from_preset("tiny")
    net = build_network(cfg.spec())
    assert net(torch.randn(1, 1, 50, 70)).shape == (1, len(cfg.structures), 50, 70)


def test_unknown_norm_is_refused_with_the_choices():
    with pytest.raises(TrainError, match="preset tiny: .*'minmax'.*clahe"):
        TrainConfig.from_preset("tiny", norm="minmax")


def test_folds_partition_the_data_as_before():
    uids = [f"u{i:03d}" for i in range(100)]
    splits = make_splits(uids, folds=5, seed=0)
    assert sorted(sum(splits.val, [])) == uids and all(len(v) == 20 for v in splits.val)
    # the same folds as the index split used before splits were stored (seed 0)
    import random
    order = list(range(100))
    random.Random(0).shuffle(order)
    assert splits.val[2] == sorted(uids[i] for i in order[2::5])


def test_folds_keep_a_patients_films_together(annotated_db):
    """GeneralBlockchain's 100 films come from 73 patients: no patient is on both sides of a
    fold, folds stay near 20 films, and a patient's new film joins the patient's fold."""
    eng = D.connect(f"sqlite:///{annotated_db}")
    with eng.connect() as c:
        rows = c.execute(text("SELECT uid, source, patient_id FROM images WHERE source = 'generalblockchain'")).all()
    eng.dispose()
    groups = {r.uid: f"{r.source}:{r.patient_id}" for r in rows if r.patient_id}
    uids = [r.uid for r in rows]
    assert len(set(groups.values())) == 73 and len(uids) == 100
    splits = make_splits(uids, folds=5, seed=0, groups=groups)
    assert splits.grouped_by == "patient" and sorted(sum(splits.val, [])) == sorted(uids)
    fold_of = {u: k for k, f in enumerate(splits.val) for u in f}
    for patient in set(groups.values()):
        assert len({fold_of[u] for u, g in groups.items() if g == patient}) == 1, patient
    assert all(17 <= len(f) <= 23 for f in splits.val), [len(f) for f in splits.val]
    someone = max(set(groups.values()), key=list(groups.values()).count)
    grown, joined, _ = update_splits(splits, uids + ["late_film"], {**groups, "late_film": someone})
    assert joined == ["late_film"]
    assert next(k for k, f in enumerate(grown.val) if "late_film" in f) == \
        fold_of[next(u for u, g in groups.items() if g == someone)]
    held = make_splits(uids, val_frac=0.2, seed=0, groups=groups).val[0]
    assert not {groups.get(u) for u in held} & {groups.get(u) for u in uids if u not in held} - {None}


def test_a_new_annotated_image_never_moves_existing_folds(tmp_path):
    cfg = TrainConfig.from_preset("tiny", folds=5)
    uids = [f"u{i:03d}" for i in range(100)]
    first = splits_for(tmp_path, uids, cfg)
    assert (tmp_path / "splits.json").exists()
    grown = splits_for(tmp_path, uids + ["new1", "new2"], cfg)
    for before, after in zip(first.val, grown.val, strict=True):
        assert set(before) <= set(after)  # every old image stays in its fold
    assert sorted(sum(grown.val, [])) == sorted(uids + ["new1", "new2"])
    # the rule depends on the uid alone: the same fold whatever else joined
    alone, joined, _ = update_splits(first, uids + ["new2"])
    assert joined == ["new2"] and [("new2" in f) for f in alone.val] == [("new2" in f) for f in grown.val]
    # a removed image leaves its fold and nothing else moves
    shrunk, _, left = update_splits(grown, [u for u in grown.uids if u != "u007"])
    assert left == ["u007"] and sum(map(len, shrunk.val)) == 101
    with pytest.raises(TrainError, match="another way"):
        splits_for(tmp_path, uids, TrainConfig.from_preset("tiny", folds=4))


def test_loss_ignores_unannotated_channels():
    logits = torch.zeros(1, 3, 8, 8)
    target = torch.ones(1, 3, 8, 8)
    all_valid = seg_loss(logits, target, torch.tensor([[True, True, True]]))
    target[0, 2] = 0  # an unannotated structure: its (wrong) target must not count
    partial = seg_loss(logits, target, torch.tensor([[True, True, False]]))
    assert torch.isclose(all_valid, partial)


def test_the_three_losses_are_dice_bce_and_their_sum():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 16, 16), (torch.rand(2, 3, 16, 16) > 0.5).float()
    valid = torch.tensor([[True, True, False], [True, False, True]])
    dice, ce, both = (seg_loss(logits, target, valid, k) for k in ("dice", "ce", "dicece"))
    assert torch.isclose(both, dice + ce) and 0 < ce.item() and 0 < dice.item() < 1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
    assert torch.isclose(ce, expected[valid].mean())  # BCE over the annotated channels only
    with pytest.raises(TrainError, match="unknown loss"):
        seg_loss(logits, target, valid, "focal")


def test_width_loss_weighs_a_border_drawn_short_more_than_dice_does():
    target = torch.zeros(1, 1, 64, 64)
    target[0, 0, 10:54, 12:52] = 1  # a 40-column structure
    valid = torch.tensor([[True]])

    def logits(x0, x1):
        out = torch.full((1, 1, 64, 64), -6.0)
        out[0, 0, 10:54, x0:x1] = 6.0
        return out

    exact, short = logits(12, 52), logits(12, 48)  # the same mask, 4 columns short (10% of the width)
    dice = [seg_loss(x, target, valid, "dice").item() for x in (exact, short)]
    width = [width_loss(x, target, valid).item() for x in (exact, short)]
    assert width[0] < 0.01 and dice[0] < 0.01
    # the short border costs the width term several times what it costs Dice: four wrong
    # columns of 64 against 176 wrong pixels of 1,760...
    assert width[1] > 3 * (dice[1] - dice[0])
    # ...and its weight adds to seg_loss, where it counts only for annotated channels
    assert seg_loss(short, target, valid, "dice", width=2.0).item() == pytest.approx(dice[1] + 2 * width[1])
    assert width_loss(short, target, torch.tensor([[False]])).item() == 0
    # a stray blob beside the structure: one row of it costs a column each, not a pixel
    stray = exact.clone()
    stray[0, 0, 30, 55:60] = 6.0
    assert width_loss(stray, target, valid).item() > 0.3


def test_training_is_deterministic_registered_and_resumable(annotated_engine, tmp_path):
    cfg = TrainConfig.from_preset("tiny", epochs=3, threads=2)
    cache = str(tmp_path / "cache")
    a = train(annotated_engine, cfg, tmp_path / "a", cache, progress=False)
    b = train(annotated_engine, cfg, tmp_path / "b", cache, progress=False)
    assert a.dice == b.dice and a.history[-1]["loss"] == b.history[-1]["loss"]
    assert all(0 < v < 1 for v in a.dice.values())
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 1000
    # interrupted after one epoch, then resumed: the same model as the uninterrupted run
    train(annotated_engine, cfg, tmp_path / "c", cache, progress=False, until_epoch=1)
    c = train(annotated_engine, cfg, tmp_path / "c", cache, progress=False)
    assert c.history == a.history
    # batches augmented in two worker processes: the same batches, so the same run
    d = train(annotated_engine, cfg, tmp_path / "d", cache, progress=False, workers=2)
    assert d.history == a.history
    # a resume point whose augmentation drew its randomness another way is refused
    last = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    del last["augmentation"]
    torch.save(last, tmp_path / "c" / "last.pt")
    with pytest.raises(TrainError, match="drew augmentation another way"):
        train(annotated_engine, cfg, tmp_path / "c", cache, progress=False)
    # a different configuration refuses to resume from that folder
    with pytest.raises(TrainError, match="another configuration"):
        train(annotated_engine, TrainConfig.from_preset("tiny", epochs=4), tmp_path / "c", cache,
              progress=False)


def test_one_loader_serves_every_epoch_and_its_workers_start_once(annotated_engine, tmp_path, monkeypatch):
    """Loader workers started afresh each epoch kept a GPU waiting for each epoch's first
    batches: one DataLoader runs over the whole run, and resuming starts one for the rest."""
    import pipeline.train.loop as L
    made = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(len(args[0]))
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(L.torch.utils.data, "DataLoader", Counted)
    cfg = TrainConfig.from_preset("tiny", epochs=3, threads=1)
    train(annotated_engine, cfg, tmp_path / "a", str(tmp_path / "cache"), progress=False, workers=1, until_epoch=1)
    train(annotated_engine, cfg, tmp_path / "a", str(tmp_path / "cache"), progress=False, workers=1)
    assert len(made) == 2 and made[1] == 2 * made[0] > 0  # epoch 1's batches, then epochs 2-3's


def test_weight_average_follows_the_weights_with_warm_up():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg.update(model)  # warm-up decay min(0.9, 2/11): the average moves most of the way
    assert torch.allclose(avg.module.weight, torch.full((1, 2), 9 / 11))
    for _ in range(200):
        avg.update(model)
    assert torch.allclose(avg.module.weight, model.weight, atol=1e-6)
    assert not any(p.requires_grad for p in avg.module.parameters())
    with pytest.raises(TrainError, match="between 0 and 1"):
        WeightAverage(model, 1.5)


def test_weight_averaged_training_saves_the_average_and_resumes(annotated_engine, tmp_path):
    # no held-out images: the final epoch's model is saved, here the average
    cfg = TrainConfig.from_preset("tiny", epochs=2, ema=0.9, threads=2, val_frac=0)
    cache = str(tmp_path / "cache")
    train(annotated_engine, cfg, tmp_path / "a", cache, progress=False)
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)  # resume points are data too
    assert last["ema"]["steps"] > 0
    assert any(not torch.equal(v, last["model"][k]) for k, v in last["ema"]["model"].items())
    best_a = load_model(tmp_path / "a" / "best.pt")[0].state_dict()
    for k, v in best_a.items():
        assert torch.allclose(v, last["ema"]["model"][k])
    # interrupted and resumed: the average carries on where it stopped
    train(annotated_engine, cfg, tmp_path / "b", cache, progress=False, until_epoch=1)
    train(annotated_engine, cfg, tmp_path / "b", cache, progress=False)
    best_b = load_model(tmp_path / "b" / "best.pt")[0].state_dict()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_a_fold_with_held_out_images_also_keeps_its_last_epoch(annotated_engine, tmp_path):
    # best.pt is the epoch the held-out images liked best; final.pt is the last epoch, the
    # model a run on every image ships, which a quality score fitted on folds must read
    cfg = TrainConfig.from_preset("tiny", epochs=2, ema=0.9, threads=2, val_frac=0.2)
    cache = str(tmp_path / "cache")
    train(annotated_engine, cfg, tmp_path / "a", cache, progress=False, until_epoch=1)
    assert (tmp_path / "a" / "best.pt").exists() and not (tmp_path / "a" / "final.pt").exists()
    train(annotated_engine, cfg, tmp_path / "a", cache, progress=False)  # resumed to the end
    final = read_checkpoint(tmp_path / "a" / "final.pt")
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert final.info["epoch"] == 2 and final.training["epochs"] == 2
    assert all(torch.allclose(v, last["ema"]["model"][k]) for k, v in final.state_dict.items())
    train(annotated_engine, TrainConfig.from_preset("tiny", epochs=1, threads=2, val_frac=0), tmp_path / "b",
          cache, progress=False)
    assert not (tmp_path / "b" / "final.pt").exists()  # there best.pt is the last epoch already


def test_checkpoint_round_trip_and_registry(annotated_engine, tiny_model):
    from pipeline.model import register_model
    ck = read_checkpoint(tiny_model)
    assert ck.format == "cxrlabel-2" and ck.spec.size == 64 and ck.spec.norm == "zscore"
    assert ck.training["preset"] == "tiny" and set(ck.info["dice"]) == {"heart", "left_lung", "right_lung",
                                                                         "cardiomediastinum"}
    assert ck.spec.heart_definition == "heart" and ck.spec.labelled == ("heart", "left_lung", "right_lung")
    assert "lr" not in ck.spec.as_dict()  # inference needs no training settings
    register_model(annotated_engine, "t", tiny_model, ck.training["preset"], ck.training, ck.info["dice"],
                   ck.info["data_hash"])
    with annotated_engine.connect() as c:
        row = c.execute(select(D.models)).mappings().one()
    assert row["preset"] == "tiny" and json.loads(row["config"])["size"] == 64
    assert len(row["sha256"]) == 64 and row["dice_heart"] == pytest.approx(ck.info["dice"]["heart"])
    assert np.isfinite(row["dice_left_lung"])


def test_a_training_config_read_back_from_storage_is_the_one_written():
    """A checkpoint's ``training`` settings come back as JSON keeps them (lists, not tuples;
    older files lack newer settings, newer ones may carry settings this version lacks)."""
    cfg = TrainConfig.from_preset("tiny", widen=0.5, widen_ctr=(0.4, 0.66), masks=("manual", "reviewed"))
    stored = json.loads(json.dumps(cfg.as_dict()))
    assert isinstance(stored["structures"], list)
    assert TrainConfig.from_dict(stored) == cfg
    older = {k: v for k, v in stored.items() if k not in ("widen_ctr", "masks", "width_loss")}
    back = TrainConfig.from_dict({**older, "a_setting_from_a_later_version": 1})
    assert back.masks == ("manual",) and back.widen_ctr is None and back.structures == cfg.structures


def _old_format(ck, path):
    """A checkpoint as the code before the model module wrote it (format cxrlabel-1)."""
    config = {k: v for k, v in ck.training.items() if k != "norm"}  # before norm was a setting
    torch.save({"format": "cxrlabel-1", "config": config, "state_dict": ck.state_dict, "info": ck.info}, path)


def test_previous_format_loads_and_upgrades_bit_for_bit(tiny_model, tmp_path):
    from pipeline.model import FORMAT, upgrade_checkpoint
    ck = read_checkpoint(tiny_model)
    _old_format(ck, tmp_path / "old.pt")
    old = read_checkpoint(tmp_path / "old.pt")
    # norm defaults to zscore, and the heart to the cardiomediastinum: every cxrlabel-1 file
    # learned GeneralBlockchain's (its spec carries no definition)
    older = dataclasses.replace(ck.spec, heart_definition="cardiomediastinum")
    assert old.format == "cxrlabel-1" and old.spec == older
    was, sha = upgrade_checkpoint(tmp_path / "old.pt")
    new = read_checkpoint(tmp_path / "old.pt")
    assert (was, new.format, new.spec) == ("cxrlabel-1", FORMAT, older) and len(sha) == 64
    assert all(torch.equal(new.state_dict[k], v) for k, v in ck.state_dict.items())


def test_shipped_model_is_current_and_matches_its_card():
    from pipeline.model import FORMAT, default_model_path, file_sha256
    path = default_model_path()
    ck = read_checkpoint(path)
    assert ck.format == FORMAT and ck.spec.norm == "clahe" and ck.spec.size == 256
    card = (path.parent / "MODEL_CARD.md").read_text()
    assert file_sha256(path) in card and ck.info["data_hash"] in card
    # the heart alone, learned from both annotated sources; the card names each and its licence
    assert ck.spec.heart_definition == "heart" and ck.spec.labelled == ("heart", "left_lung", "right_lung")
    assert ck.info["images"] == {"manual": 231} and len(ck.info["trained_uids"]) == 231
    assert all(words in card for words in ("GeneralBlockchain", "Wingspan", "CC BY-NC-SA", "MIT", "non-commercial"))
    from pipeline.quality import QualityModel, sidecar
    for tta in (False, True):  # its score was fitted for it: on folds of its own recipe
        score = QualityModel.load(sidecar(path, tta))
        assert score.info["fold_models"]["training"]["shifts"] is True and score.info["fold_models"]["epochs"] == 160
        assert "cxr_deep_2src_cv" in score.info["fitted_on"] and score.appearance is not None
        assert score.atlas.structures == ("heart", "left_lung", "right_lung")
        # and it orders the review worklist by trust: the hearts' borders weigh in
        assert "heart_border" in score.features and score.trust is not None and score.trust.weight > 0


def test_a_checkpoint_that_carries_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": "cxrlabel-2", "spec": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="not a readable cxrlabel checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ModelError, match="not a cxrlabel checkpoint"):
        read_checkpoint(bad)


def test_export_halves_the_checkpoint(tiny_model, tmp_path):
    import shutil

    from pipeline.model import export_checkpoint
    from pipeline.quality import sidecar
    src = tmp_path / "src" / "best.pt"
    src.parent.mkdir()
    shutil.copy(tiny_model, src)
    sidecar(src).write_text('{"format": "its fitted quality score"}')
    export_checkpoint(src, tmp_path / "m.pt")
    assert sidecar(tmp_path / "m.pt").read_text() == sidecar(src).read_text()  # the score goes along
    model, _ = load_model(tmp_path / "m.pt")
    ref, _ = load_model(tiny_model)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=0.05)
    assert (tmp_path / "m.pt").stat().st_size < tiny_model.stat().st_size


def test_cross_validation_stores_its_folds_and_registers_each(annotated_engine, tmp_path):
    import dataclasses
    cfg = TrainConfig.from_preset("tiny", epochs=1, folds=2, threads=2)
    # one fold on its own first (a cross-validation spread over sessions): no summary yet
    first = cross_validate(annotated_engine, cfg, tmp_path / "cv", str(tmp_path / "cache"), progress=False,
                           only=[1])
    assert len(first.results) == 1 and not (tmp_path / "cv" / "summary.json").exists()
    cv = cross_validate(annotated_engine, cfg, tmp_path / "cv", str(tmp_path / "cache"), progress=False,
                        register_as="t")
    assert cv.results[1].history == first.results[0].history  # resumed at its end, not trained again
    splits = json.loads((tmp_path / "cv" / "splits.json").read_text())
    assert splits["grouped_by"] == "patient"
    assert cv.names == ["t_fold0", "t_fold1"] and [r.held_out for r in cv.results] == splits["val"]
    assert not set(splits["val"][0]) & set(splits["val"][1]) and len(sum(splits["val"], [])) == 231
    assert set(cv.summary) == {"heart", "left_lung", "right_lung", "cardiomediastinum"}
    with annotated_engine.connect() as c:
        assert sorted(c.execute(select(D.models.c.name)).scalars()) == ["t_fold0", "t_fold1"]
    assert (tmp_path / "cv" / "fold1" / "best.pt").exists() and (tmp_path / "cv" / "summary.json").exists()
    # one fold's run resumes on the stored split (nothing left to train: same result)
    again = train(annotated_engine, dataclasses.replace(cfg, fold=1), tmp_path / "cv" / "fold1",
                  str(tmp_path / "cache"), progress=False, held_out=splits["val"][1])
    assert again.history == cv.results[1].history


def test_validation_hands_the_model_its_own_device(monkeypatch):
    """On CUDA, validation once passed CPU tensors to the GPU model: here the model lives on
    torch's `meta` device, and every tensor that reaches it must be there too."""
    import pipeline.train.loop as L
    from pipeline.train.data import Dataset
    seen = []

    def fake_predict(model, x, roi=None):
        seen.append((x.device.type, next(model.parameters()).device.type))
        return torch.zeros(x.shape[0], len(cfg.structures), *x.shape[-2:])

    monkeypatch.setattr(L, "predict", fake_predict)
    cfg = TrainConfig.from_preset("tiny")
    model = build_network(cfg.spec()).to("meta")
    n, s = 3, cfg.size
    ds = Dataset([f"u{i}" for i in range(n)], np.random.default_rng(0).integers(0, 255, (n, s, s), dtype=np.uint8),
                 np.zeros((n, len(cfg.structures), s, s), np.float32), np.ones((n, len(cfg.structures)), bool))
    L.validate(model, ds, [0, 1, 2], cfg, torch.device("meta"))
    assert seen and all(pair == ("meta", "meta") for pair in seen)


def test_parallel_folds_on_one_gpu_warn(annotated_engine, tmp_path, monkeypatch, caplog):
    """Folds in parallel processes take turns on one GPU (measured 30-40x slower an epoch on an
    H200): asked for on CUDA, cross-validation says so before it starts; on a CPU it does not."""
    import pipeline.train.cv as CV

    class Started(Exception):
        pass

    def no_pool(*args, **kwargs):
        raise Started
    monkeypatch.setattr(CV, "process_pool", no_pool)
    cfg = TrainConfig.from_preset("tiny", epochs=1, folds=2)
    for device, warned in (("cpu", False), ("cuda", True)):
        monkeypatch.setattr(CV, "pick_device", lambda d, dev=device: torch.device(dev))
        caplog.clear()
        with pytest.raises(Started), caplog.at_level("WARNING", logger="pipeline.train.cv"):
            cross_validate(annotated_engine, cfg, tmp_path / device, str(tmp_path / "cache"), device,
                           progress=False, parallel=2)
        assert ("--parallel-folds 2 on one GPU" in caplog.text) is warned


def test_folds_trained_in_parallel_processes_equal_folds_trained_in_turn(annotated_engine, tmp_path):
    cfg = TrainConfig.from_preset("tiny", epochs=1, folds=2, threads=1)
    cache = str(tmp_path / "cache")
    one_by_one = cross_validate(annotated_engine, cfg, tmp_path / "a", cache, "cpu", progress=False)
    at_once = cross_validate(annotated_engine, cfg, tmp_path / "b", cache, "cpu", progress=False, parallel=2)
    assert [r.history for r in at_once.results] == [r.history for r in one_by_one.results]
    assert [r.held_out for r in at_once.results] == [r.held_out for r in one_by_one.results]


def test_equipment_shifts_are_trained_on_as_labelling_shows_them(annotated_128):
    from pipeline.imaging import collimation_rim, to_uint8
    from pipeline.train.data import EQUIPMENT_SHIFTS, _equipment_shift, augmentation
    plain, shifted = (augmentation(TrainConfig.from_preset("tiny", shifts=s)) for s in (False, True))
    assert len(shifted.transforms) == len(plain.transforms) + len(EQUIPMENT_SHIFTS)
    rim, crop = _equipment_shift("collimation", 1.0), _equipment_shift("crop", 1.0)
    for seed, (img, m) in enumerate(zip(*annotated_128, strict=True)):
        film = {"image": img[None].astype(np.float32) / 255.0, "mask": m}
        rim.set_random_state(seed=seed)
        out = rim(dict(film))
        # the rim is filled as labelling fills it; the masks stay those of the whole film
        assert not any(collimation_rim(to_uint8(np.asarray(out["image"])[0])))
        assert np.array_equal(out["mask"], m)
        # a crop zooms the film in, and its masks with it: the heart drawn as an image
        # comes out where the heart's mask does, larger than before
        heart = {"image": m[:1], "mask": m}
        crop.set_random_state(seed=seed)
        out = crop(dict(heart))
        crop.set_random_state(seed=seed)
        again = crop(dict(heart))
        assert np.array_equal(out["image"], again["image"]) and np.array_equal(out["mask"], again["mask"])
        drawn, moved = np.asarray(out["image"])[0] > 0.5, out["mask"][0] > 0.5
        assert (drawn ^ moved).sum() <= 0.02 * moved.sum()
        assert moved.sum() > 1.2 * (m[0] > 0.5).sum()

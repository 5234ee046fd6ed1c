import json

import numpy as np
import pytest
import torch
from sqlalchemy import select

from pipeline import db as D
from pipeline.networks import NETWORKS, create_network
from pipeline.train import (
    TrainConfig,
    TrainError,
    WeightAverage,
    build_model,
    load_checkpoint,
    presets,
    seg_loss,
    split,
    train,
)

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


def test_unknown_network_suggests_names():
    with pytest.raises(ValueError, match="Did you mean 'unet'"):
        create_network("unett")
    with pytest.raises(TrainError, match="unknown preset"):
        TrainConfig.from_preset("unet9")


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
    net = build_model(cfg)
    assert net(torch.randn(1, 1, 50, 70)).shape == (1, 3, 50, 70)


def test_unknown_norm_is_refused_with_the_choices():
    with pytest.raises(TrainError, match="unknown norm 'minmax': use one of zscore, clahe"):
        TrainConfig.from_preset("tiny", norm="minmax")


def test_folds_partition_the_data():
    cfg = TrainConfig.from_preset("tiny", folds=5)
    vals = [split(100, TrainConfig(**{**cfg.as_dict(), "fold": k}))[1] for k in range(5)]
    assert sorted(sum(vals, [])) == list(range(100)) and all(len(v) == 20 for v in vals)


def test_loss_ignores_unannotated_channels():
    logits = torch.zeros(1, 3, 8, 8)
    target = torch.ones(1, 3, 8, 8)
    all_valid = seg_loss(logits, target, torch.tensor([[True, True, True]]))
    target[0, 2] = 0  # an unannotated structure: its (wrong) target must not count
    partial = seg_loss(logits, target, torch.tensor([[True, True, False]]))
    assert torch.isclose(all_valid, partial)


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
    # a different configuration refuses to resume from that folder
    with pytest.raises(TrainError, match="another configuration"):
        train(annotated_engine, TrainConfig.from_preset("tiny", epochs=4), tmp_path / "c", cache,
              progress=False)


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
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert last["ema"]["steps"] > 0
    assert any(not torch.equal(v, last["model"][k]) for k, v in last["ema"]["model"].items())
    best_a = load_checkpoint(tmp_path / "a" / "best.pt")[0].state_dict()
    for k, v in best_a.items():
        assert torch.allclose(v, last["ema"]["model"][k])
    # interrupted and resumed: the average carries on where it stopped
    train(annotated_engine, cfg, tmp_path / "b", cache, progress=False, until_epoch=1)
    train(annotated_engine, cfg, tmp_path / "b", cache, progress=False)
    best_b = load_checkpoint(tmp_path / "b" / "best.pt")[0].state_dict()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_checkpoint_round_trip_and_registry(annotated_engine, tiny_model):
    from pipeline.train import register_model
    model, cfg, info = load_checkpoint(tiny_model)
    assert cfg.preset == "tiny" and set(info["dice"]) == {"heart", "left_lung", "right_lung"}
    register_model(annotated_engine, "t", tiny_model, cfg, info["dice"], info["data_hash"])
    with annotated_engine.connect() as c:
        row = c.execute(select(D.models)).mappings().one()
    assert row["preset"] == "tiny" and json.loads(row["config"])["size"] == 64
    assert len(row["sha256"]) == 64 and row["dice_heart"] == pytest.approx(info["dice"]["heart"])
    assert np.isfinite(row["dice_left_lung"])


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(TrainError, match="not a cxrlabel checkpoint"):
        load_checkpoint(bad)


def test_export_halves_the_checkpoint(tiny_model, tmp_path):
    from pipeline.train import export_checkpoint
    export_checkpoint(tiny_model, tmp_path / "m.pt")
    model, cfg, _ = load_checkpoint(tmp_path / "m.pt")
    ref, _, _ = load_checkpoint(tiny_model)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=0.05)
    assert (tmp_path / "m.pt").stat().st_size < tiny_model.stat().st_size

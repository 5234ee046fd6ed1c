import json
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from pipeline import db as D
from pipeline.cli import cli
from pipeline.groups import Selection, select_images
from pipeline.imaging import Geometry, preprocess
from pipeline.label import REFRAME_CONTACTS, Item, LabelOptions, edge_contacts, forward, label, reframe
from pipeline.measure import bbox, clean, mean_column, measure
from pipeline.model import ModelError, resolve_model
from pipeline.quality import heuristic, plausibility
from tests.conftest import DATA, DICOM, GB, REPO


def _items(engine, n=None) -> Selection:
    with engine.connect() as c:
        return select_images(c, all_images=True, limit=n)


def test_clean_keeps_largest_component_and_fills_holes():
    m = np.zeros((40, 40), bool)
    m[5:30, 5:30] = True
    m[10:15, 10:15] = False  # a hole
    m[35:38, 35:38] = True  # a speck
    out, kept = clean(m)
    assert out[12, 12] and not out[36, 36] and kept == pytest.approx(1 - 9 / m.sum())


def test_measure_ctr_and_mm():
    h = np.zeros((100, 200), bool)
    h[40:80, 80:140] = True  # heart 60 px wide
    right = np.zeros_like(h)
    right[10:90, 20:90] = True
    left = np.zeros_like(h)
    left[10:90, 110:180] = True  # thorax 20..179: 160 px
    m = measure({"heart": h, "left_lung": left, "right_lung": right}, (0.5, 0.5))
    assert (m["heart_width_px"], m["thoracic_width_px"]) == (60, 160)
    assert m["ctr"] == pytest.approx(60 / 160) and m["heart_area_mm2"] == pytest.approx(2400 * 0.25)
    assert m["heart_width_mm"] == 30 and bbox(h) == (80, 40, 139, 79)
    assert measure({"heart": h}, (None, None))["ctr"] is None


@pytest.mark.parametrize(("h", "w", "mode"), [(1955, 1841, "pad"), (700, 1300, "pad"), (901, 655, "stretch")])
def test_postprocess_runs_equal_the_full_size_path(h, w, mode):
    """Masks mapped back as runs, and measured from them, are the masks and numbers of mapping
    the full arrays back with OpenCV, to OpenCV's 1/32-pixel sampling grid (a pixel whose
    value lies within a hair of 0.5 may fall either way)."""
    from pipeline.imaging import Geometry
    from pipeline.label import Item, postprocess
    from pipeline.masks import decode

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    probs = np.stack([1 / (1 + np.exp(((xx - cx) ** 2 + (yy - 34) ** 2) / 40 - r))
                      for cx, r in ((32, 6), (48, 7), (16, 7))]).astype(np.float32)
    probs[1, 2:4, 2:4] = 0.9  # a speck that clean() drops
    probs[2, 33:36, 15:18] = 0.1  # a hole that clean() fills
    probs += rng.uniform(0, 0.05, probs.shape).astype(np.float32)
    geom = Geometry.fit(h, w, 64, mode)
    structures = ("heart", "left_lung", "right_lung")
    r = postprocess(Item("u", np.zeros((64, 64), np.uint8), geom, (0.2, 0.2)), probs, structures)
    full = {}
    for i, s in enumerate(structures):
        cleaned, _ = clean(probs[i] > 0.5)
        near = cv2.dilate(cleaned.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        soft = np.where(near, probs[i], 0.0).astype(np.float32)
        soft[cleaned & (soft <= 0.5)] = 0.75
        full[s] = geom.to_original(soft) > 0.5
        got = decode(r.masks[s].data, "rle", (h, w))
        assert r.masks[s].encoding == "rle" and r.masks[s].area == int(got.sum())
        assert np.count_nonzero(got != full[s]) <= 2, s
    hole = geom.matrix(inverse=True) @ [16, 34, 1]  # the filled hole's centre in the original
    assert r.masks["right_lung"].decode()[int(round(hole[1])), int(round(hole[0]))]
    assert cv2.connectedComponents(r.masks["left_lung"].decode().astype(np.uint8))[0] == 2  # no speck
    assert r.measurements == {**r.measurements, **measure({s: r.masks[s].decode() for s in structures}, (0.2, 0.2))}
    assert abs(r.measurements["ctr"] - measure(full, (0.2, 0.2))["ctr"]) < 1e-3


@settings(max_examples=60, deadline=None)
@given(h=st.integers(20, 1200), w=st.integers(20, 1200), mode=st.sampled_from(["pad", "stretch"]),
       cx=st.floats(-8, 72), cy=st.floats(-8, 72), r=st.floats(-2, 9), seed=st.integers(0, 99))
def test_runs_above_match_opencvs_bilinear_map(h, w, mode, cx, cy, r, seed):
    """Runs solved from the cache array are OpenCV's warpAffine (bilinear, edge replicated)
    thresholded, blobs over the cache's edges included, to OpenCV's 1/32-pixel grid."""
    from pipeline.imaging import Geometry

    geom = Geometry.fit(h, w, 64, mode)
    yy, xx = np.mgrid[:64, :64]
    arr = (1 / (1 + np.exp(((xx - cx) ** 2 + (yy - cy) ** 2) / 30 - r))).astype(np.float32)
    arr += np.random.default_rng(seed).uniform(0, 0.2, arr.shape).astype(np.float32)
    (rows, first, last), empty, everything = geom.runs_above(
        np.stack([arr, np.zeros_like(arr), np.full_like(arr, 0.9)]))
    got = np.zeros((h, w), bool)
    for y, a, b in zip(rows, first, last, strict=True):
        got[y, a:b + 1] = True
    assert np.count_nonzero(got != (geom.to_original(arr) > 0.5)) <= 3
    assert all(len(v) == 0 for v in empty)
    assert np.array_equal(everything[0], np.arange(h)) and (everything[1] == 0).all()
    assert (everything[2] == w - 1).all()
    # alone, the blob's runs are solved in the box around it: the same runs
    alone = geom.runs_above(arr[None])[0]
    assert all(np.array_equal(a, b) for a, b in zip(alone, (rows, first, last), strict=True))
    # ... and read only inside its box (what post-processing gives): the same runs again
    box = bbox(arr > 0.5)
    if box is not None:
        boxed = geom.runs_above(arr[None], boxes=np.array([[box[1], box[3] + 1, box[0], box[2] + 1]]))[0]
        assert all(np.array_equal(a, b) for a, b in zip(boxed, (rows, first, last), strict=True))


def _cleaned_by_arrays(probs, structures):
    """What ``_cleaned`` computes, written as the NumPy and OpenCV array code it replaced (the
    definition its compiled pass must match to the last bit)."""
    import math

    quantised = probs.dtype == np.uint8
    cut, unit = (127, np.float32(1 / 255)) if quantised else (0.5, np.float32(1))
    ring = np.ones((3, 3), np.uint8)
    soft, masks, out = np.zeros(probs.shape, np.float32), {}, {}
    sums = probs.reshape(len(probs), -1).sum(axis=1, dtype=np.uint32 if quantised else np.float64) * float(unit)
    for i, s in enumerate(structures):
        masks[s] = np.zeros(probs.shape[1:], bool)
        box = bbox(probs[i] > cut)
        if box is None:
            continue
        window = (slice(max(0, box[1] - 2), box[3] + 3), slice(max(0, box[0] - 2), box[2] + 3))
        p = probs[i][window].astype(np.float32) * unit
        cleaned, kept = clean(p > 0.5)
        part = np.where(cv2.dilate(cleaned.astype(np.uint8), ring) > 0, p, np.float32(0))
        part[cleaned & (part <= 0.5)] = 0.75
        soft[i][window], masks[s][window] = part, cleaned
        agreement = min(1.0, 2 * float((part * cleaned).sum()) / (float(sums[i]) + int(np.count_nonzero(cleaned))))
        m = cleaned.astype(np.uint8)
        outline = cv2.morphologyEx(m, cv2.MORPH_GRADIENT, ring) > 0
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        area = int(np.count_nonzero(cleaned))
        out[s] = (kept, agreement, mean_column(cleaned) + window[1].start, {
            "agreement": math.log(1.01 - agreement),
            "uncertain": math.log(1e-3 + np.count_nonzero((p > 0.1) & (p < 0.9)) / area),
            "edge_margin": float(np.mean(np.abs(2 * p[outline] - 1))), "kept": math.log(max(kept, 1e-3)),
            "solidity": min(1.0, area / max(cv2.contourArea(cv2.convexHull(np.concatenate(contours))), 1.0)),
            "area": math.log(area / probs.shape[-1] ** 2)})
    return soft, masks, out


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10 ** 6), quantised=st.booleans(), blobs=st.integers(0, 5), noise=st.floats(0, 0.3))
def test_the_compiled_clean_up_reads_what_the_array_code_read(seed, quantised, blobs, noise):
    """Post-processing's compiled pass (``_cleaned``: the largest component, its holes filled,
    the probabilities kept near it, the score's features) gives, bit for bit, what the NumPy
    and OpenCV array code it replaced gave: blobs of every size, touching the edges, in
    pieces (ties of equal pieces included), with holes and specks."""
    from pipeline.label.batch import _cleaned

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    probs = np.zeros((3, 64, 64), np.float32)
    for c in range(3):
        for _ in range(blobs):
            cy, cx, r = rng.uniform(-5, 69), rng.uniform(-5, 69), rng.uniform(0.5, 20)
            probs[c] = np.maximum(probs[c], np.clip(1.2 - np.hypot(yy - cy, xx - cx) / r, 0, 1))
        probs[c] *= rng.uniform(1 - noise, 1, (64, 64)).astype(np.float32)
        probs[c][rng.random((64, 64)) < noise / 3] = rng.random()  # specks, and holes
    if rng.random() < 0.2:
        probs[0, 10:14, 10:14] = probs[0, 10:14, 30:34] = 0.9  # two equal pieces
    if quantised:
        probs = np.round(probs * 255).astype(np.uint8)
    structures = ("heart", "left_lung", "right_lung")
    got = _cleaned(probs, structures)
    soft, masks, want = _cleaned_by_arrays(probs, structures)
    assert np.array_equal(got.soft, soft) and all(np.array_equal(got.masks[s], masks[s]) for s in structures)
    for s in structures:
        if s in want:
            assert (got.kept[s], got.agreement[s], got.columns[s], got.features[s]) == want[s]
            assert got.boxes[s] == bbox(masks[s])
        else:
            assert got.boxes[s] is None and got.columns[s] is None


def test_the_windows_are_found_where_numpy_finds_values_above_the_level():
    """The rows and columns holding a value above the level, as NumPy's ``any`` finds them:
    uint8 and float, a NaN (never above a level) anywhere in a row included."""
    from pipeline.compiled import extents

    rng = np.random.default_rng(5)
    for _ in range(200):
        p = rng.random((3, 20, 20)).astype(np.float32)
        p[rng.random(p.shape) < 0.1] = np.nan
        q = (rng.random((3, 20, 20)) * 255).astype(np.uint8)
        for arr, cut in ((p, 0.5), (q, 127)):
            rows, cols = extents(arr)
            assert np.array_equal(rows > cut, (arr > cut).any(axis=2))
            assert np.array_equal(cols > cut, (arr > cut).any(axis=1))


def test_the_compiled_sum_is_numpys_float32_sum():
    """NumPy sums float32 pairwise; the compiled pass sums as it does, to the last bit."""
    from pipeline.compiled import _pairwise_sum

    rng = np.random.default_rng(3)
    for n in [0, 1, 7, 8, 9, 127, 128, 129, 255, 256, 1000, 4097, 65536, 70001]:
        a = (rng.random(n) * rng.choice([1e-3, 1, 300])).astype(np.float32)
        assert _pairwise_sum(a, n) == a.sum()


def mean_columns(masks):
    return {s: mean_column(m) for s, m in masks.items()}


def test_quality_flags_implausible_masks():
    h = np.zeros((64, 64), bool)
    h[30:50, 25:40] = True
    right = np.zeros_like(h)
    right[5:60, 5:28] = True
    left = np.zeros_like(h)
    left[5:60, 36:60] = True
    masks = {"heart": h, "left_lung": left, "right_lung": right}
    ones = {s: 1.0 for s in masks}
    good = heuristic(ones, ones, mean_columns(masks), 0.4)
    flipped = dict(masks, left_lung=right, right_lung=left)
    assert good == pytest.approx(1.0)
    assert plausibility(mean_columns(flipped), 0.4) < 0.5
    assert plausibility(mean_columns(dict(masks, heart=np.zeros_like(h))), None) < 0.2
    assert heuristic({s: 0.6 for s in masks}, ones, mean_columns(masks), 0.4) < good


def test_label_writes_masks_measurements_and_resumes(annotated_engine, tiny_model, tmp_path):
    items = _items(annotated_engine, 10)
    s = label(annotated_engine, items, LabelOptions(model=str(tiny_model), device="cpu", batch_size=4,
                                                    cache_dir=str(tmp_path / "c"), workers=1, progress=False))
    assert (s.selected, s.labelled, s.skipped, s.failed) == (10, 10, 0, 0)
    with annotated_engine.connect() as c:
        n_masks = c.execute(text("SELECT COUNT(*) FROM masks WHERE kind='predicted'")).scalar()
        res = c.execute(text("SELECT * FROM label_results ORDER BY uid")).mappings().all()
        run = c.execute(select(D.label_runs)).mappings().one()
        img = c.execute(select(D.images).where(D.images.c.uid == items.items[0].uid)).mappings().one()
        from pipeline.masks import load_masks
        pred = load_masks(c, [items.items[0].uid], "predicted", s.model)
    assert n_masks == 30 and len(res) == 10 and run["status"] == "done" and run["n_labelled"] == 10
    assert run["selection"] == "all limit=10"  # the selection describes itself
    assert all(0 <= r["quality"] <= 1 for r in res)
    assert pred[items.items[0].uid]["heart"].shape == (img["height"], img["width"])  # original geometry
    again = label(annotated_engine, _items(annotated_engine, 12),
                  LabelOptions(model=str(tiny_model), device="cpu", batch_size=4, cache_dir=str(tmp_path / "c"),
                               workers=1, progress=False))
    assert (again.labelled, again.skipped) == (2, 10)
    with annotated_engine.connect() as c:
        assert c.execute(select(func.count()).select_from(D.measurements)).scalar() == 12


def test_any_executor_of_a_run_runs_the_same_batch_work(annotated_db, tiny_model, tmp_path):
    """The local loop and an executor that calls the run's BatchLabeller whole (as a Ray
    actor does) store the same masks and measurements."""
    import shutil

    from pipeline.label import LabelRun

    class WholeBatches:  # what pipeline.distributed.Ray's actors do, in this process
        def refuse(self, options):
            return None

        def model_device(self, options):
            return options.device

        def execute(self, run: LabelRun) -> None:
            with run.started("whole batches") as work:
                for i in range(0, len(run.todo), 3):
                    run.count(work(run.todo[i:i + 3]))

    stored = []
    for name, executor in (("local", None), ("whole", WholeBatches())):
        shutil.copy(annotated_db, tmp_path / f"{name}.db")
        engine = D.connect(f"sqlite:///{tmp_path / name}.db")
        options = LabelOptions(model=str(tiny_model), device="cpu", batch_size=4, cache_dir=str(tmp_path / "c"),
                               workers=1, progress=False)
        s = label(engine, _items(engine, 7), options, executor)
        assert (s.labelled, s.failed) == (7, 0)
        with engine.connect() as c:
            masks = c.execute(text("SELECT uid, structure, data FROM masks WHERE kind = 'predicted' "
                                   "ORDER BY uid, structure")).all()
            values = c.execute(text("SELECT uid, ctr, quality, input_check FROM measurements ORDER BY uid")).all()
            device = c.execute(text("SELECT device FROM label_runs")).scalar()
        stored.append((masks, values))
        engine.dispose()
    assert stored[0] == stored[1] and len(stored[0][0]) == 21
    assert device == "whole batches"


def test_an_option_an_executor_cannot_honour_is_refused(annotated_engine, tiny_model):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.distributed import Ray
    from pipeline.label import LabelError
    items = _items(annotated_engine, 2)
    with pytest.raises(LabelError, match="--workers sets the local loop's processes"):
        label(annotated_engine, items, LabelOptions(model=str(tiny_model), workers=2), Ray("local"))
    with pytest.raises(LabelError, match="--device cuda:1: on Ray each actor gets its GPU from Ray"):
        label(annotated_engine, items, LabelOptions(model=str(tiny_model), device="cuda:1"), Ray("local"))
    with annotated_engine.connect() as c:  # refused before anything was stored
        assert c.execute(text("SELECT COUNT(*) FROM label_runs")).scalar() == 0
    url = annotated_engine.url.render_as_string(hide_password=False)
    r = CliRunner().invoke(cli, ["--db", url, "label", "--all", "--actors", "2", "--model", str(tiny_model)])
    assert r.exit_code == 2 and "--actors is for --ray" in r.output
    r = CliRunner().invoke(cli, ["--db", url, "label", "--all", "--ray", "local", "--workers", "2",
                                 "--model", str(tiny_model)])
    assert r.exit_code != 0 and "--workers sets the local loop's processes" in r.output


def test_forward_feeds_the_model_its_own_input_normalisation(annotated_engine, tiny_model):
    import dataclasses

    import torch

    from pipeline.imaging import model_input
    from pipeline.model import predict
    lm = resolve_model(annotated_engine, str(tiny_model), "cpu")
    img, geom = preprocess(_items(annotated_engine, 1).items[0].path, lm.spec.size, lm.spec.mode)
    items = [Item("a", img, geom)]
    zscored = forward(lm, items)
    lm.spec = dataclasses.replace(lm.spec, norm="clahe")
    equalised = forward(lm, items)
    expect = predict(lm.module, torch.from_numpy(model_input(img, "clahe")[None])).numpy()
    expect = np.rint(expect * 255).astype(np.uint8)
    # (should this barely trained model's blobs reach the film's edges, the film is labelled
    # again from further out, through the same normalisation)
    expect = reframe(lm, [img], [geom.film_box()], expect)
    assert equalised.dtype == np.uint8  # quantised on the device: round(255 p)
    np.testing.assert_allclose(equalised.astype(int), expect.astype(int), atol=1)
    assert np.abs(equalised.astype(int) - zscored).max() > 0


def test_label_records_undecodable_images(annotated_engine, tiny_model, tmp_path):
    with annotated_engine.begin() as c:
        c.execute(D.images.insert().values(uid="broken", source="csv", path=str(tmp_path / "x.png"),
                                           loaded_at=D.utcnow()))
    chosen = _items(annotated_engine, 2)
    chosen.items.insert(0, chosen.items[0]._replace(uid="broken", path=str(tmp_path / "x.png")))
    s = label(annotated_engine, chosen, LabelOptions(model=str(tiny_model), device="cpu", batch_size=4,
                                                     cache_dir=str(tmp_path / "c"), workers=1, progress=False))
    assert (s.labelled, s.failed) == (2, 1)
    with annotated_engine.connect() as c:
        assert c.execute(text("SELECT stage, uid FROM failures")).one() == ("label", "broken")


def test_unknown_model_names_next_step(annotated_engine):
    with pytest.raises(ModelError, match="models list"):
        resolve_model(annotated_engine, "no-such-model")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, and so on."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                out += [child, *_descendants(child)]
    return out


def _exits_within(pid: int, seconds: float) -> bool:
    """Block until ``pid`` exits (a pidfd becomes readable), at most ``seconds``."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def test_kill_9_mid_run_then_rerun_labels_each_image_once(annotated_db, tiny_model, tmp_path):
    import shutil
    db = tmp_path / "catalogue.db"
    shutil.copy(annotated_db, db)
    url = f"sqlite:///{db}"
    env = {**os.environ, "CXRLABEL_DB": url, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", "-v", "label", "--all", "--model", str(tiny_model),
           "--batch-size", "2", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until two batches are committed, then kill -9
        if "batch 2 written" in line:
            workers = _descendants(proc.pid)  # its fork server and the decoder processes it started
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert workers, "the run had no decoder process to check"
    assert len(workers) >= 2, "the run's decoder processes were not found below it"
    for pid in workers:  # they notice the parent is gone and exit (not wait on their queue forever)
        assert _exits_within(pid, 30), f"worker {pid} outlived its killed parent"
    engine = D.connect(url)
    with engine.connect() as c:
        partial = c.execute(select(func.count()).select_from(D.measurements)).scalar()
        total = c.execute(select(func.count()).select_from(D.images)).scalar()
    assert 4 <= partial < total
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with engine.connect() as c:
        n_meas = c.execute(select(func.count()).select_from(D.measurements)).scalar()
        per_image = c.execute(text("SELECT uid, structure, COUNT(*) FROM masks WHERE kind='predicted' "
                                   "GROUP BY uid, structure HAVING COUNT(*) > 1")).all()
        n_masks = c.execute(text("SELECT COUNT(*) FROM masks WHERE kind='predicted'")).scalar()
        runs = c.execute(text("SELECT status FROM label_runs ORDER BY id")).scalars().all()
    assert n_meas == total and n_masks == 3 * total and per_image == []
    assert runs == ["interrupted", "done"]  # the next run found the killed one's process gone
    engine.dispose()


def test_evaluate_and_report(annotated_engine, tiny_model, tmp_path):
    from pipeline.evaluate import evaluate
    from pipeline.groups import sample
    from pipeline.report import TILE, report
    s = label(annotated_engine, _items(annotated_engine, 6),
              LabelOptions(model=str(tiny_model), device="cpu", batch_size=3, cache_dir=str(tmp_path / "c"),
                           workers=1, progress=False))
    ev = evaluate(annotated_engine, s.model)
    assert ev.images == 6 and 0 < ev.dice["heart"]["mean"] < 1
    assert ev.ctr_error["n"] >= 3 and ev.ctr_error["n"] + ev.ctr_error["left_out"] == 6  # a tiny model misses some
    with annotated_engine.connect() as c:  # the model's cardiomediastinum helped training only: not labelled
        stored = set(c.execute(text("SELECT DISTINCT structure FROM masks WHERE kind = 'predicted'")).scalars())
        shown = set(c.execute(text("SELECT DISTINCT heart_definition FROM label_results")).scalars())
    assert stored == {"heart", "left_lung", "right_lung"} and shown == {"heart"}
    # labelled by a checkpoint's path, its name ('run') finds no file: which films it trained on is unknown
    assert ev.trained is None and [n for n in ev.notes if "cardiomediastinum" in n] == []
    assert any("does not say which films it trained on" in n for n in ev.notes)
    assert {"uid", "heart", "ctr_true", "ctr_pred"} <= set(ev.per_image[0])
    with annotated_engine.begin() as c:
        c.execute(D.groups.insert(), [{"uid": u, "group_name": "cardiomegaly", "rule": "t",
                                       "assigned_at": D.utcnow()} for u, _ in _items(annotated_engine, 6).pairs()])
    sample(annotated_engine, "2024/q1", 3)  # a name that is no file name
    first = _items(annotated_engine, 1).items[0].uid
    with annotated_engine.begin() as c:  # the same film stored again under another uid
        c.execute(text("INSERT INTO images (uid, source, loaded_at) VALUES ('copy', 'csv', '2026-01-01')"))
        for table in ("cache", "measurements"):
            cols = [r[1] for r in c.execute(text(f"PRAGMA table_info({table})")) if r[1] != "uid"]
            c.execute(text(f"INSERT INTO {table} (uid, {', '.join(cols)}) SELECT 'copy', {', '.join(cols)} "
                           f"FROM {table} WHERE uid = :u"), {"u": first})
        c.execute(D.groups.insert(), [{"uid": "copy", "group_name": "cardiomegaly", "rule": "t",
                                       "assigned_at": D.utcnow()}])
    files = report(annotated_engine, tmp_path / "rep", s.model, group="cardiomegaly")
    assert files.images == 6 and files.contact_sheet.stat().st_size > 10_000  # the copy is shown once
    sheet = cv2.imread(str(files.contact_sheet))
    assert sheet.shape[0] == 40 + TILE and sheet[:40].std() > 5  # the legend above one row of tiles
    assert files.histogram.exists() and files.bland_altman.stat().st_size > 10_000
    files = report(annotated_engine, tmp_path / "rep", s.model, sample="2024/q1", tiles=2)
    assert files.images == 2 and files.contact_sheet.parent == tmp_path / "rep"


def test_a_new_checkpoint_under_the_same_name_labels_again_and_keeps_the_old_rows(annotated_engine, tiny_model,
                                                                                   tmp_path):
    """A new shipped default (or a model retrained under its name): the earlier checkpoint's
    rows move to NAME@SHA12, reviews with them, and the images are labelled again."""
    import shutil

    import torch

    from pipeline import review as R
    from pipeline.model import file_sha256, read_checkpoint, write_checkpoint
    path = tmp_path / "mine" / "model.pt"
    path.parent.mkdir()
    shutil.copy(tiny_model, path)
    first_sha = file_sha256(path)
    items = _items(annotated_engine, 3)
    label(annotated_engine, items, LabelOptions(model=str(path), device="cpu", batch_size=3,
                                                cache_dir=str(tmp_path / "c"), workers=1, progress=False))
    R.save(annotated_engine, items.items[0].uid, "mine", "dr. a", 0, "accepted")
    ck = read_checkpoint(path)
    key = next(iter(ck.state_dict))
    ck.state_dict[key] = ck.state_dict[key] + torch.ones_like(ck.state_dict[key]) * 1e-3  # another checkpoint
    write_checkpoint(path, ck)
    s = label(annotated_engine, items, LabelOptions(model=str(path), device="cpu", batch_size=3,
                                                    cache_dir=str(tmp_path / "c"), workers=1, progress=False))
    assert (s.labelled, s.skipped) == (3, 0)
    kept = f"mine@{first_sha[:12]}"
    with annotated_engine.connect() as c:
        per = dict(c.execute(text("SELECT model, COUNT(*) FROM measurements GROUP BY model")).all())
        reviewed = c.execute(text("SELECT model FROM reviews")).scalars().all()
        runs = dict(c.execute(text("SELECT model, COUNT(*) FROM label_runs GROUP BY model")).all())
    assert per == {"mine": 3, kept: 3} and reviewed == [kept] and runs == {"mine": 1, kept: 1}
    again = label(annotated_engine, items, LabelOptions(model=str(path), device="cpu", batch_size=3,
                                                        cache_dir=str(tmp_path / "c"), workers=1,
                                                        progress=False))
    assert (again.labelled, again.skipped) == (0, 3)  # the same checkpoint: nothing to do


def test_ctr_agreement_is_bias_mae_and_limits_overall_and_by_band():
    import math

    from pipeline.evaluate import agreement, agreement_by_band
    true = np.array([0.40, 0.42, 0.48, 0.52, 0.57, 0.62, 0.66, 0.70])
    pred = true + np.array([0.01, -0.01, 0.0, 0.02, -0.02, -0.05, -0.06, -0.04])
    a = agreement(true, pred)
    err = pred - true
    assert a["n"] == 8 and a["bias"] == pytest.approx(err.mean()) and a["mae"] == pytest.approx(np.abs(err).mean())
    assert a["loa"] == pytest.approx([err.mean() - 1.96 * err.std(ddof=1), err.mean() + 1.96 * err.std(ddof=1)])
    assert a["off_by_0.03"] == pytest.approx(3 / 8)
    bands = agreement_by_band(true, pred)
    assert bands[">= 0.60"]["n"] == 3 and bands[">= 0.60"]["bias"] == pytest.approx(-0.05)
    assert bands["< 0.45"]["bias"] == pytest.approx(0.0) and bands["0.45-0.50"]["n"] == 1
    assert math.isnan(agreement(np.array([]), np.array([]))["bias"])


def test_labelling_never_imports_training_code():
    code = ("import sys, pipeline.label, pipeline.evaluate, pipeline.report, pipeline.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.train')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_inverted_film_is_labelled_the_right_way_round(tmp_path):
    """A MONOCHROME1 film whose pixels are already inverted (pydicom-data's relabelled test
    file) decodes reversed; labelling turns it back, so its masks match the upright film's."""
    from pipeline.imaging import polarity, preprocess, upright
    from pipeline.model import infer, resolve_model
    upright_img, _ = preprocess(DICOM / "cr_chest_pa_jpeg_baseline.dcm", 256)
    reversed_img, _ = preprocess(DICOM / "cr_chest_pa_jpeg_baseline_monochrome1.dcm", 256)
    assert polarity(upright_img) > 0.27 and polarity(reversed_img) < -0.25
    fixed, inverted = upright(reversed_img)
    assert inverted and np.array_equal(fixed, upright_img) and upright(upright_img) == (upright_img, False)
    lm = resolve_model(None, "default", "cpu")
    a, b = infer(lm, [upright_img, reversed_img])
    assert np.array_equal(a, b)


def test_a_noisy_film_is_smoothed_before_the_model():
    """Low-dose noise beyond what training added is smoothed away before the model; a clean
    film is never touched. With noise of sigma 0.1 of the range on real films, the shipped
    model's masks stay closer to its masks of the clean films than on the raw noisy input."""
    from pipeline.imaging import denoised, model_input, noise_sigma, preprocess
    from pipeline.metrics import dice
    from pipeline.model import infer, resolve_model
    lm = resolve_model(None, "default", "cpu")
    rng = np.random.default_rng(0)
    files = sorted((GB / "images").iterdir())[:12] + [DICOM / "cr_chest_pa_jpeg_baseline.dcm"]
    agree: dict[str, list[float]] = {"smoothed": [], "raw": []}
    for f in files:
        clean, _ = preprocess(f, 256)
        noisy = np.clip(clean + rng.normal(0, 25.5, clean.shape), 0, 255).round().astype(np.uint8)
        assert noise_sigma(clean) < 4 and noise_sigma(noisy) > 20, f.name
        same, found = denoised(clean)
        assert same is clean and found is None
        smoothed, found = denoised(noisy)
        assert found > 20 and noise_sigma(smoothed) < 8
        reference, cleaned = infer(lm, [clean, noisy]) > 0.5  # infer smooths the noisy one itself
        raw = infer(lm, [], inputs=model_input(noisy, lm.spec.norm)[None])[0] > 0.5
        for name, masks in (("smoothed", cleaned), ("raw", raw)):
            agree[name].append(np.mean([dice(masks[c], reference[c]) for c in range(len(reference))]))
    assert np.mean(agree["smoothed"]) > np.mean(agree["raw"]) + 0.005


def test_a_collimator_rim_is_found_and_filled_before_the_model():
    """A bright flat band along the edges (an unexposed collimator's rim) is measured
    exactly, filled with the film mirrored across its inner edge, and the shipped model's
    masks then stay closer to its masks of the film without the rim; films without one
    (and black padding) are left alone."""
    from pipeline.imaging import collimation_rim, model_input, preprocess, unrimmed, upright
    from pipeline.metrics import dice
    from pipeline.model import infer, model_inputs, resolve_model
    lm = resolve_model(None, "default", "cpu")
    files = sorted((GB / "images").iterdir())[:12] + [DICOM / "cr_chest_pa_jpeg_baseline.dcm"]
    agree: dict[str, list[float]] = {"filled": [], "raw": []}
    for n, f in enumerate(files):
        clean, _ = preprocess(f, 256)
        assert collimation_rim(clean) == (0, 0, 0, 0) and unrimmed(clean)[0] is clean, f.name
        depths = (20 + n, 12, 25, 30 - n)  # top, bottom, left, right
        rimmed = clean.copy()
        rimmed[:depths[0]], rimmed[256 - depths[1]:] = 235, 235
        rimmed[:, :depths[2]], rimmed[:, 256 - depths[3]:] = 235, 235
        assert collimation_rim(rimmed) == depths
        filled, found = unrimmed(rimmed)
        assert found == depths and np.array_equal(filled[20 + n:244, 25:226 + n], clean[20 + n:244, 25:226 + n])
        # the labelling loop turns films upright and reads their rims once (load_batch), and
        # hands both on: the model gets what it would from the raw films
        films = [clean, rimmed, 255 - clean]
        once = [upright(film)[0] for film in films]
        assert np.array_equal(model_inputs(once, lm.spec, [collimation_rim(film) for film in once]),
                              model_inputs(films, lm.spec))
        t, b, left, right = depths  # the top band mirrors the rows below its inner edge
        assert np.array_equal(filled[:t][::-1, left:256 - right], clean[t:2 * t, left:256 - right])
        reference, through = infer(lm, [clean, rimmed]) > 0.5  # infer fills the rim itself
        raw = infer(lm, [], inputs=model_input(rimmed, lm.spec.norm)[None])[0] > 0.5
        for name, masks in (("filled", through), ("raw", raw)):
            agree[name].append(np.mean([dice(masks[c], reference[c]) for c in range(len(reference))]))
    assert np.mean(agree["filled"]) > np.mean(agree["raw"]) + 0.02
    padded = np.zeros((256, 256), np.uint8)
    padded[40:216] = clean[40:216]  # a wide film padded to a square: black bands are not a rim
    assert collimation_rim(padded) == (0, 0, 0, 0)


def test_a_film_s_edges_are_its_own_not_its_square_s():
    """A wide film padded to a square: its top and bottom edges lie inside the square, and a
    structure that reaches them reaches the film's edges."""
    from pipeline.imaging import Geometry
    box = Geometry.fit(100, 200, 256).film_box()
    assert box == (0.0, 64.0, 255.0, 191.0)
    probs = np.zeros((1, 256, 256), np.float32)
    probs[0, 64:192, 40:200] = 0.9  # from the film's top to its bottom, inside its sides
    assert edge_contacts(probs, box) == 2
    assert edge_contacts(probs, (0.0, 0.0, 255.0, 255.0)) == 0
    assert edge_contacts((probs * 255).astype(np.uint8), box) == 2


def test_a_film_cut_short_is_drawn_by_a_model_that_trained_on_such_films():
    """A chest seen too close (a 1.4x field of view: the lungs run off the film). The shipped
    model trained on such films (`--shifts`), so labelling leaves its first pass alone, and
    its masks match its masks of the whole film, cut the same way, closely. Labelling such a
    film again from further out (`reframe`, for a model that learned chests framed whole)
    would draw them worse. Films framed whole are never picked."""
    import dataclasses

    from pipeline.metrics import dice
    from pipeline.model import infer
    lm = resolve_model(None, "default", "cpu")
    assert not lm.framed_whole
    whole_only = dataclasses.replace(lm, framed_whole=True)  # as a model trained without --shifts is
    zoom = np.array([[1.4, 0, -0.4 * 128], [0, 1.4, -0.4 * 128]])  # 1.4x about the centre
    files = [*sorted((DATA / "nih-samples").glob("*.png")), DICOM / "RG1_UNCR.dcm",
             *sorted((GB / "images").iterdir())[:40]]
    agree: dict[str, list[float]] = {"again": [], "first": []}
    left_alone = picked = 0
    for f in files:
        film, g = preprocess(f, 256)
        if g.offset_x + g.offset_y > 0.03 * max(g.orig_width, g.orig_height):
            continue  # padded to a square: zooming in keeps the padding, the lungs stay on the film
        whole = infer(lm, [film], quantise=True)
        if edge_contacts(whole[0], g.film_box()) < REFRAME_CONTACTS:
            left_alone += 1
            assert reframe(whole_only, [film], [g.film_box()], whole) is whole
        close = cv2.warpAffine(film, zoom, (256, 256), flags=cv2.INTER_LINEAR)
        reference = np.stack([cv2.warpAffine(c, zoom, (256, 256), flags=cv2.INTER_LINEAR) for c in whole[0]]) > 127
        first = infer(lm, [close], quantise=True)
        assert reframe(lm, [close], [(0.0, 0.0, 255.0, 255.0)], first) is first
        again = reframe(whole_only, [close], [(0.0, 0.0, 255.0, 255.0)], first)
        picked += again is not first
        for name, probs in (("again", again), ("first", first)):
            agree[name].append(np.mean([dice(probs[0][c] > 127, reference[c]) for c in range(len(reference))]))
    assert len(agree["first"]) >= 15 and left_alone == len(agree["first"]) and picked >= len(agree["first"]) // 2
    assert np.mean(agree["first"]) > 0.96
    assert np.mean(agree["again"]) < np.mean(agree["first"]) - 0.01


def test_models_list_shows_the_shipped_default_first(sqlite_engine):
    from pipeline.model import default_model_path, file_sha256, list_models
    rows = list_models(sqlite_engine)  # a new database registers nothing: the default is still in use
    assert [r["name"] for r in rows] == ["default"]
    assert rows[0]["sha256"] == file_sha256(default_model_path()) and "(shipped" in rows[0]["trained_on"]
    # trained on every film, it has no validation Dice: its recipe's cross-validated Dice, and it says so
    assert rows[0]["dice_heart"] == 0.937 and "5-fold CV" in rows[0]["trained_on"]
    table = CliRunner().invoke(cli, ["--db", str(sqlite_engine.url), "models", "list"]).output
    assert file_sha256(default_model_path()) in table  # the whole sha256, never cut


def test_a_table_cell_cut_short_ends_in_an_ellipsis(sqlite_engine):
    r = CliRunner().invoke(cli, ["--db", str(sqlite_engine.url), "query", f"SELECT '{'x' * 100}' AS long"])
    assert "x" * 59 + "…" in r.output and "x" * 61 not in r.output


def test_a_tiles_captions_are_readable_on_a_bright_film():
    from pipeline.report import overlay
    white = np.full((256, 256), 250, np.uint8)
    tile = overlay(white, Geometry.fit(256, 256, 256), {}, {"uid": "1.2.3", "group_name": "healthy", "ctr": 0.48,
                                                             "quality": 0.93, "input_check": "ok"})
    assert tile[:16].mean() < 100 and tile[-16:].mean() < 100 and tile[100:150].mean() > 240  # dark bands
    assert tile[:16].max() > 200  # and light text on them


def test_the_film_fix_ups_a_model_expects_travel_in_its_spec():
    import dataclasses

    from pipeline.imaging import preprocess
    from pipeline.model import ModelError, ModelSpec, model_inputs, read_checkpoint
    up, _ = preprocess(DICOM / "cr_chest_pa_jpeg_baseline.dcm", 256)
    reversed_img, _ = preprocess(DICOM / "cr_chest_pa_jpeg_baseline_monochrome1.dcm", 256)
    spec = read_checkpoint(REPO / "models" / "default" / "model.pt").spec
    assert spec.fixups == ("upright", "unrim", "denoise")  # what it was trained to expect
    assert np.array_equal(model_inputs([reversed_img], spec), model_inputs([up], spec))  # turned back
    bare = dataclasses.replace(spec, fixups=())  # a model trained to read films as they come
    assert not np.array_equal(model_inputs([reversed_img], bare), model_inputs([up], bare))
    assert ModelSpec.from_dict({**spec.as_dict(), "fixups": ["unrim"]}).fixups == ("unrim",)
    with pytest.raises(ModelError, match="in that order"):
        ModelSpec.from_dict({**spec.as_dict(), "fixups": ["denoise", "upright"]})


@pytest.mark.slow
def test_the_local_loop_stores_what_postprocess_reads_with_the_films_pixels(annotated_engine, tmp_path):
    """The local loop post-processes in worker processes: they get each film's cached pixels,
    so the shipped score reads the heart's border (heart_border) as when it was fitted, and
    the stored quality and trust are those of postprocess run here on the same film (until
    2026-12-07 the workers got no pixels: the border read 0 and both read otherwise)."""
    from pipeline.collect import Settings
    from pipeline.label import load_batch, postprocess

    with annotated_engine.connect() as c:
        chosen = select_images(c, all_images=True, source="wingspan", limit=6)
    label(annotated_engine, chosen, LabelOptions(model="default", device="cpu", workers=2,
                                                 cache_dir=str(tmp_path / "cache"), progress=False))
    lm = resolve_model(annotated_engine, "default", "cpu")
    items, errors = load_batch(annotated_engine, chosen.items, Settings(lm.spec.size, lm.spec.mode),
                               str(tmp_path / "cache"), None, lm.spec.fixups)
    assert not errors
    here = {it.uid: postprocess(it, p, lm.spec.structures, lm.quality)
            for it, p in zip(items, forward(lm, items), strict=True)}
    assert all(r.features["heart"]["heart_border"] != 0.0 for r in here.values())
    m = D.measurements
    with annotated_engine.connect() as c:
        stored = {r.uid: r for r in c.execute(select(m.c.uid, m.c.quality, m.c.trust, m.c.ctr))}
    assert set(stored) == set(here)
    for uid, r in here.items():
        assert (stored[uid].quality, stored[uid].trust, stored[uid].ctr) == pytest.approx(
            (r.measurements["quality"], r.measurements["trust"], r.measurements["ctr"]), abs=1e-9)


@pytest.mark.slow
def test_evaluate_leaves_out_the_films_the_model_trained_on(annotated_engine, tiny_model, tmp_path):
    """A registered model labels films it trained on and films it held out: evaluate reports
    on the held-out ones and counts the others; --include-trained keeps them, marked; when
    every film is one it trained on, one line says so and names the way to see them."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.evaluate import NothingHeldOut, evaluate
    from pipeline.model import read_checkpoint, register_model

    ck = read_checkpoint(tiny_model)
    register_model(annotated_engine, "tiny_reg", tiny_model, "tiny", ck.training, {}, "")
    trained = set(ck.info["trained_uids"])
    with annotated_engine.connect() as c:
        annotated = sorted(c.execute(text("SELECT DISTINCT uid FROM masks WHERE kind = 'manual'")).scalars())
    seen = [u for u in annotated if u in trained][:4]
    unseen = [u for u in annotated if u not in trained][:3]
    label(annotated_engine, Selection([it for it in _items(annotated_engine, 400).items if it.uid in {*seen, *unseen}],
                                      "test"),
          LabelOptions(model="tiny_reg", device="cpu", cache_dir=str(tmp_path / "c"), workers=1, progress=False))
    ev = evaluate(annotated_engine, "tiny_reg")
    assert ev.images == len(unseen) and ev.trained == len(seen)
    assert {r["uid"] for r in ev.per_image} == set(unseen)
    both = evaluate(annotated_engine, "tiny_reg", include_trained=True)
    assert both.images == len(seen) + len(unseen) and any("trained on" in n for n in both.notes)
    with pytest.raises(NothingHeldOut, match=f"all {len(seen)} films .* --include-trained"):
        evaluate(annotated_engine, "tiny_reg", among=set(seen))
    r = CliRunner().invoke(cli, ["--db", str(annotated_engine.url), "evaluate", "--model", "tiny_reg", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["images"] == len(unseen) and out["trained_films"] == len(seen) and out["include_trained"] is False


@pytest.mark.slow
def test_ctrl_c_mid_run_is_one_line_and_a_prompt_exit(annotated_db, tiny_model, tmp_path):
    """Ctrl-C (SIGINT to the terminal's whole process group, workers included) printed about
    fifty lines of worker tracebacks and took seconds more: the workers leave it to the run,
    which stops them, marks itself interrupted and ends with one line."""
    import shutil
    db = tmp_path / "catalogue.db"
    shutil.copy(annotated_db, db)
    env = {**os.environ, "CXRLABEL_DB": f"sqlite:///{db}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", "-v", "label", "--all", "--model", str(tiny_model),
           "--batch-size", "2", "--device", "cpu", "--workers", "2", "--cache", str(tmp_path / "c")]
    # as a terminal starts it: SIGINT at its default (a shell's background job, CI's among them,
    # may hand it down ignored, and Python then never installs its KeyboardInterrupt handler)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # two batches written: the pool's workers are busy; Ctrl-C the whole group
        if "batch 2 written" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert _exits_within(proc.pid, 60)
    proc.wait()
    assert proc.returncode != 0
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest[-3000:]
    said = [x for x in rest.splitlines() if x.strip() and not x.startswith(("DEBUG", "INFO"))
            and "batch" not in x and "label " not in x]  # the progress bar and -v's lines aside
    assert said == ["Aborted!"], rest[-3000:]
    with D.connect(f"sqlite:///{db}").connect() as c:
        assert c.execute(text("SELECT status FROM label_runs")).scalars().all() == ["interrupted"]

import numpy as np
import pytest

from pipeline.measure import measure
from pipeline.train import TrainConfig
from pipeline.train.data import augmentation
from pipeline.train.enlarge import MAX_REACH, column_map, widen_heart

STRUCTURES = ("heart", "left_lung", "right_lung")


def _measure(masks):
    return measure({s: masks[j] > 0.5 for j, s in enumerate(STRUCTURES)})


def test_widening_grows_the_heart_and_keeps_the_thorax_on_real_images(annotated_128):
    images, masks = annotated_128
    for img, m in zip(images, masks, strict=True):
        before = _measure(m)
        out_img, out_m = widen_heart(img, m, STRUCTURES, 1.3)
        after = _measure(out_m)
        assert out_img.dtype == np.uint8 and out_m.shape == m.shape
        # the heart widens by about the factor (less where a lung border limits it)
        assert 1.12 <= after["heart_width_px"] / before["heart_width_px"] <= 1.36
        assert abs(after["thoracic_width_px"] - before["thoracic_width_px"]) <= 2
        assert after["ctr"] > before["ctr"] + 0.05
        # the lungs give way where the heart grows (the annotated left lung continues behind
        # the heart, so only the lung outside the heart is counted)
        for j in (1, 2):
            assert ((out_m[j] > 0.5) & (out_m[0] <= 0.5)).sum() < ((m[j] > 0.5) & (m[0] <= 0.5)).sum()
        # outside the thorax nothing moves
        x0, x1 = before["lungs_x0"], before["lungs_x1"]
        assert np.array_equal(out_img[:, :max(x0 - 2, 0)], img[:, :max(x0 - 2, 0)])
        assert np.array_equal(out_img[:, x1 + 3:], img[:, x1 + 3:])


def test_no_heart_or_factor_one_leaves_the_image_alone(annotated_128):
    image, masks = annotated_128[0][0], annotated_128[1][0]
    img, m = widen_heart(image, masks, STRUCTURES, 1.0)
    assert img is image and m is masks
    empty = masks.copy()
    empty[0] = 0
    img, m = widen_heart(image, empty, STRUCTURES, 1.3)
    assert img is image and m is empty


@pytest.mark.parametrize("seed", range(20))
def test_the_column_map_is_monotone_and_stops_short_of_the_thorax(seed):
    rng = np.random.default_rng(seed)
    tl, tr = 5 + sorted(rng.uniform(0, 240, 2)) * np.array([1, 1]) + np.array([0, 6])
    hl, hr = sorted(rng.uniform(tl + 1, tr - 1, 2))
    centre = rng.uniform(hl, hr)
    src = column_map(256, centre, (hl, hr), (tl, tr), rng.uniform(1.0, 2.0))
    assert np.all(np.diff(src) >= 0)  # nothing folds over
    # the output column that reads the heart's left border lies at most MAX_REACH of the way out
    reads_left = np.interp(hl, src, np.arange(256.0))
    assert reads_left >= hl - MAX_REACH * (hl - tl) - 1e-6
    assert src[0] == 0 and src[-1] == 255  # the image's edges stay put


def test_heart_widening_joins_augmentation_reproducibly(annotated_128):
    images, masks = annotated_128
    plain = augmentation(TrainConfig.from_preset("tiny"))
    aug = augmentation(TrainConfig.from_preset("tiny", widen=1.0))
    assert len(aug.transforms) == len(plain.transforms) + 1
    data = {"image": images[0][None].astype(np.float32) / 255, "mask": masks[0]}
    outs = []
    for _ in range(2):
        aug.set_random_state(seed=3)
        outs.append(np.asarray(aug(dict(data))["mask"]))
    assert np.array_equal(outs[0], outs[1])


def test_a_factor_below_one_narrows_the_heart(annotated_128):
    images, masks = annotated_128
    for img, m in zip(images[:4], masks[:4], strict=True):
        before, after = _measure(m), _measure(widen_heart(img, m, STRUCTURES, 0.85)[1])
        assert 0.8 <= after["heart_width_px"] / before["heart_width_px"] <= 0.92
        assert abs(after["thoracic_width_px"] - before["thoracic_width_px"]) <= 2
    with pytest.raises(Exception, match="widen-range"):
        TrainConfig.from_preset("tiny", widen_range=(1.3, 1.1))


def test_widening_to_a_drawn_ctr_lands_near_it(annotated_128):
    """--widen-ctr: each heart is warped towards a CTR drawn from the range, whatever its own
    (here a range of one value, so every image must land near it from wherever it started)."""
    from pipeline.train.data import _heart_widening
    images, masks = annotated_128
    step = _heart_widening(STRUCTURES, 1.0, (1.05, 1.35), (0.58, 0.58))
    step.set_random_state(seed=0)
    started, landed = [], []
    for img, m in zip(images, masks, strict=True):
        out = step({"image": img[None].astype(np.float32) / 255, "mask": m.astype(np.float32)})
        started.append(_measure(m)["ctr"])
        landed.append(_measure(np.asarray(out["mask"]))["ctr"])
    assert min(started) < 0.52  # the images start well apart from the target...
    assert all(abs(c - 0.58) < 0.03 for c in landed)  # ...and all land near it
    with pytest.raises(Exception, match="widen-ctr"):
        TrainConfig.from_preset("tiny", widen_ctr=(0.7, 0.4))

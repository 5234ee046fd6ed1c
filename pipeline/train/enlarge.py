"""An enlarged heart made from a normal one: the augmentation that shows training cardiomegaly.

The annotated set holds few enlarged hearts (manual CTR median 0.495, four above 0.6), so a
model trained on it learns a typical heart and reads large ones small. :func:`widen_heart`
widens the cardiac silhouette of an image and its masks together with a smooth horizontal
displacement field:

* across: a piecewise-linear map of the columns that moves the heart's borders outward by
  ``factor`` about its centre, keeps the thorax's outer borders where they are (so the
  lungs narrow where the heart grows) and leaves everything outside the thorax alone;
* down: full strength over the cardiac part of the heart mask, fading to nothing towards
  its top (the annotated heart includes the upper mediastinum, which cardiomegaly does not
  widen) and just below its bottom (the diaphragm);
* smoothed with a Gaussian, so the image shows no kinks. The map stays monotone, so nothing
  folds over: the result is a warp, not a paste.
"""

from __future__ import annotations

import cv2
import numpy as np

CARDIAC_FROM = 0.35  # the part of the heart mask's height below which the widening is full
BELOW = 0.10  # fade-out below the heart, as a share of its height
MAX_REACH = 0.6  # a heart border moves at most this share of the way to the thorax's border


def column_map(size: int, centre: float, heart: tuple[float, float], thorax: tuple[float, float],
               factor: float) -> np.ndarray:
    """For every output column, the input column it reads (``size`` floats, monotone).

    ``heart`` and ``thorax`` are the (left, right) borders; each heart border moves ``factor``
    times its distance from ``centre``, but never more than :data:`MAX_REACH` of the way to
    the thorax's border on its side."""
    (hl, hr), (tl, tr) = heart, thorax
    new_l = max(centre - (centre - hl) * factor, hl - MAX_REACH * max(hl - tl, 0.0))
    new_r = min(centre + (hr - centre) * factor, hr + MAX_REACH * max(tr - hr, 0.0))
    src = [0.0, tl, hl, centre, hr, tr, size - 1.0]
    dst = [0.0, tl, new_l, centre, new_r, tr, size - 1.0]
    keep = np.concatenate([[True], np.diff(dst) > 1e-6])  # drop knots that coincide
    return np.interp(np.arange(size, dtype=np.float64), np.asarray(dst)[keep], np.asarray(src)[keep])


def row_weights(size: int, top: int, bottom: int) -> np.ndarray:
    """How much of the widening each row gets: 1 over the cardiac part of a heart spanning
    rows ``top``..``bottom``, raised-cosine ramps above and below, 0 elsewhere."""
    y = np.arange(size, dtype=np.float64)
    height = max(bottom - top, 1)
    full_from = top + CARDIAC_FROM * height
    fade_to = bottom + BELOW * height
    up = np.clip((y - top) / max(full_from - top, 1.0), 0.0, 1.0)
    down = np.clip((fade_to - y) / max(fade_to - bottom, 1.0), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * np.minimum(up, down))


def widen_heart(image: np.ndarray, masks: np.ndarray, structures: tuple[str, ...] | list[str],
                factor: float) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (S, S) and ``masks`` (C, S, S, floats in [0, 1]) with the heart ``factor``
    times wider (1.0: unchanged), warped together (bilinear). Images without a heart mask,
    or whose masks do not place it, come back as they are."""
    if "heart" not in structures or factor == 1.0:
        return image, masks
    heart = masks[list(structures).index("heart")] > 0.5
    rows = np.flatnonzero(heart.any(axis=1))
    if len(rows) < 4:
        return image, masks
    s = heart.shape[0]
    top, bottom = int(rows[0]), int(rows[-1])
    cardiac = heart[int(top + CARDIAC_FROM * (bottom - top)):bottom + 1]
    cols = np.flatnonzero(cardiac.any(axis=0))
    hl, hr = float(cols[0]), float(cols[-1])
    centre = float(np.mean(np.nonzero(cardiac)[1]))
    lungs = [masks[list(structures).index(n)] > 0.5 for n in ("left_lung", "right_lung") if n in structures]
    lung_cols = np.flatnonzero(np.any(lungs, axis=(0, 1))) if lungs else np.array([], int)
    # without lungs the thorax is taken as a margin outside the heart
    tl = float(lung_cols[0]) if len(lung_cols) and lung_cols[0] < hl else max(0.0, hl - 0.25 * s)
    tr = float(lung_cols[-1]) if len(lung_cols) and lung_cols[-1] > hr else min(s - 1.0, hr + 0.25 * s)
    across = column_map(s, centre, (hl, hr), (tl, tr), factor) - np.arange(s)
    shift = row_weights(s, top, bottom)[:, None] * across[None, :]
    sigma = max(s / 128.0, 1.0)
    shift = cv2.GaussianBlur(shift.astype(np.float32), (0, 0), sigma)
    map_x = (np.arange(s, dtype=np.float32)[None, :] + shift).astype(np.float32)
    map_y = np.repeat(np.arange(s, dtype=np.float32)[:, None], s, axis=1)

    def warp(a: np.ndarray) -> np.ndarray:
        return cv2.remap(a, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    out_image = warp(image.astype(np.float32)).astype(image.dtype) if image.dtype != np.uint8 else \
        np.clip(np.rint(warp(image.astype(np.float32))), 0, 255).astype(np.uint8)
    out_masks = np.stack([np.clip(warp(m.astype(np.float32)), 0.0, 1.0) for m in masks]).astype(masks.dtype)
    return out_image, out_masks

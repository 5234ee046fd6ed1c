"""Post-processing of predicted masks and measurements (CTR and friends).

All functions are pure: arrays in, arrays and numbers out.

* :func:`clean` keeps the largest connected component and fills its holes.
* :func:`measure` works on masks in original geometry: widths are horizontal extents in
  original pixels (mm where pixel spacing is known). The cardiothoracic ratio is the
  maximal horizontal width of the heart over the thoracic width, the outer extent of both
  lungs, as on a PA film.

The quality score, and its heuristic fallback, live in :mod:`pipeline.quality`.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def clean(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Largest 8-connected component with holes filled, and the share of foreground kept."""
    m = mask.astype(np.uint8)
    total = int(np.count_nonzero(m))
    if total == 0:
        return mask.astype(bool), 1.0
    n, labels = cv2.connectedComponents(m, connectivity=8)  # (with stats: several times slower)
    if n > 2:
        biggest = 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n)[1:]))
        m = (labels == biggest).astype(np.uint8)
    kept = int(np.count_nonzero(m)) / total
    # fill holes: background the border cannot reach (4-connected) is foreground
    outside = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(outside, None, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2, kept


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` inclusive, or None for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def measure(masks: dict[str, np.ndarray], spacing: tuple[float | None, float | None] = (None, None),
            ) -> dict[str, Any]:
    """Heart area/width, thoracic width, CTR and boxes from ``{structure: (H, W) bool}``.

    ``spacing`` is ``(x, y)`` mm per pixel (None when unknown). ``ctr`` is None unless the
    heart and both lungs are present; ``ctr_missing`` then names the absent ones.
    """
    heart = masks.get("heart")
    return measure_boxes({s: bbox(m) for s, m in masks.items()},
                         int(np.count_nonzero(heart)) if heart is not None else None, spacing)


def measure_boxes(boxes: dict[str, tuple[int, int, int, int] | None], heart_area: int | None,
                  spacing: tuple[float | None, float | None] = (None, None)) -> dict[str, Any]:
    """:func:`measure` from each structure's box (None: empty or absent) and the heart's area."""
    sx, sy = spacing
    out: dict[str, Any] = {}
    hb = boxes.get("heart")
    out["heart_area_px"] = heart_area
    out["heart_area_mm2"] = heart_area * sx * sy if heart_area is not None and sx and sy else None
    out["heart_width_px"] = hb[2] - hb[0] + 1 if hb else None
    # the box of the union of the lungs is the union of their boxes
    lungs = [b for s in ("left_lung", "right_lung") if (b := boxes.get(s))]
    lb = (min(b[0] for b in lungs), min(b[1] for b in lungs), max(b[2] for b in lungs),
          max(b[3] for b in lungs)) if lungs else None
    out["thoracic_width_px"] = lb[2] - lb[0] + 1 if lb else None
    out["heart_width_mm"] = out["heart_width_px"] * sx if hb and sx else None
    out["thoracic_width_mm"] = out["thoracic_width_px"] * sx if lb and sx else None
    # a CTR needs the heart and both lungs: one lung's extent is not the thorax
    missing = [s for s in ("heart", "left_lung", "right_lung") if not boxes.get(s)]
    out["ctr"] = out["heart_width_px"] / out["thoracic_width_px"] if not missing else None
    out["ctr_missing"] = ",".join(missing) or None
    for key, box in (("heart", hb), ("lungs", lb)):
        for name, v in zip(("x0", "y0", "x1", "y1"), box or (None,) * 4, strict=True):
            out[f"{key}_{name}"] = v
    return out


FIELD_MM = (100.0, 600.0)  # a chest film's width in millimetres: a calibration outside it is wrong


def calibrate(spacing: tuple[float | None, float | None], source: str | None,
              catalogued: tuple[int | None, int | None], decoded: tuple[int, int],
              ) -> tuple[tuple[float | None, float | None], str]:
    """The pixel spacing of the decoded pixels, ``(x, y)`` mm, and what it came from, in words
    (``label_results.mm_calibration``). ``spacing`` and ``source``: the catalogue's (of its
    ``catalogued`` width and height); ``decoded``: the file's own width and height. A file that
    is a resized copy of the original the catalogue describes (NIH's 1024 px PNGs of films
    thousands of pixels wide) gets the spacing scaled to its pixels, axis by axis; a spacing of
    0 or none, or one that makes the film narrower than 10 cm or wider than 60 cm, is none, and
    says why."""
    sx, sy = spacing
    if not sx or not sy or sx <= 0 or sy <= 0:
        return (None, None), (source if source and source.startswith("none") else "none: no pixel spacing")
    what = source or "the catalogue's spacing"
    (cw, ch), (dw, dh) = catalogued, decoded
    if cw and ch and (cw, ch) != (dw, dh):
        fx, fy = cw / dw, ch / dh
        sx, sy = sx * fx, sy * fy
        what += (f", scaled x{fx:.3g} to the file ({cw} -> {dw} px)" if abs(fx - fy) < 1e-3 * fx else
                 f", scaled x{fx:.3g} across, x{fy:.3g} down to the file ({cw}x{ch} -> {dw}x{dh} px)")
    width = sx * dw
    if not FIELD_MM[0] <= width <= FIELD_MM[1]:
        return (None, None), f"none: {what} makes the film {width:.0f} mm wide, not a chest film's"
    return (sx, sy), what


ADULT_AGE = 16  # years: from here the thorax has an adult's width

# The internal width of the thorax on a frontal chest film, mm: wider than any newborn's is
# narrow (about 100 mm) and narrower than any adult's is wide (about 400 mm), with room for
# magnification (AP films, 10-15%) and habitus. An adult's is at least 180 mm; a child's at most
# 200 mm plus 15 mm a year of age (10 years: 350 mm). A width outside them means the pixel
# spacing is wrong (a scanned film's, a resized copy's), not that the patient is.
THORAX_MM = (80.0, 450.0)
ADULT_THORAX_MIN_MM = 180.0


def thorax_bounds(age: int | None) -> tuple[float, float, str]:
    """The thoracic widths (mm) a patient of ``age`` years can have, and who that is in words."""
    if age is None or age < 0:
        return (*THORAX_MM, "a patient of unknown age")
    if age >= ADULT_AGE:
        return ADULT_THORAX_MIN_MM, THORAX_MM[1], f"an adult (age {age})"
    return THORAX_MM[0], min(THORAX_MM[1], 200.0 + 15.0 * age), f"a child of {age}"


def plausible_mm(values: dict[str, Any], age: int | None) -> dict[str, Any]:
    """``values`` (:func:`measure_boxes`' with ``mm_calibration``) with the millimetres
    withheld, and the reason in ``mm_calibration``, when the thoracic width they give lies
    outside what a patient of ``age`` can have (:func:`thorax_bounds`)."""
    width = values.get("thoracic_width_mm")
    if width is None:
        return values
    lo, hi, who = thorax_bounds(age)
    if lo <= width <= hi:
        return values
    why = (f"withheld: a thoracic width of {width:.0f} mm is outside {lo:.0f}-{hi:.0f} mm for {who}; "
           f"from {values.get('mm_calibration') or 'the spacing'}")
    return {**values, "heart_width_mm": None, "thoracic_width_mm": None, "heart_area_mm2": None,
            "mm_calibration": why[:160]}


def mean_column(mask: np.ndarray) -> float | None:
    """A mask's mean foreground column (the mean of the columns it touches), None when it is
    empty: what :func:`pipeline.quality.plausibility` compares."""
    used = np.flatnonzero(mask.any(axis=0))
    return float(used.mean()) if len(used) else None

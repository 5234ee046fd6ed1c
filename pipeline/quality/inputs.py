"""Is this a frontal chest radiograph the model can read? The input check, and the CTR norms' marks.

:func:`check` reads the anatomy the model drew (its cleaned masks at model resolution, in the
film's box) and, where the model's score carries one, the masks' fit to an atlas of annotated
chests. A frontal chest film shows two lungs side by side, each a tall shape filling a fair
share of the film, the patient's left lung on the image's right, and the heart between them,
low, mostly on the image's right. A lateral view, another body part, an animal, a photo or a
figure, a CT or MR slice, a film turned or flipped, or one cropped to part of the chest breaks
one of these; the first broken one is the stored reason (``measurements.input_check``; ``ok``
when none is). The limits are set outside what every annotated chest film of the two
development sources shows (``bench/input_check.py`` measures them, and what they catch and
miss). A film the check flags is labelled all the same; its ``quality`` is 0, so it heads the
review worklist, and the CTR statistics leave it out unless asked.

The catalogue's own header, where it has one, speaks first: a DICOM whose Modality is not a
radiograph's, or whose body part or view says it is not a frontal chest film.

Separately, :data:`NORMS` names films outside what the CTR norms describe, marked and never
refused: an AP view (the heart is magnified) and a child (under 16, where the catalogue
knows the age). ``sql/views.sql`` reads them from the catalogue (``label_results.outside_norms``).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.measure import bbox

OK = "ok"
RADIOGRAPHS = {"CR", "DX", "DR", "RG"}  # DICOM Modality of a chest projection radiograph (not PX: dental)
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
CHEST_PARTS = {"CHEST", "THORAX", "LUNG", "HEART", "TORSO", "CHEST_LAT", "PORT CHEST", "BREAST"}

# The limits, outside the range of every annotated chest film of the development sources
# (bench/input_check.py, 2026-12-05: their minimum and maximum there are in RESULTS).
MIN_LUNG_SHARE = 0.015  # each lung's area, share of the film's (a chest's smallest: 0.04)
MIN_SIDE_BY_SIDE = 0.45  # vertical overlap of the two lungs' boxes, share of the shorter lung's height
MIN_LUNG_ORDER = 0.05  # (left lung's mean column - right lung's) / the lungs' width: the left lung on the image's right
# flipped: the lung on the image's right is the larger (the patient's right lung has no heart in its
# room) and the heart leans to the image's left: (left lung's area / right lung's) - 3 x (heart's mean
# column - the lungs' middle) / the lungs' width
MAX_FLIP = 1.16
MIN_HEART_RIGHT = 0.42  # the heart's share on the image's right (a chest's smallest: 0.44)
MIN_LUNG_RATIO = 0.47  # the left lung's area over the right's: far smaller, the film cuts it off (a chest's: 0.50)
MIN_HEART_LOW = 0.40  # the heart's mean row, share of the lungs' height from their top: the heart sits low
MIN_LUNGS_TALL = 0.45  # the lungs' box: height over width
MAX_EDGE_SHARE = 0.35  # the share of a lung's outline rows or columns on the film's edge: cut off there
MIN_ATLAS_FIT = 0.70  # the mean fit of the masks to the nearest annotated chest's (quality.Atlas)
MIN_LOOK = 0.60  # the film's correlation with the nearest annotated chest film's look (Appearance)
TURN_MARGIN = 0.03  # a film turned looks more like an annotated chest than as it is, by this much

LOOK_SIDE = 24  # the side of the film's thumbnail an Appearance compares


def thumbnail(image: np.ndarray, film: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The film (``film``: its box in the cached ``image``; None: all of it), shrunk to
    ``LOOK_SIDE`` square and equalised: ``uint8``, what :class:`Appearance` compares."""
    side = image.shape[0]
    x0, y0, x1, y1 = film or (0, 0, side - 1, side - 1)
    part = image[int(np.ceil(y0)):int(np.floor(y1)) + 1, int(np.ceil(x0)):int(np.floor(x1)) + 1]
    if part.size == 0:
        part = image
    small = cv2.resize(part, (LOOK_SIDE, LOOK_SIDE), interpolation=cv2.INTER_AREA)
    return cv2.equalizeHist(small)


def _unit(thumbs: np.ndarray) -> np.ndarray:
    """Thumbnails ``(N, side, side)`` as zero-mean unit vectors: their dot product is the
    correlation."""
    v = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    v -= v.mean(axis=1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)


@dataclass(frozen=True)
class Appearance:
    """Thumbnails of the annotated chest films (:func:`thumbnail`): a film that correlates
    poorly with every one of them is no chest film the model knows, and one that correlates
    better turned than as it is was turned (an RCA-like check of the
    pixels, as :class:`pipeline.quality.Atlas` is of the masks)."""

    thumbs: np.ndarray  # (N, LOOK_SIDE, LOOK_SIDE) uint8
    _unit: np.ndarray = field(init=False, repr=False, compare=False)  # made from thumbs

    def __post_init__(self) -> None:
        object.__setattr__(self, "_unit", _unit(self.thumbs))

    def look(self, thumb: np.ndarray, leave_out: int | None = None) -> dict[str, float]:
        """The best correlation of ``thumb`` with the annotated films' as it is (``upright``)
        and turned a quarter, half or three quarters (``turned``, the best of them);
        ``leave_out``: a film of the set not to compare with (the film itself, when it is one
        of them)."""
        variants = [thumb, np.rot90(thumb, 1), np.rot90(thumb, 2), np.rot90(thumb, 3)]
        corr = self._unit @ _unit(np.stack(variants)).T  # (N, 4)
        if leave_out is not None:
            corr[leave_out] = -1.0
        best = corr.max(axis=0)
        return {"upright": float(best[0]), "turned": float(best[1:].max())}

    def to_json(self) -> dict:
        return {"side": LOOK_SIDE, "images": len(self.thumbs),
                "pixels": base64.b64encode(np.ascontiguousarray(self.thumbs, np.uint8).tobytes()).decode("ascii")}

    @classmethod
    def from_json(cls, d: dict) -> Appearance:
        """The appearance :meth:`to_json` wrote; a ValueError for a damaged one."""
        if d["side"] != LOOK_SIDE:
            raise ValueError(f"an appearance of side {d['side']}, not {LOOK_SIDE}")
        raw = base64.b64decode(d["pixels"], validate=True)
        n = int(d["images"])
        if n < 1 or len(raw) != n * LOOK_SIDE * LOOK_SIDE:
            raise ValueError(f"an appearance of {len(raw)} bytes where its {n} images need {n * LOOK_SIDE ** 2}")
        return cls(np.frombuffer(raw, np.uint8).reshape(n, LOOK_SIDE, LOOK_SIDE).copy())


def header_check(modality: str | None, body_part: str | None, view: str | None) -> str | None:
    """The reason the catalogue's header gives (a DICOM's Modality, BodyPartExamined, view)
    for not reading a film as a frontal chest radiograph; None when it gives none."""
    mod = (modality or "").strip().upper()
    if mod and mod not in RADIOGRAPHS:
        return f"not a radiograph: Modality {mod}"
    part = (body_part or "").strip().upper()
    if part and part not in CHEST_PARTS:
        return f"not a chest film: body part {part}"
    if (view or "").strip().upper() in LATERAL_VIEWS:
        return f"lateral view ({view}): no frontal CTR"
    return None


def anatomy(masks: dict[str, np.ndarray], film: tuple[float, float, float, float] | None = None,
            boxes: dict[str, tuple[int, int, int, int] | None] | None = None) -> dict[str, float]:
    """What :func:`check` reads of the cleaned masks ``{structure: (S, S) bool}`` at model
    resolution, within the ``film`` box (cache pixels; None: the whole image). ``boxes``: the
    masks' boxes (``(x0, y0, x1, y1)``; None: empty), when known: each is counted inside its box."""
    side = next(iter(masks.values())).shape[0]
    x0, y0, x1, y1 = film or (0, 0, side - 1, side - 1)
    fx0, fy0, fx1, fy1 = int(np.ceil(x0)), int(np.ceil(y0)), int(np.floor(x1)), int(np.floor(y1))
    film_area = max((fx1 - fx0 + 1) * (fy1 - fy0 + 1), 1)
    out = {"lung_share": 0.0, "side_by_side": 0.0, "lung_order": -1.0, "heart_side": -1.0, "heart_right": 0.0,
           "lung_ratio": 0.0, "heart_low": 0.0, "lungs_tall": 0.0, "edge_share": 0.0}
    # each mask read through its row and column counts: the same sums as over its pixels'
    # coordinates (exact in integers), without listing them (a tenth of the time)
    parts = {}
    for s in ("heart", "left_lung", "right_lung"):
        m = masks.get(s)
        if m is None or (box := boxes.get(s) if boxes is not None else bbox(m)) is None:
            return out
        parts[s] = _Projection(m, box)
    lung_l, lung_r, heart = parts["left_lung"], parts["right_lung"], parts["heart"]
    out["lung_share"] = min(lung_l.n, lung_r.n) / film_area
    overlap = min(lung_l.y1, lung_r.y1) - max(lung_l.y0, lung_r.y0) + 1
    out["side_by_side"] = max(overlap, 0) / (min(lung_l.y1 - lung_l.y0, lung_r.y1 - lung_r.y0) + 1)
    left, right = min(lung_l.x0, lung_r.x0), max(lung_l.x1, lung_r.x1)
    top, bottom = min(lung_l.y0, lung_r.y0), max(lung_l.y1, lung_r.y1)
    width, height = right - left + 1, bottom - top + 1
    out["lung_order"] = (lung_l.mean_x - lung_r.mean_x) / width
    out["heart_side"] = (heart.mean_x - (left + right) / 2) / width
    # the heart's share on the image's right
    out["heart_right"] = float(heart.cols[np.arange(side) > (left + right) / 2].sum() / heart.n)
    out["lung_ratio"] = lung_l.n / lung_r.n  # the patient's left lung is the smaller (the heart takes its room)
    out["heart_low"] = (heart.mean_y - top) / height
    out["lungs_tall"] = height / width
    edge = 0.0
    for s in ("left_lung", "right_lung"):
        m, p = masks[s], parts[s]
        at_sides = m[:, :max(fx0 + 1, 0)].any(axis=1) | m[:, max(fx1, 0):].any(axis=1)
        at_ends = m[:max(fy0 + 1, 0)].any(axis=0) | m[max(fy1, 0):].any(axis=0)
        edge = max(edge, int(np.count_nonzero(at_sides)) / p.n_rows, int(np.count_nonzero(at_ends)) / p.n_cols)
    out["edge_share"] = edge
    return out


class _Projection:
    """A non-empty ``(S, S)`` bool mask's pixel count, extent and mean row and column, from
    its row and column counts (counted inside its ``box``, zero beyond it)."""

    def __init__(self, m: np.ndarray, box: tuple[int, int, int, int]) -> None:
        x0, y0, x1, y1 = box
        inside = m[y0:y1 + 1, x0:x1 + 1]
        self.rows, self.cols = np.zeros(m.shape[0], np.intp), np.zeros(m.shape[1], np.intp)
        self.rows[y0:y1 + 1], self.cols[x0:x1 + 1] = np.count_nonzero(inside, axis=1), np.count_nonzero(inside, axis=0)
        ys, xs = np.flatnonzero(self.rows), np.flatnonzero(self.cols)
        self.n = int(self.rows.sum())
        self.n_rows, self.n_cols = len(ys), len(xs)
        self.y0, self.y1, self.x0, self.x1 = int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1])
        self.mean_y = int(ys @ self.rows[ys]) / self.n
        self.mean_x = int(xs @ self.cols[xs]) / self.n


def check(masks: dict[str, np.ndarray], film: tuple[float, float, float, float] | None = None,
          atlas_fit: dict[str, float] | None = None, look: dict[str, float] | None = None,
          boxes: dict[str, tuple[int, int, int, int] | None] | None = None) -> str:
    """``ok``, or why the film does not read as a frontal chest radiograph (one line).
    ``look``: :meth:`Appearance.look` of the film, where the model's score carries one;
    ``boxes``: the masks' boxes, when known (:func:`anatomy`)."""
    if look is not None:
        if max(look["upright"], look["turned"]) < MIN_LOOK:
            return f"not a chest film? it looks like no annotated chest film (correlation {look['upright']:.2f})"
        if look["turned"] > look["upright"] + TURN_MARGIN:
            return "turned? it looks more like a chest film turned a quarter or half"
    a = anatomy(masks, film, boxes)
    if a["lung_share"] < MIN_LUNG_SHARE:
        return "not a chest film? the model finds no pair of lungs"
    if a["side_by_side"] < MIN_SIDE_BY_SIDE or a["lungs_tall"] < MIN_LUNGS_TALL:
        return "not a frontal chest film, or turned a quarter? the lungs do not stand side by side"
    if a["heart_low"] < MIN_HEART_LOW:
        return "upside down? the heart sits high between the lungs"
    if (a["lung_order"] < MIN_LUNG_ORDER or a["lung_ratio"] - 3 * a["heart_side"] > MAX_FLIP
            or a["heart_right"] < MIN_HEART_RIGHT):
        return "flipped left-right (or situs inversus)? the heart and left lung lie on the image's left"
    if a["edge_share"] > MAX_EDGE_SHARE or a["lung_ratio"] < MIN_LUNG_RATIO:
        return "cropped? a lung runs off the film's edge"
    if atlas_fit and float(np.mean(list(atlas_fit.values()))) < MIN_ATLAS_FIT:
        return f"unlike any annotated chest film (shape fit {np.mean(list(atlas_fit.values())):.2f})"
    return OK

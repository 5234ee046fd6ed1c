"""The quality score: an estimate of each mask's Dice, from what the model's output shows.

For every structure, :func:`structure_features` reads the model-resolution probabilities and
the cleaned mask: how far the probabilities agree with the mask, how wide the band of
uncertain pixels is, how sharp its outline, how much the clean-up threw away, how convex and
how large it is; :func:`image_features` adds the anatomy (CTR, lungs on the wrong side, a
missing structure); an :class:`Atlas` of the annotated masks says how far each mask's shape
is from the nearest one a person drew (an RCA-like check, as CheXmask's). A
:class:`QualityModel`, fitted by ``bench/quality.py`` on held-out cross-validation folds put
through equipment-like shifts (:mod:`pipeline.shifts`), maps them to an estimated Dice per
structure (ridge regression on ``log(1.01 - Dice)``, then an isotonic map to Dice); the
image's ``quality`` is their mean. A model without one (no ``<checkpoint>.quality.json``
beside it) gets the older heuristic score
(:func:`pipeline.measure.quality`) and no per-structure estimates.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.imaging import collimation_rim
from pipeline.measure import bbox

STRUCTURE_FEATURES = ("agreement", "uncertain", "edge_margin", "kept", "solidity", "area")
IMAGE_FEATURES = ("ctr_off", "lungs_swapped", "missing", "rim")
FEATURES = STRUCTURE_FEATURES + IMAGE_FEATURES  # what post-processing always measures
SHAPE = "atlas"  # measured where the score carries an Atlas (Atlas.fit)
CONTEXT = ("agreement", "uncertain", "edge_margin", "solidity", SHAPE)  # compared across the image's structures


def design(features: dict[str, dict[str, float]], names: tuple[str, ...] = FEATURES) -> dict[str, np.ndarray]:
    """The regression's inputs per structure of one image: its features ``names``, the
    squares of those that describe the structure itself, and the least and most doubtful of
    :data:`CONTEXT` over the image's structures (a shifted or odd film shows in all of them)."""
    context = []
    for k in (k for k in CONTEXT if k in names):
        values = [f[k] for f in features.values()]
        context += [min(values), max(values)]
    own = [k for k in names if k not in IMAGE_FEATURES]
    return {s: np.array([f[k] for k in names] + [f[k] ** 2 for k in own] + context)
            for s, f in features.items()}


_RING = np.ones((3, 3), np.uint8)


def structure_features(p: np.ndarray, cleaned: np.ndarray, kept: float, agreement: float, size: int,
                       ) -> dict[str, float]:
    """Features of one structure from its probabilities ``p`` (float, a window of the model's
    output) and the cleaned mask in that window; ``size``: the model's side. About 70 us."""
    area = int(np.count_nonzero(cleaned))
    if area == 0:
        return {"agreement": math.log(1.01 - agreement), "uncertain": 0.0, "edge_margin": 0.0, "kept": 0.0,
                "solidity": 0.0, "area": math.log(1 / size ** 2)}
    m = cleaned.astype(np.uint8)
    ring = cv2.morphologyEx(m, cv2.MORPH_GRADIENT, _RING) > 0  # the outline, a pixel either side
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.contourArea(cv2.convexHull(np.concatenate(contours)))
    return {
        "agreement": math.log(1.01 - agreement),  # soft Dice of p against the mask
        # pixels the model is unsure of, per pixel of mask: a wide band is a doubtful outline
        "uncertain": math.log(1e-3 + np.count_nonzero((p > 0.1) & (p < 0.9)) / area),
        "edge_margin": float(np.mean(np.abs(2 * p[ring] - 1))),  # 1: a crisp outline
        "kept": math.log(max(kept, 1e-3)),  # below 0: the clean-up threw blobs away
        "solidity": min(1.0, area / max(hull, 1.0)),
        "area": math.log(area / size ** 2),
    }


def image_features(ctr: float | None, columns: dict[str, float | None], rim: float = 0.0) -> dict[str, float]:
    """Anatomy of the whole image: CTR away from the usual range, lungs on the wrong side,
    structures missing; and the share of the film a collimator's rim covered (the model
    drew the anatomy on behind it: :func:`pipeline.imaging.unrimmed`)."""
    left, right = columns.get("left_lung"), columns.get("right_lung")
    return {
        "ctr_off": float(abs(ctr - 0.47)) if ctr is not None else 0.5,
        "lungs_swapped": float(left is not None and right is not None and left < right),
        "missing": float(sum(v is None for v in columns.values())),
        "rim": rim,
    }


def rim_share(cached: np.ndarray, rim: tuple[int, int, int, int] | None = None) -> float:
    """The share of a cached film that a collimator's rim covers
    (:func:`pipeline.imaging.collimation_rim`, or ``rim`` when read already)."""
    top, bottom, left, right = collimation_rim(cached) if rim is None else rim
    h, w = cached.shape
    return 1.0 - max(h - top - bottom, 0) * max(w - left - right, 0) / (h * w)


ATLAS_SIDE = 32


def atlas_frame(masks: Sequence[np.ndarray]) -> np.ndarray:
    """One image's structure masks (``(H, W)`` bool each) framed by the box around all of
    them and shrunk to ``ATLAS_SIDE`` square: ``(C, 32, 32)`` bool, their shapes and layout
    whatever the film's size and framing. About 0.25 ms for three 256 px masks."""
    masks = [np.asarray(m, bool) for m in masks]
    union = bbox(np.logical_or.reduce(masks))
    if union is None:
        return np.zeros((len(masks), ATLAS_SIDE, ATLAS_SIDE), bool)
    x0, y0, x1, y1 = union
    box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    return np.stack([cv2.resize(m[box].astype(np.float32), (ATLAS_SIDE, ATLAS_SIDE),
                                interpolation=cv2.INTER_AREA) > 0.5 for m in masks])


@dataclass(frozen=True)
class Atlas:
    """The annotated images' masks, each image framed by :func:`atlas_frame`: a mask far from
    every shape a person drew is doubtful, whatever the model thinks of it (CheXmask's
    reverse classification accuracy asks the same of an atlas of annotated images)."""

    structures: tuple[str, ...]
    masks: np.ndarray  # (N, C, 32, 32) bool

    def __post_init__(self) -> None:  # the masks as 64-bit words, for counting overlaps by popcount
        words = np.packbits(self.masks.reshape(len(self.masks), len(self.structures), -1), axis=2)
        object.__setattr__(self, "_words", np.ascontiguousarray(words).view(np.uint64))
        object.__setattr__(self, "_counts", np.bitwise_count(self._words).sum(axis=2))

    @classmethod
    def build(cls, masks: Sequence[np.ndarray], structures: Sequence[str]) -> Atlas:
        """From annotated images' masks, ``(C, H, W)`` each (bool, or soft ones cut at 0.5), of
        images whose every structure is drawn; the images may differ in size."""
        return cls(tuple(structures), np.stack([atlas_frame(m > 0.5 if m.dtype != bool else m) for m in masks]))

    def fit(self, masks: dict[str, np.ndarray]) -> dict[str, float]:
        """Per structure of one image's masks (``{structure: (H, W) bool}``, every structure
        of the atlas): the Dice of its framed mask with the nearest of the atlas's (1: a shape
        a person drew; the score reads it as it is, which ranked better than its log)."""
        framed = atlas_frame([masks[s] for s in self.structures]).reshape(len(self.structures), -1)
        words = np.packbits(framed, axis=1).view(np.uint64)
        inter = np.bitwise_count(self._words & words[None]).sum(axis=2)
        total = self._counts + np.bitwise_count(words).sum(axis=1)[None]
        best = (2 * inter / np.maximum(total, 1)).max(axis=0)
        return {s: float(d) for s, d in zip(self.structures, best, strict=True)}

    def to_json(self) -> dict:
        return {"side": ATLAS_SIDE, "structures": list(self.structures), "images": len(self.masks),
                "bits": base64.b64encode(np.packbits(self.masks).tobytes()).decode("ascii")}

    @classmethod
    def from_json(cls, d: dict) -> Atlas:
        """The atlas :meth:`to_json` wrote; an error for a damaged one, never an atlas padded or
        cut to fit."""
        shape = (int(d["images"]), len(d["structures"]), int(d["side"]), int(d["side"]))
        if d["side"] != ATLAS_SIDE:
            raise ValueError(f"an atlas of side {d['side']}, not {ATLAS_SIDE}")
        raw = base64.b64decode(d["bits"], validate=True)
        count = int(np.prod(shape))
        if len(raw) != -(-count // 8):
            raise ValueError(f"an atlas of {len(raw)} bytes where its {shape[0]} images need {-(-count // 8)}")
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=count)
        return cls(tuple(map(str, d["structures"])), bits.reshape(shape).astype(bool))


@dataclass(frozen=True)
class QualityModel:
    """Per structure: a ridge regression from the standardised :func:`design` of the image's
    features to ``log(1.01 - Dice)`` (how the features rank the masks), then an isotonic map
    from that to Dice fitted on the same masks (so the score reads as a Dice). ``info``: how
    and on what it was fitted, and how well it did on masks it had not seen."""

    features: tuple[str, ...]
    mean: dict[str, list[float]]
    scale: dict[str, list[float]]
    coef: dict[str, list[float]]
    intercept: dict[str, float]
    knots: dict[str, list[float]]  # the isotonic map: ridge output (ascending) -> Dice
    values: dict[str, list[float]]
    info: dict
    atlas: Atlas | None = None  # where ``features`` has SHAPE: what post-processing fits masks to

    def estimate(self, features: dict[str, dict[str, float]]) -> dict[str, float]:
        """``{structure: {feature: value}}`` of one image -> estimated Dice per structure in
        ``[0, 1]``."""
        out = {}
        for s, x in design(features, self.features).items():
            if s in self.coef:
                raw = self.intercept[s] + ((x - self.mean[s]) / self.scale[s]) @ np.array(self.coef[s])
                out[s] = float(np.interp(raw, self.knots[s], self.values[s]))
        return out

    @classmethod
    def fit(cls, rows: list[dict], dice: list[float], structures: list[str],
            alpha: float = 1.0, info: dict | None = None, names: tuple[str, ...] = FEATURES,
            atlas: Atlas | None = None) -> QualityModel:
        """Fit on ``rows`` (each: the features ``names`` of one structure of one image, plus
        ``"structure"`` and ``"image"``, any key the image's rows share) and their true Dice.
        With :data:`SHAPE` among ``names``, ``atlas`` is the one labelling will fit masks to
        (needed to save the score, not to estimate from rows that carry the feature)."""
        images: dict = {}
        for r in rows:
            images.setdefault(r["image"], {})[r["structure"]] = r
        inputs = {key: design(group, names) for key, group in images.items()}
        mean, scale, coef, intercept, knots, values = {}, {}, {}, {}, {}, {}
        for s in structures:
            pick = [i for i, r in enumerate(rows) if r["structure"] == s]
            x = np.array([inputs[rows[i]["image"]][s] for i in pick], np.float64)
            d = np.clip(np.array([dice[i] for i in pick], np.float64), 0, 1)
            y = np.log(1.01 - d)
            mu, sd = x.mean(axis=0), x.std(axis=0)
            sd[sd == 0] = 1.0
            z = (x - mu) / sd
            b = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
            mean[s], scale[s], coef[s], intercept[s] = mu.tolist(), sd.tolist(), b.tolist(), float(y.mean())
            # a higher ridge output means a larger expected error: Dice falls along it
            k, v = _isotonic(-(y.mean() + z @ b), d)
            knots[s], values[s] = (-k[::-1]).tolist(), v[::-1].tolist()
        return cls(tuple(names), mean, scale, coef, intercept, knots, values, info or {},
                   atlas if SHAPE in names else None)

    def save(self, path: Path) -> None:
        if SHAPE in self.features and self.atlas is None:
            raise ValueError(f"a score that reads {SHAPE!r} is saved with the atlas it was measured against")
        Path(path).write_text(json.dumps({"format": FORMAT, "features": list(self.features), "mean": self.mean,
                                          "scale": self.scale, "coef": self.coef, "intercept": self.intercept,
                                          "knots": self.knots, "values": self.values, "info": self.info,
                                          **({"atlas": self.atlas.to_json()} if self.atlas else {})}))

    @classmethod
    def load(cls, path: Path) -> QualityModel:
        """The score :meth:`save` wrote; a ValueError naming the file for anything else (a
        foreign or damaged file, or an atlas cut short), never a score half read."""
        text = Path(path).read_text()
        why = "not a quality model of this cxrlabel"
        try:
            d = json.loads(text)
            # a score fitted before a feature was added reads the features it knows
            if d.get("format") == FORMAT and set(d["features"]) <= {*FEATURES, "tta", SHAPE} and (
                    SHAPE in d["features"]) == ("atlas" in d):
                return cls(tuple(d["features"]), d["mean"], d["scale"], d["coef"], d["intercept"], d["knots"],
                           d["values"], d.get("info", {}), Atlas.from_json(d["atlas"]) if "atlas" in d else None)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why += f", or a damaged one ({type(e).__name__}: {e})"
        raise ValueError(f"{path}: {why} (refit it with bench/quality.py)")


FORMAT = "cxrlabel-quality-1"


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators), as
    knots (each pooled block's mean ``x``, ascending) and values for ``np.interp``."""
    order = np.argsort(x, kind="stable")
    blocks: list[list[float]] = []  # [sum of y, count, sum of x]
    for xi, yi in zip(x[order], y[order], strict=True):
        blocks.append([yi, 1, xi])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            y2, n2, x2 = blocks.pop()
            blocks[-1] = [blocks[-1][0] + y2, blocks[-1][1] + n2, blocks[-1][2] + x2]
    return (np.array([b[2] / b[1] for b in blocks]), np.array([b[0] / b[1] for b in blocks]))


def sidecar(checkpoint: Path, tta: bool = False) -> Path:
    """Where a checkpoint's quality model lives: ``model.pt`` -> ``model.quality.json`` (with
    ``tta``: ``model.quality-tta.json``, the score that also reads :func:`tta_agreement`)."""
    return Path(checkpoint).with_suffix(".quality-tta.json" if tta else ".quality.json")


# ---------------------------------------------------------------- test-time augmentation

TTA_SHIFT = (5.0, 3.0)  # cache pixels (x, y): the shifted copy; the other copy is darker (gamma 0.8)


def tta_copies(image: np.ndarray) -> list[np.ndarray]:
    """Two test-time-augmented copies of a ``(S, S) uint8`` cache image: shifted a few pixels,
    and darker."""
    size = image.shape[0]
    move = np.float32([[1, 0, TTA_SHIFT[0]], [0, 1, TTA_SHIFT[1]]])
    darker = np.clip((image / 255.0) ** 0.8 * 255, 0, 255).astype(np.uint8)
    return [cv2.warpAffine(image, move, (size, size)), darker]


def tta_agreement(masks: dict[str, np.ndarray], copies: list[np.ndarray], structures: list[str],
                  ) -> dict[str, float]:
    """Per structure, ``log(1.01 - mean Dice)`` between its cleaned ``(S, S)`` mask and the
    cleaned masks of the :func:`tta_copies` (their ``(C, S, S)`` probabilities, float or uint8),
    the shifted one moved back: a model unsure of an image changes its mind under them."""
    from pipeline.measure import clean
    from pipeline.metrics import dice
    size = next(iter(masks.values())).shape[0]
    back = np.float32([[1, 0, -TTA_SHIFT[0]], [0, 1, -TTA_SHIFT[1]]])
    out = {}
    for i, s in enumerate(structures):
        scores = []
        for n, probs in enumerate(copies):
            cut = 127 if probs.dtype == np.uint8 else 0.5
            m = clean(probs[i] > cut)[0]
            if n == 0:
                m = cv2.warpAffine(m.astype(np.uint8), back, (size, size), flags=cv2.INTER_NEAREST) > 0
            scores.append(dice(m, masks[s]))
        out[s] = math.log(1.01 - float(np.mean(scores)))
    return out

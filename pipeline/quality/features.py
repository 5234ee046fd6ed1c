"""What the quality score reads of one labelled image.

For every structure, :func:`structure_features` turns what labelling's compiled pass read of
the model-resolution probabilities and the cleaned mask (:func:`pipeline.compiled.clean_window`)
into the features: how far the probabilities agree with the mask, how wide the band of
uncertain pixels is, how sharp its outline, how much the clean-up threw away, how convex and
how large it is; :func:`image_features` adds the anatomy (CTR, lungs on the wrong side, a
missing structure, a collimator's rim); an :class:`Atlas` of the annotated masks says how far
each mask's shape is from the nearest one a person drew (an RCA-like check, as CheXmask's);
:func:`tta_agreement` how far the masks move under two test-time-augmented copies.
:func:`design` turns them into the regression's inputs (:mod:`pipeline.quality.score`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.imaging import collimation_rim
from pipeline.measure import bbox

STRUCTURE_FEATURES = ("agreement", "uncertain", "edge_margin", "kept", "solidity", "area")
IMAGE_FEATURES = ("ctr_off", "lungs_swapped", "missing", "rim", "heart_border")
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


Box = tuple[int, int, int, int]  # a mask's box: x0, y0, x1, y1, inclusive (pipeline.measure.bbox)


def structure_features(area: int, uncertain: int, edge_margin: float, hull: float, kept: float,
                       agreement: float, size: int) -> dict[str, float]:
    """Features of one structure of the model's output (``size``: its side), from what
    :func:`pipeline.compiled.clean_window` reads of its probabilities ``p`` and of the cleaned
    mask: the mask's ``area``, the pixels where ``0.1 < p < 0.9`` (``uncertain``), the mean of
    ``|2 p - 1|`` on the mask's outline a pixel either side (``edge_margin``), the area of its
    convex ``hull``, the share of the foreground the clean-up ``kept``, and the soft Dice of
    ``p`` against the mask (``agreement``)."""
    if area == 0:
        return {"agreement": math.log(1.01 - agreement), "uncertain": 0.0, "edge_margin": 0.0, "kept": 0.0,
                "solidity": 0.0, "area": math.log(1 / size ** 2)}
    return {
        "agreement": math.log(1.01 - agreement),  # soft Dice of p against the mask
        # pixels the model is unsure of, per pixel of mask: a wide band is a doubtful outline
        "uncertain": math.log(1e-3 + uncertain / area),
        "edge_margin": edge_margin,  # 1: a crisp outline
        "kept": math.log(max(kept, 1e-3)),  # below 0: the clean-up threw blobs away
        "solidity": min(1.0, area / max(hull, 1.0)),
        "area": math.log(area / size ** 2),
    }


def image_features(ctr: float | None, columns: dict[str, float | None], rim: float = 0.0,
                   border: float = 0.0) -> dict[str, float]:
    """Anatomy of the whole image: CTR away from the usual range, lungs on the wrong side,
    structures missing; the share of the film a collimator's rim covered (the model drew the
    anatomy on behind it: :func:`pipeline.imaging.unrimmed`); and how plainly the film shows
    the heart's borders where its width is read (:func:`heart_border`)."""
    return {
        "ctr_off": float(abs(ctr - 0.47)) if ctr is not None else 0.5,
        "lungs_swapped": float(lungs_swapped(columns)),
        "missing": float(sum(v is None for v in columns.values())),
        "rim": rim,
        "heart_border": border,
    }


BORDER_LIMITS = (-1.0, 2.0)  # heart_border's range: beyond it a film is odd, not more or less sure
BORDER_DEPTH, BORDER_GAP = 64, 128  # its strips: S / 64 deep, S / 128 off the border, each side


def heart_border(image: np.ndarray, heart: np.ndarray | None, lungs: np.ndarray | None,
                 boxes: tuple[Box | None, Box | None] | None = None) -> float:
    """How plainly the film itself shows the heart's border where its width is read (the
    CTR's numerator), whatever the model thinks of it. On each side, over the rows whose
    border lies within ``S / 64`` pixels of the heart's outermost column, the step in
    brightness across that row's border (strips ``S / 64`` deep either side, ``S / 128`` off
    the border, where a mask's outline is still uncertain), as a share of the step from the
    lungs to the heart; the smaller side's. About 1 where the
    border is as plain as the heart against the lung; near 0 or below where the model drew it
    through even grey (an apex hidden in the diaphragm, a hazy film): the width, and so the
    CTR, is a guess there. ``image``: the ``(S, S)`` film the model saw; ``heart``, ``lungs``:
    cleaned masks in that geometry; 0 where either is empty. ``boxes``: the heart's and the
    lungs' boxes (:func:`union_box`'s form; None: empty), when known: only they are read of the
    masks. About 0.1 ms at 256 px."""
    heart_box, lungs_box = boxes if boxes is not None else (bbox(heart) if heart is not None else None,
                                                              bbox(lungs) if lungs is not None else None)
    if heart is None or lungs is None or heart_box is None or lungs_box is None:
        return 0.0
    hx0, hy0, hx1, hy1 = heart_box
    lx0, ly0, lx1, ly1 = lungs_box
    img = np.asarray(image, np.float32)
    size = img.shape[1]
    step = max(float(_mean_under(image[hy0:hy1 + 1, hx0:hx1 + 1], heart[hy0:hy1 + 1, hx0:hx1 + 1])
                     - _mean_under(image[ly0:ly1 + 1, lx0:lx1 + 1], lungs[ly0:ly1 + 1, lx0:lx1 + 1])), 1.0)
    depth, gap = max(2, round(size / BORDER_DEPTH)), round(size / BORDER_GAP)
    inside = heart[hy0:hy1 + 1, hx0:hx1 + 1]
    rows = np.flatnonzero(inside.any(axis=1))
    inward = np.arange(gap, gap + depth)
    steps = []
    for edge, sign in ((hx0 + np.argmax(inside[rows], axis=1), 1),  # the image's left border of each row
                       (hx1 - np.argmax(inside[rows, ::-1], axis=1), -1)):
        outer = edge.min() if sign > 0 else edge.max()
        near = np.abs(edge - outer) < depth  # the rows that (nearly) set the width
        y, x = hy0 + rows[near][:, None], edge[near][:, None]
        inside, outside = x + sign * inward, x - sign * (inward + 1)
        if min(inside.min(), outside.min()) < 0 or max(inside.max(), outside.max()) >= size:
            return 0.0  # the heart reaches the film's edge
        steps.append(float(img[y, inside].mean() - img[y, outside].mean()) / step)
    return float(np.clip(min(steps), *BORDER_LIMITS))


def union_box(boxes: Sequence[Box | None]) -> Box | None:
    """The box around several boxes ``(x0, y0, x1, y1)``, inclusive (None: an empty mask's); None
    when every one is None."""
    there = [b for b in boxes if b is not None]
    if not there:
        return None
    return (min(b[0] for b in there), min(b[1] for b in there), max(b[2] for b in there), max(b[3] for b in there))


def _mean_under(image: np.ndarray, mask: np.ndarray) -> np.float32:
    """The mean of ``image`` where the bool ``mask`` is set (not empty), as NumPy's float32
    mean of the selected pixels reads it: for a uint8 image below 2**24 / 255 pixels every
    float32 partial sum is an exact integer, so the integer sum over float32 division is the
    same number, without gathering the pixels."""
    if image.dtype == np.uint8 and image.size < 2 ** 24 // 255:
        total = np.float32(np.sum(image, where=mask, dtype=np.int64))
        return np.float32(total / np.float32(np.count_nonzero(mask)))
    return np.float32(np.asarray(image, np.float32)[mask].mean())


def lungs_swapped(columns: dict[str, float | None]) -> bool:
    """The patient's left lung (``columns``: each structure's mean column) lies on the image's
    left: on a PA or AP film it lies on the image's right, so the film is flipped, or the
    model read it wrong."""
    left, right = columns.get("left_lung"), columns.get("right_lung")
    return left is not None and right is not None and left < right


def rim_share(cached: np.ndarray, rim: tuple[int, int, int, int] | None = None) -> float:
    """The share of a cached film that a collimator's rim covers
    (:func:`pipeline.imaging.collimation_rim`, or ``rim`` when read already)."""
    top, bottom, left, right = collimation_rim(cached) if rim is None else rim
    h, w = cached.shape
    return 1.0 - max(h - top - bottom, 0) * max(w - left - right, 0) / (h * w)


ATLAS_SIDE = 32


def atlas_frame(masks: Sequence[np.ndarray] | np.ndarray, boxes: Sequence[Box | None] | None = None) -> np.ndarray:
    """One image's structure masks (``(H, W)`` bool each) framed by the box around all of
    them and shrunk to ``ATLAS_SIDE`` square: ``(C, 32, 32)`` bool, their shapes and layout
    whatever the film's size and framing. ``boxes``: each mask's box, when known (then the
    masks are read only inside them). About 0.25 ms for three 256 px masks."""
    masks = [np.asarray(m, bool) for m in masks]
    union = union_box(boxes) if boxes is not None else bbox(np.logical_or.reduce(masks))
    if union is None:
        return np.zeros((len(masks), ATLAS_SIDE, ATLAS_SIDE), bool)
    x0, y0, x1, y1 = union
    # the masks as the channels of one image: one resize (OpenCV's channels take the same
    # weights as a mask alone), at most 4 at a time
    box = np.stack([m[y0:y1 + 1, x0:x1 + 1] for m in masks], axis=-1).astype(np.float32)
    small = [cv2.resize(box[..., i:i + 4], (ATLAS_SIDE, ATLAS_SIDE), interpolation=cv2.INTER_AREA)
             for i in range(0, len(masks), 4)]
    framed = np.concatenate([c.reshape(ATLAS_SIDE, ATLAS_SIDE, -1) for c in small], axis=-1) > 0.5
    return np.ascontiguousarray(framed.transpose(2, 0, 1))


@dataclass(frozen=True)
class Atlas:
    """The annotated images' masks, each image framed by :func:`atlas_frame`: a mask far from
    every shape a person drew is doubtful, whatever the model thinks of it (CheXmask's
    reverse classification accuracy asks the same of an atlas of annotated images)."""

    structures: tuple[str, ...]
    masks: np.ndarray  # (N, C, 32, 32) bool
    _words: np.ndarray = field(init=False, repr=False, compare=False)  # made from masks
    _counts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:  # the masks as 64-bit words, for counting overlaps by popcount
        words = np.packbits(self.masks.reshape(len(self.masks), len(self.structures), -1), axis=2)
        object.__setattr__(self, "_words", np.ascontiguousarray(words).view(np.uint64))
        object.__setattr__(self, "_counts", np.bitwise_count(self._words).sum(axis=2))

    def __reduce__(self):  # what a labelling worker receives with each task: the bits alone, 50 kB
        return _unpacked_atlas, (self.structures, np.packbits(self.masks), self.masks.shape)

    @classmethod
    def build(cls, masks: Sequence[np.ndarray], structures: Sequence[str]) -> Atlas:
        """From annotated images' masks, ``(C, H, W)`` each (bool, or soft ones cut at 0.5), of
        images whose every structure is drawn; the images may differ in size."""
        return cls(tuple(structures), np.stack([atlas_frame(m > 0.5 if m.dtype != bool else m) for m in masks]))

    def fit(self, masks: dict[str, np.ndarray], boxes: dict[str, Box | None] | None = None) -> dict[str, float]:
        """Per structure of one image's masks (``{structure: (H, W) bool}``, every structure
        of the atlas; ``boxes``: their boxes, when known): the Dice of its framed mask with the
        nearest of the atlas's (1: a shape a person drew; the score reads it as it is, which
        ranked better than its log)."""
        framed = atlas_frame([masks[s] for s in self.structures],
                             [boxes[s] for s in self.structures] if boxes is not None else None
                             ).reshape(len(self.structures), -1)
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


def _unpacked_atlas(structures: tuple[str, ...], bits: np.ndarray, shape: tuple[int, ...]) -> Atlas:
    return Atlas(structures, np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool))


# ---------------------------------------------------------------- test-time augmentation

TTA_SHIFT = (5.0, 3.0)  # cache pixels (x, y): the shifted copy; the other copy is darker (gamma 0.8)


def tta_copies(image: np.ndarray) -> list[np.ndarray]:
    """Two test-time-augmented copies of a ``(S, S) uint8`` cache image: shifted a few pixels,
    and darker."""
    size = image.shape[0]
    move = np.array([[1, 0, TTA_SHIFT[0]], [0, 1, TTA_SHIFT[1]]], np.float32)
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
    back = np.array([[1, 0, -TTA_SHIFT[0]], [0, 1, -TTA_SHIFT[1]]], np.float32)
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

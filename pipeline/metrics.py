"""Metrics shared by training, evaluation, reports, quality scores and benches: Dice, ROC AUC."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two same-shape arrays: boolean masks, or a probability map against a mask
    (soft Dice, summed in float32). 1.0 when both are empty."""
    overlap: float
    total: float
    if a.dtype == bool and b.dtype == bool:
        overlap, total = int(np.count_nonzero(a & b)), int(a.sum()) + int(b.sum())
    else:
        a, b = a.astype(np.float32), b.astype(np.float32)
        overlap, total = (a * b).sum(), float(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * overlap / total)


def auc(positive, negative) -> float:
    """Area under the ROC curve of scores for ``positive`` against ``negative`` items (the
    Mann-Whitney statistic, ties counted half). NaN when either side is empty."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    both = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties averaged."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def auc_interval(positive, negative, z: float = 1.959964) -> tuple[float, float, float]:
    """The AUC of :func:`auc` and its 95% confidence interval by DeLong's method (DeLong,
    DeLong and Clarke-Pearson 1988: the variance from each item's placement among the other
    side, as Sun and Xu 2014 compute it from midranks), clipped to [0, 1]. NaN where either
    side has fewer than two items."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        return auc(pos, neg), float("nan"), float("nan")
    both = _midranks(np.concatenate([pos, neg]))
    v10 = (both[:m] - _midranks(pos)) / n  # each positive: the share of negatives below it
    v01 = 1 - (both[m:] - _midranks(neg)) / m  # each negative: the share of positives above it
    area = float(v10.mean())
    half = z * float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))
    return area, max(0.0, area - half), min(1.0, area + half)

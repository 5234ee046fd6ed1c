"""Overlap metrics shared by training, evaluation, quality scores and benches."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two same-shape arrays: boolean masks, or a probability map against a mask
    (soft Dice, summed in float32). 1.0 when both are empty."""
    if a.dtype == bool and b.dtype == bool:
        overlap, total = int(np.count_nonzero(a & b)), int(a.sum()) + int(b.sum())
    else:
        a, b = a.astype(np.float32), b.astype(np.float32)
        overlap, total = (a * b).sum(), float(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * overlap / total)

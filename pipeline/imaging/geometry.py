"""Where a cache image's pixels come from: ``cache = (original + offset) * scale`` per axis, in
continuous pixel coordinates (pixel ``i`` covers ``[i, i+1)``); :class:`Geometry` maps arrays
both ways."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

MODES = ("pad", "stretch")  # cache geometry: keep the aspect ratio and pad, or rescale each axis


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Affine map between an original image and its square cache entry.

    ``cache = (original + offset) * scale`` for x (columns) and y (rows), continuous coords.
    """

    orig_height: int
    orig_width: int
    size: int
    mode: str  # "pad" (keep aspect, pad to square) or "stretch" (rescale each axis)
    offset_x: float
    offset_y: float
    scale_x: float
    scale_y: float

    @classmethod
    def fit(cls, height: int, width: int, size: int, mode: str = "pad") -> Geometry:
        if height < 1 or width < 1 or size < 1:
            raise ValueError(f"bad geometry: {height}x{width} -> {size}")
        if mode == "stretch":
            return cls(height, width, size, mode, 0.0, 0.0, size / width, size / height)
        if mode != "pad":
            raise ValueError(f"unknown geometry mode {mode!r}: use 'pad' or 'stretch'")
        side = max(height, width)
        return cls(height, width, size, mode, (side - width) / 2, (side - height) / 2,
                   size / side, size / side)

    def matrix(self, inverse: bool = False) -> np.ndarray:
        """2x3 affine matrix between pixel *centres* (OpenCV's convention), original -> cache."""
        # centre_c = (centre_o + 0.5 + offset) * scale - 0.5
        m = np.array([
            [self.scale_x, 0.0, (0.5 + self.offset_x) * self.scale_x - 0.5],
            [0.0, self.scale_y, (0.5 + self.offset_y) * self.scale_y - 0.5],
        ])
        return cv2.invertAffineTransform(m) if inverse else m

    def film_box(self) -> tuple[float, float, float, float]:
        """Where the film lies in its cache entry, padding left out: ``(x0, y0, x1, y1)``,
        the first and last cache pixels it covers (continuous, may be fractional)."""
        return (self.offset_x * self.scale_x, self.offset_y * self.scale_y,
                (self.orig_width + self.offset_x) * self.scale_x - 1,
                (self.orig_height + self.offset_y) * self.scale_y - 1)

    def point_to_cache(self, x: float, y: float) -> tuple[int, int]:
        """Pixel centre ``(x, y)`` of the original -> nearest cache pixel (for drawing)."""
        (cx, cy) = self.matrix() @ np.array([x, y, 1.0])
        return int(round(cx)), int(round(cy))

    def to_cache(self, arr: np.ndarray) -> np.ndarray:
        """Original ``(H, W)`` array -> ``(S, S)`` float32 (area-averaged when shrinking)."""
        return _warp(arr, self.matrix(), (self.size, self.size))

    def to_original(self, arr: np.ndarray) -> np.ndarray:
        """Cache ``(S, S)`` array (e.g. probabilities) -> ``(H, W)`` float32, bilinear (edge
        values replicated beyond the cache's edge). Labelling maps masks back without it:
        :meth:`runs_above` gives the same pixels, thresholded, without the full-size array."""
        self._check_cache_shape(arr)
        return cv2.warpAffine(arr.astype(np.float32), self.matrix(inverse=True),
                              (self.orig_width, self.orig_height),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def runs_above(self, arr: np.ndarray, level: float = 0.5) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Where :meth:`to_original` of each ``(S, S)`` cache array in ``arr`` (``(C, S, S)``)
        exceeds ``level``, as runs of original pixels: per array, ``(rows, first, last)``
        int64 arrays (columns inclusive, sorted by row and column), found without building
        any original-size array.

        Bilinear interpolation is linear along an original row between two cache columns, so
        each crossing of ``level`` is solved exactly, and only in the cache cells whose
        corners straddle it: the work grows with the outlines, not the areas.
        """
        self._check_cache_shape(arr[0])
        n, size = len(arr), self.size
        # only the box around what lies above level, and a ring of cells around it, can hold a
        # crossing: the field is that box (and a pixel more each side), in the coordinates of the
        # whole array ringed by a pixel below level (`y0`, `x0`: the box's origin there)
        boxed = _boxed_field(arr, level)
        if boxed is None:
            empty = np.zeros(0, np.int64)
            return [(empty, empty, empty) for _ in range(n)]
        field, y0, x0 = boxed
        above = field > level
        corner = above[:, :-1, :-1]
        straddle = (corner != above[:, :-1, 1:]) | (corner != above[:, 1:, :-1]) | (corner != above[:, 1:, 1:])
        # the cell row above each original row's centre, and how far down the cell it lies;
        # beyond the edge rows, the edge row's values (OpenCV's BORDER_REPLICATE)
        v = np.clip((np.arange(self.orig_height) + 0.5 + self.offset_y) * self.scale_y - 0.5, 0, size - 1)
        k, t = np.floor(v).astype(np.int64) + 1, v - np.floor(v)
        index = np.flatnonzero(straddle)  # in (array, row, column) order
        high, wide = field.shape[1:]
        layer, rest = np.divmod(index, (high - 1) * (wide - 1))
        box_rows, box_cols = np.divmod(rest, wide - 1)
        cell_rows, cell_cols = box_rows + y0, box_cols + x0  # in the whole ringed array
        flat = field.reshape(n, -1)
        at = layer, box_rows * wide + box_cols
        below = layer, at[1] + wide
        top_l, top_r = flat[at], flat[at[0], at[1] + 1]
        drop_l, drop_r = flat[below] - top_l, flat[below[0], below[1] + 1] - top_r
        row, cell = _rows_across(layer * (size + 1) + cell_rows, cell_rows, k)
        left = top_l[cell] + t[row] * drop_l[cell]
        right = top_r[cell] + t[row] * drop_r[cell]
        rising = right > level
        crossing = np.flatnonzero((left > level) != rising)  # in, out, in... along each row
        row, cell, rising = row[crossing], cell[crossing], rising[crossing]
        left, right = left[crossing], right[crossing]
        col = cell_cols[cell]
        u = col - 1 + (level - left) / (right - left)  # cache column of the crossing
        x = (u + 0.5) / self.scale_x - 0.5 - self.offset_x  # ... and original column
        # beyond the edge columns, the edge column's values: out to the original's border
        x[(col == 0) & rising] = -1.0
        x[(col == size) & ~rising] = self.orig_width
        if not (rising[0::2].all() and not rising[1::2].any()):
            raise ValueError("unpaired level crossings: the array is not finite")
        return _runs(row[0::2], x, layer[cell[0::2]], n, self.orig_width)

    def _check_cache_shape(self, arr: np.ndarray) -> None:
        if arr.shape != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} array, got {arr.shape}")

    def as_row(self) -> dict[str, float | int | str]:
        return dataclasses.asdict(self)


def _rows_across(key: np.ndarray, cell_rows: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each straddling cell (``key``: its array and cell row, sorted; ``cell_rows``: its cell
    row), once for every original row across it (``k``: each original row's cell row, sorted):
    ``(original row, cell)`` pairs in (array, row, column) order. The cells of one cell row of
    one array are consecutive."""
    group_start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else key
    group_size = np.diff(np.r_[group_start, len(key)])
    lo = np.searchsorted(k, cell_rows[group_start], "left")
    pairs = (np.searchsorted(k, cell_rows[group_start], "right") - lo) * group_size
    group = np.repeat(np.arange(len(group_start)), pairs)
    nth = np.arange(len(group)) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    return lo[group] + nth // group_size[group], group_start[group] + nth % group_size[group]


def _runs(row: np.ndarray, x: np.ndarray, which: np.ndarray, n: int, width: int
          ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Runs of original pixels from paired crossings (``x``: in, out, in... original columns,
    each pair on ``row``, of array ``which``): the pixel centres strictly inside each pair,
    per array of ``n``."""
    first = np.maximum(np.floor(x[0::2]).astype(np.int64) + 1, 0)
    last = np.minimum(np.ceil(x[1::2]).astype(np.int64) - 1, width - 1)
    keep = first <= last
    row, first, last, which = row[keep], first[keep], last[keep], which[keep]
    bounds = np.searchsorted(which, np.arange(n + 1))
    return [(row[i:j], first[i:j], last[i:j]) for i, j in zip(bounds[:-1], bounds[1:], strict=True)]


def _boxed_field(arr: np.ndarray, level: float) -> tuple[np.ndarray, int, int] | None:
    """``arr`` (``(C, S, S)``) ringed by a pixel below ``level``, cut to the box around what
    lies above it and a pixel more each side (float64), with the box's origin in the ringed
    array's coordinates; None when nothing lies above ``level``."""
    n, size = len(arr), arr.shape[-1]
    over: np.ndarray = np.any(arr > level, axis=0)
    ys, xs = np.flatnonzero(over.any(axis=1)), np.flatnonzero(over.any(axis=0))
    if len(ys) == 0:
        return None
    y0, x0 = int(ys[0]), int(xs[0])
    field = np.zeros((n, int(ys[-1]) - y0 + 3, int(xs[-1]) - x0 + 3))
    r0, r1, c0, c1 = max(y0 - 1, 0), min(int(ys[-1]) + 2, size), max(x0 - 1, 0), min(int(xs[-1]) + 2, size)
    field[:, r0 - y0 + 1:r1 - y0 + 1, c0 - x0 + 1:c1 - x0 + 1] = arr[:, r0:r1, c0:c1]
    return field, y0, x0


def _warp(arr: np.ndarray, m: np.ndarray, out_wh: tuple[int, int]) -> np.ndarray:
    """Affine resample with anti-aliasing: integer area pre-shrink, then bilinear warp."""
    arr = arr.astype(np.float32, copy=False)
    shrink = int(min(1 / m[0, 0], 1 / m[1, 1]) // 2)
    if shrink >= 2:
        h, w = arr.shape
        small = cv2.resize(arr, (max(1, w // shrink), max(1, h // shrink)),
                           interpolation=cv2.INTER_AREA)
        m = _from_smaller_source(m, w / small.shape[1], h / small.shape[0])
        arr = small
    return cv2.warpAffine(arr, m, out_wh, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def _from_smaller_source(m: np.ndarray, fx: float, fy: float, block: bool = True) -> np.ndarray:
    """Re-base a centre-to-centre matrix onto a source shrunk by ``fx``, ``fy``.

    A shrunk pixel centre ``c`` lies at ``(c + 0.5) * f - 0.5`` in the full-size source when
    each shrunk pixel summarises a block (area resize, JPEG DCT scaling), and at ``c * f``
    when it sits on every f-th source pixel (JPEG 2000's low-pass resolution levels).
    """
    out = m.copy()
    if block:
        out[0, 2] += m[0, 0] * (0.5 * fx - 0.5)
        out[1, 2] += m[1, 1] * (0.5 * fy - 0.5)
    out[0, 0] *= fx
    out[1, 1] *= fy
    return out

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

    def runs_above(self, arr: np.ndarray, level: float = 0.5, boxes: np.ndarray | None = None,
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Where :meth:`to_original` of each ``(S, S)`` cache array in ``arr`` (``(C, S, S)``)
        exceeds ``level``, as runs of original pixels: per array, ``(rows, first, last)``
        int64 arrays (columns inclusive, sorted by row and column), found without building
        any original-size array. ``boxes``: ``(C, 4)``, each array's cache rows ``[y0, y1)``
        and columns ``[x0, x1)`` beyond which it does not exceed ``level``, when known (only
        they are read); None: the whole arrays.

        Bilinear interpolation is linear along an original row between two cache columns, so
        each crossing of ``level`` is solved exactly, and only in the cache cells whose
        corners straddle it: the work grows with the outlines, not the areas.
        """
        from pipeline import compiled  # numba: its import is paid only where masks are mapped back

        self._check_cache_shape(arr[0])
        # the cell row above each original row's centre (in the array ringed by a pixel below
        # level), and how far down the cell it lies; beyond the edge rows, the edge row's
        # values (OpenCV's BORDER_REPLICATE)
        v = np.clip((np.arange(self.orig_height) + 0.5 + self.offset_y) * self.scale_y - 0.5, 0, self.size - 1)
        k, t = np.floor(v).astype(np.int64) + 1, v - np.floor(v)
        field = np.ascontiguousarray(arr, np.float32 if arr.dtype == np.float32 else np.float64)
        if boxes is None:
            boxes = np.tile(np.array([0, self.size, 0, self.size], np.int64), (len(arr), 1))
        which, rows, first, last = compiled.runs_above(field, float(level), k, t, float(self.scale_x),
                                                       float(self.offset_x), int(self.orig_width),
                                                       np.ascontiguousarray(boxes, np.int64))
        bounds = np.searchsorted(which, np.arange(len(arr) + 1))
        return [(rows[i:j], first[i:j], last[i:j]) for i, j in zip(bounds[:-1], bounds[1:], strict=True)]

    def _check_cache_shape(self, arr: np.ndarray) -> None:
        if arr.shape != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} array, got {arr.shape}")

    def as_row(self) -> dict[str, float | int | str]:
        return dataclasses.asdict(self)


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

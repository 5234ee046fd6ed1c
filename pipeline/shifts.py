"""Equipment-like shifts of a cached image (and its masks): what another clinic's machines
and settings do to a chest film, for testing how labelling and its quality score hold up.

Each shift takes a ``(S, S) uint8`` cache image, its ``(C, S, S)`` float masks in cache
geometry and a strength in ``(0, 1]``, and returns both shifted (masks move only with the
geometric shifts). Pure functions of their arguments and a numpy ``Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Shift = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _unit(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def gamma(img, masks, strength, rng):
    """A gamma curve (exposure and detector response): exponent up to 2.5x either way."""
    g = float(np.exp(rng.choice([-1, 1]) * strength * np.log(2.5)))
    return _uint8(_unit(img) ** g), masks


def contrast(img, masks, strength, rng):
    """A flatter or steeper window around mid-grey (another VOI LUT)."""
    k = float(np.exp(rng.choice([-1, 1]) * strength * np.log(2.5)))
    return _uint8((_unit(img) - 0.5) * k + 0.5), masks


def noise(img, masks, strength, rng):
    """Quantum noise of a low dose: Gaussian, sigma up to 0.1 of the range."""
    return _uint8(_unit(img) + rng.normal(0, 0.1 * strength, img.shape)), masks


def blur(img, masks, strength, rng):
    """A softer detector or motion: Gaussian blur, sigma up to 3 cache pixels."""
    return cv2.GaussianBlur(img, (0, 0), 0.3 + 2.7 * strength), masks


def low_resolution(img, masks, strength, rng):
    """A low-resolution source: down to a quarter of the side and back up."""
    s = img.shape[0]
    small = max(16, int(round(s * (1 - 0.75 * strength))))
    down = cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA)
    return cv2.resize(down, (s, s), interpolation=cv2.INTER_LINEAR), masks


def jpeg(img, masks, strength, rng):
    """Lossy archiving: JPEG at quality 60 down to 5."""
    q = int(round(60 - 55 * strength))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), masks


def inverted(img, masks, strength, rng):
    """A MONOCHROME1 image read as MONOCHROME2: bone dark, lungs bright."""
    return 255 - img, masks


def collimation(img, masks, strength, rng):
    """A collimator's rim: bright (unexposed) bands up to 15% deep on each side."""
    out = img.copy()
    s = img.shape[0]
    for side in range(4):
        d = int(round(s * 0.15 * strength * rng.uniform(0.5, 1.0)))
        if d:
            if side == 0:
                out[:d] = 235
            elif side == 1:
                out[-d:] = 235
            elif side == 2:
                out[:, :d] = 235
            else:
                out[:, -d:] = 235
    return out, masks


def _affine(img, masks, m):
    s = img.shape[0]
    warped = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    moved = np.stack([cv2.warpAffine(c, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                     borderValue=0) for c in masks.astype(np.float32)])
    return warped, moved


def rotation(img, masks, strength, rng):
    """A tilted patient: rotation up to 15 degrees either way."""
    s = img.shape[0]
    angle = float(rng.choice([-1, 1]) * 15 * strength)
    return _affine(img, masks, cv2.getRotationMatrix2D((s / 2, s / 2), angle, 1.0))


def crop(img, masks, strength, rng):
    """A tighter field of view: zoomed in up to 1.4x about a point near the centre."""
    s = img.shape[0]
    z = 1 + 0.4 * strength
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05) * s, s / 2 + rng.uniform(-0.05, 0.05) * s
    m = np.array([[z, 0, (1 - z) * cx], [0, z, (1 - z) * cy]], np.float64)
    return _affine(img, masks, m)


def aspect(img, masks, strength, rng):
    """A different aspect or patient build: one axis scaled by up to 0.8 (about the centre)."""
    s = img.shape[0]
    f = 1 - 0.2 * strength
    fx, fy = (f, 1.0) if rng.random() < 0.5 else (1.0, f)
    m = np.array([[fx, 0, (1 - fx) * s / 2], [0, fy, (1 - fy) * s / 2]], np.float64)
    return _affine(img, masks, m)


SHIFTS: dict[str, Shift] = {
    "gamma": gamma, "contrast": contrast, "noise": noise, "blur": blur,
    "low_resolution": low_resolution, "jpeg": jpeg, "inverted": inverted,
    "collimation": collimation, "rotation": rotation, "crop": crop, "aspect": aspect,
}


def apply(name: str, img: np.ndarray, masks: np.ndarray, strength: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One named shift (see :data:`SHIFTS`)."""
    return SHIFTS[name](img, masks, strength, rng)

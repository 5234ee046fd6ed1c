"""What makes an odd film one the model knows, applied in one place (:func:`fixed_up`, the steps a
model's spec names): a grey scale read inverted turned back, a collimator's rim filled, strong
noise smoothed; and the model's input normalisation (:func:`model_input`)."""

from __future__ import annotations

import cv2
import numpy as np

NORMS = ("zscore", "clahe")

INVERTED_BELOW = -0.25  # polarity of a frontal film read the wrong way round (normal films: 0.27 and up)


def polarity(cached: np.ndarray) -> float:
    """How a frontal chest film reads: the mediastinal strip (middle tenth of the columns,
    30-75% of the height) against the lung fields beside it (18-35% and 65-82% of the
    columns), in standard deviations of the image. Positive as displayed (bright mediastinum,
    dark lungs): 0.27 to 1.7 on the 307 films checked (annotated set, demo clinic, NIH and
    DICOM samples). Negative when the grey scale is inverted, as a MONOCHROME1 image read as
    MONOCHROME2 (or the reverse) is."""
    a = cached.astype(np.float32)
    s = a.shape[0]
    rows = slice(int(0.3 * s), int(0.75 * s))
    centre = a[rows, int(0.45 * s):int(0.55 * s)].mean()
    lungs = (a[rows, int(0.18 * s):int(0.35 * s)].mean() + a[rows, int(0.65 * s):int(0.82 * s)].mean()) / 2
    return float((centre - lungs) / (a.std() + 1e-6))


def upright(cached: np.ndarray) -> tuple[np.ndarray, bool]:
    """The cached image the right way round: inverted back when :func:`polarity` says its
    grey scale is reversed (an inverted film gives the model nothing it knows). Geometry is
    untouched, so masks need no change. Returns ``(image, whether it was inverted)``."""
    if polarity(cached) < INVERTED_BELOW:
        return (255 - cached if cached.dtype == np.uint8 else 255.0 - cached), True
    return cached, False


RIM_BRIGHTER_THAN = 150  # grey levels: a collimator's unexposed band reads bright (padding is black)


def collimation_rim(cached: np.ndarray) -> tuple[int, int, int, int]:
    """How deep a collimator's rim reaches in from each side (top, bottom, left, right),
    in pixels: the run of lines from that edge that are flat (standard deviation under 1.5
    grey levels), alike (within 2 of the edge line) and bright (above
    :data:`RIM_BRIGHTER_THAN`), at most a third of the side; 0 where there is none or only
    one line. No film of the annotated set has one."""
    a = cached.astype(np.float32)
    depths = []
    for lines in (a, a[::-1], a.T, a.T[::-1]):
        edge = float(lines[0].mean())
        d = 0
        if edge > RIM_BRIGHTER_THAN:
            while d < len(lines) // 3 and lines[d].std() < 1.5 and abs(float(lines[d].mean()) - edge) < 2:
                d += 1
        depths.append(d if d >= 2 else 0)
    return depths[0], depths[1], depths[2], depths[3]


def unrimmed(cached: np.ndarray, rim: tuple[int, int, int, int] | None = None,
             ) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """The image with a collimator's rim (:func:`collimation_rim`) filled by the film's own
    content mirrored across the rim's inner edge, so the model sees a chest rather than a
    white band it never trained on, and draws the anatomy on through (the lungs go on
    behind a collimator). On the quality bench's rims (7-15% of each side) the fold
    models keep 0.939 and 0.917 of 0.944 mean Dice instead of 0.903 and 0.812. ``rim``: its
    :func:`collimation_rim`, when the caller has read it already. Returns ``(image, the rim's
    depths when one was filled, else None)``."""
    top, bottom, left, right = rim = collimation_rim(cached) if rim is None else rim
    if not any(rim):
        return cached, None
    h, w = cached.shape
    inner = np.ascontiguousarray(cached[top:h - bottom, left:w - right])
    return cv2.copyMakeBorder(inner, top, bottom, left, right, cv2.BORDER_REFLECT), rim


NOISY_ABOVE = 8.0  # grey levels: beyond training's noise augmentation (sigma 0.03 of the range, 7.7)

_LAPLACE_PAIR = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(cached: np.ndarray) -> float:
    """The image's pixel noise, in grey levels (Immerkaer's estimate: the mean absolute
    response to a mask that cancels smooth structure, scaled to a Gaussian's sigma). Chest
    films in the cache read 0.3-3.5 (the shared data's GeneralBlockchain, NIH and DICOM
    films at 256 px); low-dose noise of sigma 0.05-0.1 of the range reads 12-25."""
    a = cached.astype(np.float32)
    if min(a.shape) < 3:
        return 0.0
    response = cv2.filter2D(a, -1, _LAPLACE_PAIR)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(response).mean() / 6)


def denoised(cached: np.ndarray) -> tuple[np.ndarray, float | None]:
    """The image smoothed when it is noisier than anything the model trained on
    (:data:`NOISY_ABOVE`), by a Gaussian of sigma noise/10 pixels (0.8-3): on the quality
    bench's strongest noise this keeps 0.937 of 0.944 mean Dice where the raw image keeps
    0.923, and a clean film is never touched. Returns ``(image, the noise found when it
    smoothed, else None)``."""
    sigma = noise_sigma(cached)
    if sigma < NOISY_ABOVE:
        return cached, None
    return cv2.GaussianBlur(cached, (0, 0), min(3.0, max(0.8, sigma / 10))), sigma


def model_input(cached: np.ndarray, norm: str = "zscore") -> np.ndarray:
    """Cached ``(S, S) uint8`` -> ``(1, S, S) float32``, z-scored over the image.

    ``norm="clahe"`` first equalises contrast in an 8 x 8 grid of tiles (clip limit 2), which
    brings out the lung behind the heart and the diaphragm under soft tissue, whatever the
    exposure. Float input (augmented training images on the 0-255 scale) is rounded first.
    """
    if norm == "clahe":
        u8 = cached if cached.dtype == np.uint8 else np.clip(np.rint(cached), 0, 255).astype(np.uint8)
        cached = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(u8)
    elif norm != "zscore":
        raise ValueError(f"unknown input normalisation {norm!r}: use one of {', '.join(NORMS)}")
    x = cached.astype(np.float32)
    std = float(x.std())
    return ((x - float(x.mean())) / (std if std > 1e-6 else 1.0))[None]


# The film fix-ups labelling applies before the model, in this order: a film read inverted is
# turned back (`upright`), a collimator's rim filled (`unrimmed`), strong noise smoothed
# (`denoised`). A model's spec names the ones it was trained to expect (ModelSpec.fixups).
FIXUPS = ("upright", "unrim", "denoise")


def fixed_up(cached: np.ndarray, steps: tuple[str, ...] = FIXUPS,
             rim: tuple[int, int, int, int] | None = None, turned: bool = False) -> np.ndarray:
    """``cached`` through the fix-ups ``steps`` (of :data:`FIXUPS`), the one place they are
    applied. ``rim``: its :func:`collimation_rim`, when read already; ``turned``: the caller
    has turned it upright already (and read the rim after)."""
    if "upright" in steps and not turned:
        cached = upright(cached)[0]
    if "unrim" in steps:
        cached = unrimmed(cached, rim)[0]
    if "denoise" in steps:
        cached = denoised(cached)[0]
    return cached

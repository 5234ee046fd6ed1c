"""DICOM (pydicom, pylibjpeg; reduced-size JPEG 2000 and JPEG decodes) and raster files (Pillow)
to ``(H, W) float32`` in ``[0, 1]``, display sense, and the cache's ``(S, S) uint8``
(:func:`preprocess`)."""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from pathlib import Path
from typing import cast

import cv2
import numpy as np

from pipeline.imaging.files import (
    NOT_XRAY_MODALITIES,
    DecodeError,
    NotAnXray,
    check_codestream,
    check_content,
    check_dimensions,
    check_native_length,
    is_dicom,
    open_regular,
)
from pipeline.imaging.geometry import Geometry, _from_smaller_source, _warp

log = logging.getLogger(__name__)


def _to_unit(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    if lo is None or hi is None:
        lo, hi = (float(v) for v in np.percentile(arr[:: max(1, arr.shape[0] // 256)], (0.5, 99.5)))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        raise DecodeError("image has no contrast (constant pixel values)")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def _reduced_frame(ds, target: int) -> tuple[np.ndarray, str] | None:
    """A single grey frame larger than ``2 * target`` decoded at reduced size, and how
    (``"dct"`` or ``"wavelet"``, see :func:`_from_smaller_source`), or None.

    JPEG baseline: DCT scaling. JPEG 2000 (lossless or lossy): the codestream's wavelet
    resolution levels (the low-pass image, so no aliasing), via Pillow's OpenJPEG. Other
    syntaxes, and frames these decoders cannot take, return None (decoded at full size).
    The result holds stored values, ready for the modality and VOI LUTs.
    """
    from PIL import Image
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if (syntax not in (JPEGBaseline8Bit, JPEG2000, JPEG2000Lossless) or int(ds.get("NumberOfFrames", 1) or 1) > 1
            or str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2")
            or min(int(ds.Rows), int(ds.Columns)) <= 2 * target):
        return None
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    if syntax == JPEGBaseline8Bit:
        img = Image.open(io.BytesIO(frame))
        img.draft("L", (target, target))
        return np.asarray(img.convert("L")), "dct"
    arr = _reduced_j2k(frame, target)
    return None if arr is None else (arr, "wavelet")


def _reduced_j2k(frame: bytes, target: int) -> np.ndarray | None:
    """A JPEG 2000 codestream decoded ``r`` resolution levels down, the smaller side staying
    at least ``target``; None for what this path does not take (signed or multi-component
    data, image offsets)."""
    siz = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (also inside a JP2 wrapper)
    cod = frame.find(b"\xff\x52", siz)
    if siz < 0 or cod < 0:
        return None
    width, height, x_off, y_off = struct.unpack(">IIII", frame[siz + 8:siz + 24])
    (components,) = struct.unpack(">H", frame[siz + 40:siz + 42])
    ssiz = frame[siz + 42]
    levels = frame[cod + 9]  # SPcod: number of decomposition levels
    if components != 1 or ssiz & 0x80 or x_off or y_off:
        return None
    precision = (ssiz & 0x7F) + 1
    r = min(levels, _halvings(min(width, height), target))
    if r == 0:
        return None
    try:
        img = _j2k_at_level(frame, r, width, height)
    except Exception as e:  # a Pillow whose internals moved: the public path below
        log.debug("exact-size JPEG 2000 reduce failed (%s); using Pillow's reduce", e)
        # Pillow sizes the reduced image as (n + p/2) // p, OpenJPEG as ceil(n / p): where
        # they differ Pillow reports a broken stream, so take the largest r where they agree
        while r > 1 and any((n + 2 ** (r - 1)) // 2 ** r != -(-n // 2 ** r) for n in (width, height)):
            r -= 1
        from PIL import Image
        img = Image.open(io.BytesIO(frame))
        img.reduce = r  # type: ignore[method-assign, assignment]  # Pillow's JPEG 2000 plugin reads it so
        img.load()
    arr = np.asarray(img)
    if img.mode == "I;16":  # Pillow scales stored values up to 16 bits
        return arr >> (16 - precision) if precision < 16 else arr
    if img.mode == "L":
        return arr >> (8 - precision) if precision < 8 else arr
    return None


def _j2k_at_level(frame: bytes, r: int, width: int, height: int):
    """Pillow image of a codestream decoded ``r`` levels down at OpenJPEG's own size,
    ``ceil(n / 2**r)`` (Pillow's ``reduce`` rounds differently and then fails on some sizes).
    Sets the tile Pillow would set, with the right extent; checked by the caller's tests."""
    from PIL import Image, ImageFile
    img = Image.open(io.BytesIO(frame))
    p = 2 ** r
    size = (-(-width // p), -(-height // p))
    tile = img.tile[0]
    codec, _reduce, layers, fd, length = cast(tuple, tile.args)
    img._size = size
    img.tile = [ImageFile._Tile(tile.codec_name, (0, 0, *size), tile.offset, (codec, r, layers, fd, length))]
    img.load()
    if img.size != size:
        raise ValueError(f"decoded {img.size}, expected {size}")
    return img


def decode_dicom(path: Path, target: int | None = None) -> tuple[np.ndarray, dict]:
    """DICOM -> ``(h, w) float32 [0, 1]``, display convention, and header facts.

    With ``target``, a grey frame larger than twice it comes back smaller: JPEG baseline and
    JPEG 2000 decode at reduced size, other frames are block-averaged before the LUTs. The
    original size is in ``facts["shape"]``, how it was reduced in ``facts["reduced"]``.
    """
    import pydicom

    with open_regular(path) as f:
        try:
            ds = pydicom.dcmread(f)  # every element read now (no deferred reads from the file later)
        except Exception as e:  # pydicom raises many types for damaged files
            raise DecodeError(f"{path}: not readable as DICOM ({e})") from e
    try:
        return _decode_dataset(path, ds, target)
    except DecodeError:
        raise
    except Exception as e:  # pydicom parses each element when it is first read: a damaged one
        # (an unknown value representation, a value cut short) raises its own types there
        raise DecodeError(f"{path}: a damaged DICOM element ({e})") from e


def _decode_dataset(path: Path, ds, target: int | None) -> tuple[np.ndarray, dict]:
    """:func:`decode_dicom` on the dataset read from ``path``."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    modality = str(ds.get("Modality", "")).upper()
    if modality in NOT_XRAY_MODALITIES:
        raise NotAnXray(f"{path}: modality {modality} is not a projection radiograph")
    if "PixelData" not in ds:
        raise NotAnXray(f"{path}: no pixel data")
    try:
        rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as e:
        raise DecodeError(f"{path}: no usable Rows/Columns in the header ({e})") from e
    check_dimensions(path, rows, cols, frames)
    check_codestream(path, ds, rows, cols)
    check_native_length(path, ds, rows, cols, frames)
    reduced = None
    if target:
        try:
            reduced = _reduced_frame(ds, target)
        except Exception as e:  # the full decode below may still manage: it decides
            log.debug("%s: reduced-size decode failed (%s); decoding the whole frame", path, e)
    try:
        pixels = reduced[0] if reduced is not None else ds.pixel_array
    except Exception as e:
        raise DecodeError(f"{path}: pixel data cannot be decoded "
                          f"({ds.file_meta.get('TransferSyntaxUID', '?')}): {e}") from e
    if reduced is None and pixels.shape[(1 if frames > 1 else 0):][:2] != (rows, cols):
        raise DecodeError(f"{path}: decoded to {pixels.shape} pixels, not the header's {cols} x {rows}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    facts = {"photometric": photometric, "shape": (int(ds.Rows), int(ds.Columns)),
             "reduced": reduced[1] if reduced is not None else None}
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim == 3:
            pixels = _grey_from_rgb(pixels)
        return _to_unit(pixels), facts
    if target and reduced is None and min(pixels.shape) > 2 * target:
        # a frame decoded whole: shrink the stored values before the LUTs, which then run
        # on a fraction of the pixels (they dominate the time of uncompressed and RLE files)
        small = _block_mean(pixels, target)
        if small is not None:
            pixels, facts["reduced"] = small, "block"
    arr = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" not in ds and "WindowCenter" in ds and not _window_usable(ds):
        facts["window"] = "left out: WindowCenter/Width not finite numbers with a positive width"
        unit = _to_unit(arr)  # the full range, as a film without a window is read
    elif "VOILUTSequence" in ds or "WindowCenter" in ds:
        arr = apply_voi_lut(arr, ds, index=0)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        # windowed output spans the VOI output range; normalise by the window's own range
        if "VOILUTSequence" not in ds:
            lo, hi = _window_output_range(ds, arr)
        unit = _to_unit(arr, lo, hi)
    else:
        unit = _to_unit(arr)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit, facts


def _halvings(side: int, target: int) -> int:
    """How many times ``side`` can be halved (rounding up) and stay at least ``target``."""
    r = 0
    while -(-side // 2 ** (r + 1)) >= target:
        r += 1
    return r


def _block_mean(arr: np.ndarray, target: int) -> np.ndarray | None:
    """Mean over f x f blocks, f the largest power of two keeping the smaller side at least
    ``target``; edges padded by replication, so pixel i covers ``[i * f, (i + 1) * f)``.

    The dtype is kept (means rounded), so LUT sequences can still index the values; None for
    dtypes OpenCV does not average (the frame is then used whole).
    """
    if arr.dtype not in (np.uint8, np.uint16, np.int16):
        return None
    f = 2 ** _halvings(min(arr.shape), target)
    h, w = arr.shape
    padded = cv2.copyMakeBorder(arr, 0, -h % f, 0, -w % f, cv2.BORDER_REPLICATE)
    return cv2.resize(padded, (padded.shape[1] // f, padded.shape[0] // f), interpolation=cv2.INTER_AREA)


def _window_usable(ds) -> bool:
    """Whether the header's first window is one: a finite centre and a finite, positive width
    (a NaN centre made every pixel NaN, read as a blank image)."""
    def first(v):
        try:
            return float(v[0] if isinstance(v, list | tuple) or getattr(v, "VM", 1) > 1 else v)
        except (TypeError, ValueError, IndexError):
            return float("nan")
    centre, width = first(ds.get("WindowCenter")), first(ds.get("WindowWidth"))
    return bool(np.isfinite(centre) and np.isfinite(width) and width > 0)


def _window_output_range(ds, arr: np.ndarray) -> tuple[float, float]:
    """pydicom's windowing maps onto the stored value range; use that range as [0, 1]."""
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return float(np.min(arr)), float(np.max(arr))
    lo = -(2 ** (bits - 1)) if signed else 0
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return float(lo), float(hi)


def _grey_from_rgb(arr: np.ndarray) -> np.ndarray:
    rgb = arr[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decode_raster(path: Path, target: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG/JPEG/TIFF/BMP in 8 or 16 bits, grey/RGB/RGBA/palette -> ``(h, w) float32 [0, 1]``.

    With ``target``, JPEGs larger than it decode at a reduced size (DCT scaling, at least
    ``target`` on the shorter side), which is several times faster. Returns the array and
    the *original* ``(height, width)``, so geometry stays exact.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with open_regular(path) as f:
            with warnings.catch_warnings():  # a header over PIL's own limit: refused below, unread
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
            orig_w, orig_h = img.size
            check_dimensions(path, orig_h, orig_w, getattr(img, "n_frames", 1))
            if target and img.format == "JPEG" and min(orig_w, orig_h) > 2 * target:
                img.draft("L", (target, target))
            img.load()
    except FileNotFoundError as e:
        raise DecodeError(f"{path}: file not found") from e
    except Image.DecompressionBombError as e:
        raise DecodeError(f"{path}: claims more pixels than the decoding budget ({e})") from e
    except UnidentifiedImageError as e:
        raise DecodeError(f"{path}: not a readable image (neither DICOM nor an image format Pillow knows)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"{path}: not a readable image ({e})") from e
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode in ("I", "F"):
        raw = np.asarray(img, dtype=np.float32)
        arr = _to_unit(raw, float(raw.min()), float(raw.max()))
    elif mode == "L":
        arr = np.asarray(img, dtype=np.float32) / 255.0
    else:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            if img.convert("RGBA").getchannel("A").getextrema()[1] == 0:
                raise NotAnXray(f"{path}: fully transparent image")
            img = _flatten_alpha(img)
        grey = img.convert("L")
        arr = np.asarray(grey, dtype=np.float32) / 255.0
    if arr.ndim != 2:
        raise NotAnXray(f"{path}: expected a single-channel image, got shape {arr.shape}")
    return arr, (orig_h, orig_w)


def _flatten_alpha(img):
    from PIL import Image

    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def decode(path: str | Path, target: int | None = None) -> tuple[np.ndarray, tuple[int, int], dict]:
    """Any supported file -> ``(array (h, w) float32 [0,1], original (H, W), facts)``.

    ``array`` may be smaller than the original when a JPEG was decoded at reduced size.
    """
    path = Path(path)
    if not path.exists():
        raise DecodeError(f"{path}: file not found")
    if is_dicom(path):  # a FIFO, socket or device is none, and decode_raster's open refuses it
        arr, facts = decode_dicom(path, target)
        check_content(path, arr)
        return arr, facts["shape"], facts
    arr, orig = decode_raster(path, target)
    check_content(path, arr)
    return arr, orig, {}


def preprocess(path: str | Path, size: int = 512, mode: str = "pad") -> tuple[np.ndarray, Geometry]:
    """Decode and fit into the cache: ``(size, size) uint8`` (convention above) and geometry."""
    arr, (h, w), facts = decode(path, target=size)
    geom = Geometry.fit(h, w, size, mode)
    if arr.shape != (h, w):  # reduced-size decode: map decoded pixels onto original ones
        # every reduction (JPEG DCT scaling, JPEG 2000 levels, block means) shrinks by a power
        # of two; where pixel i sits within its f original pixels depends on which one it was
        f = 2.0 ** round(math.log2(max(h / arr.shape[0], w / arr.shape[1])))
        m = _from_smaller_source(geom.matrix(), f, f, block=facts.get("reduced") != "wavelet")
        out = _warp(arr, m, (size, size))
    else:
        out = geom.to_cache(arr)
    return to_uint8(out), geom


def to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)

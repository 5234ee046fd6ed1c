"""What a file must be before it is decoded: a regular file (never a FIFO or a device), within the
size and shape limits, a compressed frame whose codestream agrees with its header; a decode
that must end within its deadline; the errors decoding raises."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import numpy as np

from pipeline import CxrlabelError, regular
from pipeline.limits import time_limit
from pipeline.regular import _KINDS, kind_of  # noqa: F401  (re-exported)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")  # stripped from a file's name to make its uid

# What a chest radiograph can be: smaller, more elongated or larger images are refused
# before their pixels are decoded (a 164 KB PNG can claim 13000 x 13000 pixels: 1.6 GB).
MIN_SIDE = 64

MAX_ASPECT = 4.0  # longer side / shorter side; chest films are 0.7-1.4

MAX_PIXELS = 50_000_000  # the decompression budget per image (the largest detectors: ~4300 x 4300)

MIN_SPREAD = 0.02  # 1st to 99th percentile of intensity in [0, 1]: below it the image is blank

# Non-chest projection modalities we still refuse: an MR or CT slice is not an X-ray.
NOT_XRAY_MODALITIES = {"CT", "MR", "PT", "NM", "US", "SR", "SEG", "RTSTRUCT", "ECG", "PR"}


class DecodeError(CxrlabelError):
    """An image that cannot be turned into the intensity convention (missing, corrupt...)."""


class NotAnXray(DecodeError):
    """A readable file that is not a projection radiograph (CT slice, colour photo, SR...)."""


class NotARegularFile(DecodeError):
    """A path that is a FIFO, socket, device or folder: opening or reading it could wait forever."""


class DecodeTimeout(DecodeError):
    """A decode that ran past :data:`DECODE_TIMEOUT` seconds."""


DECODE_TIMEOUT = float(os.environ.get("CXRLABEL_DECODE_TIMEOUT", "120"))  # seconds a decode may take


def open_regular(path: str | Path):
    """``path`` opened for binary reading when it is a regular file (links followed);
    :class:`NotARegularFile` naming what it is otherwise (:func:`pipeline.regular.open_regular`:
    a FIFO put in a file's place never makes it wait)."""
    return regular.open_regular(path, DecodeError, NotARegularFile, "only image files are read")


def deadline(seconds: float, what: str) -> contextlib.AbstractContextManager[None]:
    """Raise :class:`DecodeTimeout` in the block once it has run ``seconds``
    (:func:`pipeline.limits.time_limit`: in a process's main thread, as pool workers, Ray
    tasks and a single-process collect decode). Python code is stopped at once; a decoder's C
    loop when it returns, and its work is bounded beforehand by the header checks
    (:func:`check_dimensions`, :func:`check_codestream`)."""
    return time_limit(seconds, lambda: DecodeTimeout(
        f"{what}: decoding took longer than {seconds:g} s (CXRLABEL_DECODE_TIMEOUT)"))


def check_dimensions(path: Path | str, height: int, width: int, frames: int = 1) -> None:
    """Refuse, from the header alone, what cannot be a chest radiograph or would exceed
    the decompression budget (:data:`MIN_SIDE`, :data:`MAX_ASPECT`, :data:`MAX_PIXELS`)."""
    if height < MIN_SIDE or width < MIN_SIDE:
        raise NotAnXray(f"{path}: {width} x {height} pixels, smaller than {MIN_SIDE} on a side")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise NotAnXray(f"{path}: {width} x {height} pixels, more elongated than {MAX_ASPECT:g}:1")
    if height * width * max(frames, 1) > MAX_PIXELS:
        raise DecodeError(f"{path}: claims {width} x {height} pixels{f' x {frames} frames' if frames > 1 else ''}, "
                          f"more than the decoding budget of {MAX_PIXELS / 1e6:.0f} megapixels")


_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG frame headers, JPEG-LS's SOF55

_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length (TEM, RSTn, SOI)


def codestream_size(frame: bytes, family: str) -> tuple[int, int] | None:
    """``(height, width)`` a ``family`` codestream (``"jpeg2000"``, or ``"jpeg"`` for JPEG and
    JPEG-LS) says it decodes to, read from its frame header (SIZ, SOF) without decoding; None
    where the frame holds no header of that family where one must be."""
    if family == "jpeg2000":
        siz = frame.find(b"\xff\x4f\xff\x51", 0, 512)  # SOC then SIZ: the codestream's start (after a JP2 header)
        if siz < 0 or len(frame) < siz + 24 or (siz and b"jp2c" not in frame[:siz]):
            return None
        x, y, x_off, y_off = struct.unpack(">IIII", frame[siz + 8:siz + 24])
        return (y - y_off, x - x_off) if x > x_off and y > y_off else (0, 0)
    if not frame.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 9 <= len(frame) and i < 1 << 20:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_STANDALONE:
            i += 2
        elif marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", frame[i + 5:i + 9])
            return height, width
        else:
            i += 2 + struct.unpack(">H", frame[i + 2:i + 4])[0]
    return None


def check_native_length(path: Path | str, ds, rows: int, cols: int, frames: int = 1) -> None:
    """Refuse uncompressed pixel data longer than ``Rows`` x ``Columns`` (x frames, samples
    and bytes a sample) say: read by the header's size, such a film is silently cut to part of
    itself (a header whose Rows is too small) and labelled as if whole."""
    syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    if syntax is None or syntax.is_compressed or "PixelData" not in ds:
        return
    bits = int(ds.get("BitsAllocated", 8) or 8)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    need = rows * cols * max(frames, 1) * samples * bits / 8
    have = len(ds.PixelData)
    if have > need + 1 + (need % 2):  # one byte of padding to an even length is the standard's
        raise DecodeError(f"{path}: the pixel data holds {have} bytes where the header's {cols} x {rows} "
                          f"({bits}-bit, {samples} sample{'s' if samples > 1 else ''}, {max(frames, 1)} frame"
                          f"{'s' if frames > 1 else ''}) needs {int(need)}: its Rows or Columns are wrong; "
                          "fix the header")


def check_codestream(path: Path | str, ds, rows: int, cols: int) -> None:
    """Refuse, before decoding, compressed frames whose own header disagrees with the DICOM
    header's ``Rows`` x ``Columns``: the budget was checked on the DICOM header, and a
    codestream larger than it says would be decoded past it (a 0.7 MB file claiming 512 x 512
    and holding 14000 x 14000 pixels)."""
    from pydicom import uid
    from pydicom.encaps import generate_frames

    syntax = ds.file_meta.get("TransferSyntaxUID", None)
    family = "jpeg2000" if syntax in uid.JPEG2000TransferSyntaxes else \
        "jpeg" if syntax in (*uid.JPEGTransferSyntaxes, *uid.JPEGLSTransferSyntaxes) else None
    if family is None:  # RLE, deflate, uncompressed: decoded into the header's geometry
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        size = codestream_size(frame[:1 << 20], family)
        if size is not None and size != (rows, cols):
            raise DecodeError(f"{path}: frame {k + 1}'s codestream is {size[1]} x {size[0]} pixels but the DICOM "
                              f"header says {cols} x {rows}: refused before decoding (a damaged or crafted file)")


def check_content(path: Path | str, unit: np.ndarray) -> None:
    """Refuse a blank image: (nearly) one intensity everywhere, in ``[0, 1]`` units."""
    sample = unit[:: max(1, unit.shape[0] // 256), :: max(1, unit.shape[1] // 256)]
    lo, hi = np.percentile(sample, (1, 99))
    if not hi - lo >= MIN_SPREAD:  # also catches NaN
        raise NotAnXray(f"{path}: blank image (nearly constant pixel values)")


def is_dicom(path: Path) -> bool:
    """True when ``path`` is a regular file with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open_regular(path) as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except (OSError, DecodeError):
        return False

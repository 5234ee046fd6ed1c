"""Masks as stored: 1-bit PNGs and CheXmask's run-length text, encoded and decoded without
building more than they must; :class:`EncodedMask`, the ``masks`` rows, and reading them back."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection

from pipeline import db as D


def encode(mask: np.ndarray) -> bytes:
    """``(H, W)`` bool/0-1 array -> 1-bit greyscale PNG bytes (any PNG reader decodes them).

    Written directly (rows bit-packed, filter 0, zlib): OpenCV's bilevel PNG writer is
    several times slower on large, mostly empty masks.
    """
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be 2-D and non-empty, got shape {mask.shape}")
    h, w = mask.shape
    bits = mask if mask.dtype == np.bool_ else mask > 0
    raw = np.zeros((h, (w + 7) // 8 + 1), np.uint8)  # column 0: each row's filter type (none)
    raw[:, 1:] = np.packbits(bits, axis=1)
    return b"".join([_PNG_SIGNATURE,
                     _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)),
                     _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), ZLIB_LEVEL)),
                     _png_chunk(b"IEND", b"")])


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ZLIB_LEVEL = 1  # several times faster than the default 6 on large masks, files a little larger


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def rles(masks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], width: int) -> list[bytes]:
    """Each mask's runs of foreground pixels (row, first column, last column; sorted, not
    overlapping) -> CheXmask's run-length text: ``"start length start length ..."``, ASCII,
    with 1-based starts into the row-major flattened image; runs that continue onto the next
    row merge. The masks of one image are printed together, in one compiled pass."""
    from pipeline import compiled  # numba: its import is paid only where masks are encoded

    def joined(part: int) -> np.ndarray:
        return np.concatenate([np.asarray(m[part], np.int64) for m in masks]) if masks else np.zeros(0, np.int64)

    bounds = np.cumsum([0, *(len(m[0]) for m in masks)])
    text, ends = compiled.rle_text(joined(0), joined(1), joined(2), bounds, int(width))
    data = text.tobytes()
    return [data[i:j] for i, j in zip([0, *ends[:-1]], ends, strict=True)]


def rle_of(mask: np.ndarray) -> bytes:
    """``(H, W)`` bool array -> :func:`rles` text."""
    flat = np.concatenate([[False], mask.ravel() > 0, [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # run starts and ends, 0-based, alternating
    # the runs of one row as long as the whole image: the same text
    (text,) = rles([(np.zeros(len(edges) // 2, np.int64), edges[0::2], edges[1::2] - 1)], mask.size)
    return text


def decode(data: bytes, encoding: str = "png", shape: tuple[int, int] | None = None) -> np.ndarray:
    """Stored mask bytes -> ``(H, W) bool``: a PNG, or :func:`rles` text of a ``shape`` image."""
    if encoding == "rle":
        if shape is None:
            raise ValueError("an rle mask needs its image's (height, width)")
        try:
            numbers = np.array(bytes(data).split(), np.int64)
        except ValueError:
            raise ValueError("stored rle mask is not run-length text") from None
        size = shape[0] * shape[1]
        starts, lengths = numbers[0::2] - 1, numbers[1::2]
        if len(numbers) % 2 or (len(numbers) and (starts.min() < 0 or lengths.min() < 1
                                                  or (starts + lengths).max() > size)):
            raise ValueError(f"stored rle mask does not fit a {shape[0]}x{shape[1]} image")
        edges = np.bincount(starts, minlength=size + 1) - np.bincount(starts + lengths, minlength=size + 1)
        return (np.cumsum(edges[:-1]) > 0).reshape(shape)
    if encoding != "png":
        raise ValueError(f"unknown mask encoding {encoding!r}: png or rle")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("stored mask is not a readable PNG")
    return arr > 0


@dataclass(frozen=True)
class EncodedMask:
    """A mask ready for the ``masks`` table: its bytes, their encoding, shape, foreground area."""

    data: bytes
    height: int
    width: int
    area: int
    encoding: str = "png"

    @classmethod
    def of(cls, mask: np.ndarray, encoding: str = "png") -> EncodedMask:
        """A full ``(H, W)`` mask, as a PNG or as run-length text."""
        data = encode(mask) if encoding == "png" else rle_of(mask) if encoding == "rle" else None
        if data is None:
            raise ValueError(f"unknown mask encoding {encoding!r}: png or rle")
        height, width = mask.shape
        return cls(data, height, width, int(np.count_nonzero(mask)), encoding)

    @classmethod
    def from_runs(cls, masks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  shape: tuple[int, int]) -> list[EncodedMask]:
        """The runs of each of several masks of one ``shape`` image (see :func:`rles`) as
        run-length text: the masks are never built in full."""
        texts = rles(masks, shape[1])
        return [cls(text, int(shape[0]), int(shape[1]), int(np.sum(np.asarray(last) - np.asarray(first) + 1)), "rle")
                for text, (_, first, last) in zip(texts, masks, strict=True)]

    def decode(self) -> np.ndarray:
        return decode(self.data, self.encoding, (self.height, self.width))


def mask_row(uid: str, structure: str, mask: np.ndarray | EncodedMask, kind: str = "manual",
             model: str = "", run_id: int | None = None) -> dict:
    enc = mask if isinstance(mask, EncodedMask) else EncodedMask.of(mask)
    return {
        "uid": uid, "structure": structure, "kind": kind, "model": model, "run_id": run_id,
        "encoding": enc.encoding, "height": enc.height, "width": enc.width, "area": enc.area,
        "data": enc.data, "created_at": D.utcnow(),
    }


MASK_KEYS = ("uid", "structure", "kind", "model")


def load_masks(conn: Connection, uids: Sequence[str], kind: str = "manual",
               model: str = "") -> dict[str, dict[str, np.ndarray]]:
    """``{uid: {structure: (H, W) bool}}`` for the given images."""
    out: dict[str, dict[str, np.ndarray]] = {}
    t = D.masks
    q = select(t.c.uid, t.c.structure, t.c.data, t.c.encoding, t.c.height, t.c.width).where(
        t.c.kind == kind, t.c.model == model)
    for uid, structure, data, encoding, height, width in D.rows_in(conn, q, t.c.uid, uids):
        out.setdefault(uid, {})[structure] = decode(data, encoding, (height, width))
    return out

"""Masks: lossless encoding in the database, and importers of annotated sets.

A mask is ``(H, W) bool`` in the *original* image geometry. Imported (manual) masks are
stored as 1-bit PNGs (``encoding='png'``); predicted ones as CheXmask's run-length text
(``encoding='rle'``: "start length ..." pairs, 1-based starts into the row-major flattened
image, the ``height`` and ``width`` columns giving its shape), which labelling computes
straight from the model's output without building the full-size array. Manual masks have
``kind='manual'`` and ``model=''``; predicted ones ``kind='predicted'``, the model name and
the label run.
"""

from __future__ import annotations

import csv
import logging
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D

log = logging.getLogger(__name__)

# The structures labelled, measured, reviewed and exported, in the standard definitions of
# JSRT/SCR and CheXmask: the heart alone, and lungs with no pixel behind the heart,
# mediastinum or diaphragm (left/right: the patient's).
STRUCTURES = ("heart", "left_lung", "right_lung")
CARDIOMEDIASTINUM = "cardiomediastinum"  # heart plus upper mediastinum: GeneralBlockchain's only heart class
# What a model may also learn from a source that draws it (an auxiliary output, never labelled)
TRAINED = (*STRUCTURES, CARDIOMEDIASTINUM)
LUNGS = ("left_lung", "right_lung")
HEARTS = ("heart", CARDIOMEDIASTINUM)  # a lung pixel over one of these teaches nothing (a source's convention)
DEFINITIONS = {
    "heart": "the heart alone (JSRT/SCR, CheXmask)",
    CARDIOMEDIASTINUM: "heart and upper mediastinum (the cardiomediastinal silhouette)",
    "left_lung": "the patient's left lung",
    "right_lung": "the patient's right lung",
}
LUNG_CONVENTIONS = {
    "scr": "no pixel behind the heart, mediastinum or diaphragm (SCR)",
    "behind-heart": "drawn on behind the heart",
}
GENERALBLOCKCHAIN_CLASSES = {
    "Cardiomediastinum": CARDIOMEDIASTINUM,  # not the heart: kept under its own name
    "Left Lung": "left_lung",  # the patient's left: image right on a PA film
    "Right Lung": "right_lung",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}


class MaskImportError(CxrlabelError):
    pass


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
    row merge. The masks of one image are printed together (a third of the time)."""
    numbers = []
    for rows, first, last in masks:
        starts = np.asarray(rows, np.int64) * width + np.asarray(first, np.int64)
        ends = np.asarray(rows, np.int64) * width + np.asarray(last, np.int64) + 1
        if len(starts) > 1:
            carried = starts[1:] == ends[:-1]  # run i + 1 carries on run i
            if carried.any():
                starts, ends = starts[np.r_[True, ~carried]], ends[np.r_[~carried, True]]
        pairs = np.empty(2 * len(starts), np.int64)
        pairs[0::2], pairs[1::2] = starts + 1, ends - starts
        numbers.append(pairs)
    return _ascii_numbers(np.concatenate(numbers), np.cumsum([len(n) for n in numbers]))


@overload
def _ascii_numbers(values: np.ndarray, groups: None = None) -> bytes: ...
@overload
def _ascii_numbers(values: np.ndarray, groups: Sequence[int] | np.ndarray) -> list[bytes]: ...
def _ascii_numbers(values: np.ndarray, groups: Sequence[int] | np.ndarray | None = None) -> bytes | list[bytes]:
    """Non-negative integers as space-separated ASCII decimals, like ``" ".join(map(str, v))``,
    for the whole array at once (a Python loop over 10,000 numbers takes a millisecond).
    With ``groups`` (cumulative counts), one text per group of consecutive numbers."""
    if len(values) == 0:
        return b"" if groups is None else [b""] * len(groups)
    digits = np.searchsorted(_POWERS, values.astype(np.uint64), "right").clip(1)
    width = int(digits.max())
    columns, rest = [], values.copy()
    for _ in range(width):  # least significant first; scalar divisors are fast in numpy
        columns.append(ord("0") + (rest % 10).astype(np.uint8))
        rest //= 10
    spaces = np.cumsum(digits + 1) - 1 + width  # where each number's separator goes
    out = np.empty(int(spaces[-1]), np.uint8)  # led by `width` bytes of scratch
    # every number writes `width` digits right-aligned, most significant first: the leading
    # zeros of a short number land on its predecessor, whose own digits come later
    for k in range(width - 1, -1, -1):
        out[spaces - 1 - k] = columns[k]
    out[spaces[:-1]] = ord(" ")
    text = out.tobytes()
    if groups is None:
        return text[width:]
    bounds = [width, *(int(spaces[g - 1]) + 1 if g else width for g in groups)]
    return [text[i:max(i, j - 1)] for i, j in zip(bounds[:-1], bounds[1:], strict=True)]


_POWERS = 10 ** np.arange(20, dtype=np.uint64)


def rle_of(mask: np.ndarray) -> bytes:
    """``(H, W)`` bool array -> :func:`rles` text."""
    flat = np.concatenate([[False], mask.ravel() > 0, [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # run starts and ends, 0-based, alternating
    starts, ends = edges[0::2], edges[1::2]
    pairs = np.empty(2 * len(starts), np.int64)
    pairs[0::2], pairs[1::2] = starts + 1, ends - starts
    return _ascii_numbers(pairs)


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


def source_definitions(structures: Sequence[str], lungs: str) -> dict[str, str]:
    """What each structure of an annotated source means, as ``mask_sources`` records it."""
    if lungs not in LUNG_CONVENTIONS:
        raise MaskImportError(f"--lungs {lungs!r}: one of {', '.join(LUNG_CONVENTIONS)}")
    return {s: DEFINITIONS[s] + (f"; {LUNG_CONVENTIONS[lungs]}" if s in LUNGS else "") for s in structures}


def record_source(conn: Connection, source: str, definitions: dict[str, str]) -> None:
    """The definitions of ``source``'s manual masks (one row a source, the latest import's)."""
    import json
    D.upsert(conn, D.mask_sources, [{"source": source, "definitions": json.dumps(definitions, sort_keys=True),
                                     "imported_at": D.utcnow()}], ["source"])


def overlap_ignored(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per lung, the pixels its own source also drew as heart or cardiomediastinum: a lung
    drawn on behind the heart (GeneralBlockchain's left lung, 7 Wingspan films). Such pixels
    teach nothing and count in no Dice: the lungs are compared in their own convention."""
    cover = None
    for h in HEARTS:
        if h in masks:
            cover = masks[h] if cover is None else cover | masks[h]
    return {s: masks[s] & cover for s in LUNGS if s in masks and cover is not None}


def heart_definition(conn: Connection, model: str) -> str:
    """What ``model``'s stored `heart` masks are, from its label runs: ``heart`` (the heart
    alone), ``cardiomediastinum`` (models trained before 2026-12-05), or ``mixed``."""
    r = D.label_runs
    found = set(conn.execute(select(r.c.heart_definition).where(r.c.model == model).distinct()).scalars())
    found = {d or CARDIOMEDIASTINUM for d in found} or {"heart"}
    return found.pop() if len(found) == 1 else "mixed"


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


# ---------------------------------------------------------------- importers


@dataclass
class ImportSummary:
    images: int = 0
    masks: int = 0
    skipped: int = 0


def _foreground(path: Path) -> np.ndarray:
    """Any non-black RGB pixel of an RGBA/RGB/grey mask file; anti-aliased: above half."""
    from pipeline.imaging import open_regular
    try:
        with open_regular(path) as f:  # read through a checked descriptor: a FIFO never blocks
            data = np.frombuffer(f.read(), np.uint8)
    except CxrlabelError as e:
        raise MaskImportError(str(e)) from None
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None:
        raise MaskImportError(f"{path}: mask file missing or unreadable")
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float32) / np.iinfo(arr.dtype).max * 255).astype(np.uint8)
    return arr


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    from pipeline.imaging import is_dicom, open_regular
    with open_regular(path) as f:  # a FIFO or device among the images: refused, never waited on
        if is_dicom(path):
            import pydicom
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(f) as im:
            return im.size[1], im.size[0]


def _generalblockchain_rows(root: Path) -> Iterator[tuple[str, str, dict]]:
    path = root / "structure.csv"
    if not path.exists():
        raise MaskImportError(f"{path} not found: DIR must be the GeneralBlockchain dataset folder "
                              "(structure.csv, images/, masks/)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"Template Name", "Image", "Mask", "Resolution", "Top", "Left", "Filename"}
        if not need <= set(reader.fieldnames or []):
            raise MaskImportError(f"{path}: not a GeneralBlockchain structure.csv "
                                  f"(needs columns {sorted(need)})")
        for row in reader:
            structure = GENERALBLOCKCHAIN_CLASSES.get(row["Template Name"])
            if structure and row["Mask"]:
                yield Path(row["Filename"]).stem, structure, row


def _generalblockchain_metadata(root: Path) -> dict[str, dict]:
    path = root / "metadata.csv"
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return {r["filename"]: r for r in csv.DictReader(f) if r.get("filename")}


def _paste(row: dict, root: Path) -> np.ndarray:
    w, h = (int(v) for v in row["Resolution"].lower().split("x"))
    crop = _foreground(root / row["Mask"]) > 0
    top, left = int(float(row["Top"])), int(float(row["Left"]))
    canvas = np.zeros((h, w), bool)
    ch, cw = min(crop.shape[0], h - top), min(crop.shape[1], w - left)
    canvas[top:top + ch, left:left + cw] = crop[:ch, :cw]
    return canvas


def import_generalblockchain(engine: Engine, root: Path) -> ImportSummary:
    """Catalogue the GeneralBlockchain images and store their heart/lung masks as manual."""
    root = Path(root)
    by_uid: dict[str, list[tuple[str, dict]]] = {}
    for uid, structure, row in _generalblockchain_rows(root):
        by_uid.setdefault(uid, []).append((structure, row))
    meta = _generalblockchain_metadata(root)
    summary = ImportSummary()
    for uid in tqdm(sorted(by_uid), desc="masks generalblockchain", unit="img"):
        entries = by_uid[uid]
        first = entries[0][1]
        # images/ holds the original file names; the hashed `Image` names only key the masks
        image_path = (root / "images" / first["Filename"]).resolve()
        if not image_path.exists():
            image_path = (root / first["Image"]).resolve()
        m = meta.get(first["Filename"], {})
        image = {
            "uid": uid, "source": "generalblockchain", "path": str(image_path),
            "patient_id": m.get("patientid") or None, "age": _int_or_none(m.get("age")),
            "sex": (m.get("sex") or None), "view": m.get("view") or None,
            "text": m.get("finding") or None, "license": m.get("license") or None,
        }
        union: dict[str, np.ndarray] = {}
        for structure, row in entries:  # a structure drawn in several pieces: their union
            mask = _paste(row, root)
            union[structure] = mask | union[structure] if structure in union else mask
            image["height"], image["width"] = mask.shape
        rows = [mask_row(uid, s, m) for s, m in sorted(union.items())]
        _store(engine, [image], rows)
        summary.images += 1
        summary.masks += len(rows)
    with engine.begin() as conn:
        record_source(conn, "generalblockchain", source_definitions(
            sorted(set(GENERALBLOCKCHAIN_CLASSES.values())), "behind-heart"))
    return summary


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _store(engine: Engine, images: list[dict], rows: list[dict],
           update: Sequence[str] | None = None) -> None:
    """Images and their masks in one transaction. ``update``: the image columns an existing
    catalogue row takes from this import (the rest, e.g. a clinic's report text, is kept)."""
    now = D.utcnow()
    with engine.begin() as conn:
        D.upsert(conn, D.images, [{**i, "loaded_at": now} for i in images], ["uid"], update)
        D.upsert(conn, D.masks, rows, MASK_KEYS)


def parse_mask_dirs(pairs: Sequence[str]) -> dict[str, str] | None:
    """``["heart=mask/heart", ...]`` -> ``{"heart": "mask/heart"}``; None for no pairs."""
    mapping = {}
    for pair in pairs:
        structure, sep, folder = pair.partition("=")
        if not sep or not folder:
            raise MaskImportError(f"--mask {pair!r}: expected STRUCTURE=FOLDER, e.g. --mask heart=masks/heart")
        mapping[structure] = folder
    return mapping or None


def import_png_dirs(engine: Engine, root: Path, images: str = "images",
                    masks: dict[str, str] | None = None, source: str = "annotated",
                    lungs: str = "scr") -> ImportSummary:
    """One folder of images and one folder per structure of same-named masks.

    ``masks`` maps structure (:data:`TRAINED`: a heart-only outline is ``heart``, a
    heart-and-mediastinum one ``cardiomediastinum``) -> folder relative to ``root``; default
    ``{s: f"masks/{s}" for s in STRUCTURES}``. A mask is foreground above half its range.
    ``lungs``: how the source draws the lungs (:data:`LUNG_CONVENTIONS`). The source's
    definitions are recorded in ``mask_sources``.
    """
    root = Path(root)
    masks = masks or {s: f"masks/{s}" for s in STRUCTURES}
    unknown = set(masks) - set(TRAINED)
    if unknown:
        raise MaskImportError(f"unknown structure(s) {sorted(unknown)}: use {', '.join(TRAINED)} (a heart drawn "
                              f"with the upper mediastinum is {CARDIOMEDIASTINUM})")
    definitions = source_definitions(sorted(masks), lungs)
    image_dir = root / images
    if not image_dir.is_dir():
        raise MaskImportError(f"{image_dir}: image folder not found (set it with --images)")
    for structure, sub in masks.items():
        if not (root / sub).is_dir():
            raise MaskImportError(f"{root / sub}: mask folder for {structure} not found "
                                  f"(set it with --mask {structure}=FOLDER)")
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MaskImportError(f"{image_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    summary = ImportSummary()
    for path in tqdm(files, desc=f"masks {root.name}", unit="img"):
        uid = path.stem
        try:
            h, w = _image_size(path)
        except (CxrlabelError, OSError, ValueError, AttributeError) as e:  # one bad image never stops the import
            log.warning("%s: image left out: %s", uid, e)
            summary.skipped += 1
            continue
        rows = []
        for structure, sub in masks.items():
            found = _same_stem(root / sub, uid)
            if found is None:
                continue
            try:
                mask = _foreground(found) > 127
            except MaskImportError as e:
                log.warning("%s: %s; skipped", uid, e)
                summary.skipped += 1
                continue
            if mask.shape != (h, w):
                log.warning("%s: mask %s is %s, image is %s; skipped", uid, found, mask.shape, (h, w))
                summary.skipped += 1
                continue
            rows.append(mask_row(uid, structure, mask))
        image = {"uid": uid, "source": source, "path": str(path.resolve()), "height": h, "width": w}
        _store(engine, [image], rows, update=("path", "height", "width"))
        summary.images += 1
        summary.masks += len(rows)
    with engine.begin() as conn:
        record_source(conn, source, definitions)
    return summary


def _same_stem(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".PNG", ".bmp", ".tif", ".gif", ".jpg"):
        p = folder / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


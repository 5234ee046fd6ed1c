"""Annotated sets into the database: GeneralBlockchain's (its cardiomediastinum, lungs drawn on
behind the heart) and folders of PNG masks, each source's definitions recorded."""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine
from tqdm import tqdm

from pipeline import CxrlabelError
from pipeline import db as D
from pipeline.masks.encoding import MASK_KEYS, mask_row
from pipeline.masks.structures import (
    CARDIOMEDIASTINUM,
    STRUCTURES,
    TRAINED,
    MaskImportError,
    record_source,
    source_definitions,
)

log = logging.getLogger(__name__)


GENERALBLOCKCHAIN_CLASSES = {
    "Cardiomediastinum": CARDIOMEDIASTINUM,  # not the heart: kept under its own name
    "Left Lung": "left_lung",  # the patient's left: image right on a PA film
    "Right Lung": "right_lung",
}


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}



@dataclass
class ImportSummary:
    images: int = 0
    masks: int = 0
    skipped: int = 0


def _decoded(path: Path, palette: bool = False) -> np.ndarray:
    """A mask file's pixels as stored, read through a checked descriptor (a FIFO never
    blocks) and within the decoding budget (:func:`_check_mask_size`); with ``palette``, a
    palette image's indices rather than its colours. A :class:`MaskImportError` naming the
    file otherwise."""
    from pipeline.imaging import open_regular
    try:
        with open_regular(path) as f:
            data = np.frombuffer(f.read(), np.uint8)
    except CxrlabelError as e:
        raise MaskImportError(str(e)) from None
    mode = _check_mask_size(path, data) if data.size else None
    arr = _palette_indices(data) if palette and mode == "P" else None
    try:
        if arr is None:
            arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except (cv2.error, MemoryError) as e:
        raise MaskImportError(f"{path}: mask file unreadable ({type(e).__name__})") from None
    if arr is None:
        raise MaskImportError(f"{path}: mask file missing or unreadable")
    return arr


def _foreground(path: Path) -> np.ndarray:
    """Any non-black RGB pixel of an RGBA/RGB/grey mask file; anti-aliased: above half."""
    arr = _decoded(path)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float32) / np.iinfo(arr.dtype).max * 255).astype(np.uint8)
    return arr


MAX_MASK_SHARE = 0.75  # of the film: no structure covers more (an inverted mask, 0 for the structure, does)


def _mask_file(path: Path) -> np.ndarray:
    """A png-dirs mask file as a bool mask, whatever common encoding it uses: 0/255 or 0/1 (8
    or 16 bit), any two grey levels, a palette, or the structure in the alpha channel alone;
    foreground above half the file's own range (anti-aliased edges split at half). An empty
    mask (one value throughout) or one covering more than :data:`MAX_MASK_SHARE` of the film
    (inverted?) is a :class:`MaskImportError` naming the file."""
    arr = _decoded(path, palette=True)  # a palette's indices, not its colours: two labels may share one
    if arr.ndim == 3:
        grey = arr[..., :3].max(axis=2)
        if arr.shape[2] == 4 and grey.min() == grey.max():  # drawn in the alpha channel alone
            grey = arr[..., 3]
        arr = grey
    lo, hi = int(arr.min()), int(arr.max())
    if lo == hi:
        raise MaskImportError(f"{path}: an empty mask (every pixel {lo}): draw the structure, or leave the file out")
    mask = arr > (lo + hi) / 2
    share = float(np.count_nonzero(mask)) / mask.size
    if share > MAX_MASK_SHARE:
        raise MaskImportError(f"{path}: the mask covers {share:.0%} of the film: inverted? the structure must be "
                              "the bright (or opaque) part")
    return mask


def _palette_indices(data: np.ndarray) -> np.ndarray | None:
    """The index array of a palette image (one :func:`_check_mask_size` found "P"); None
    when PIL cannot decode it after all (OpenCV's turn)."""
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.asarray(im)
    except Exception:  # noqa: BLE001 - not an image PIL reads: OpenCV's turn
        return None


def _check_mask_size(path: Path, data: np.ndarray) -> str | None:
    """Refuse, from its header alone, a mask file that would decode past the images' budget
    (:data:`pipeline.imaging.MAX_PIXELS`: a 1.7 MB 16-bit PNG can claim 30000 x 30000 pixels,
    5.3 GB decoded); its PIL mode ("P" for a palette), None where PIL cannot read it."""
    import io

    from PIL import Image

    from pipeline.imaging import MAX_PIXELS
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: the budget below says it plainly
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.tobytes())) as im:
                (width, height), mode = im.size, im.mode
    except Image.DecompressionBombError as e:  # past twice PIL's limit, far past ours
        raise MaskImportError(f"{path}: a mask past the decoding budget of {MAX_PIXELS / 1e6:.0f} megapixels "
                              f"({e})") from None
    except Exception:  # noqa: BLE001 - what PIL cannot read, OpenCV may: its own check follows
        return None
    if width * height > MAX_PIXELS:
        raise MaskImportError(f"{path}: a mask of {width} x {height} pixels, more than the decoding budget of "
                              f"{MAX_PIXELS / 1e6:.0f} megapixels: not a chest film's mask")
    return mode


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
    from pipeline.imaging import MAX_PIXELS
    try:
        w, h = (int(v) for v in row["Resolution"].lower().split("x"))
    except ValueError:
        raise MaskImportError(f"{row['Mask']}: Resolution {row['Resolution']!r} is not WIDTHxHEIGHT") from None
    if not (0 < w and 0 < h and w * h <= MAX_PIXELS):
        raise MaskImportError(f"{row['Mask']}: Resolution {w}x{h} is outside the decoding budget of "
                              f"{MAX_PIXELS / 1e6:.0f} megapixels")
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
        try:
            for structure, row in entries:  # a structure drawn in several pieces: their union
                mask = _paste(row, root)
                union[structure] = mask | union[structure] if structure in union else mask
                image["height"], image["width"] = mask.shape
        except (MaskImportError, OSError, ValueError, MemoryError) as e:  # one bad mask never stops the import
            log.warning("%s: left out: %s", uid, e)
            summary.skipped += 1
            continue
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
                    lungs: str = "scr", uid_prefix: str = "") -> ImportSummary:
    """One folder of images and one folder per structure of same-named masks.

    ``masks`` maps structure (:data:`TRAINED`: a heart-only outline is ``heart``, a
    heart-and-mediastinum one ``cardiomediastinum``) -> folder relative to ``root``; default
    ``{s: f"masks/{s}" for s in STRUCTURES}``. A mask is foreground above half its range.
    ``lungs``: how the source draws the lungs (:data:`LUNG_CONVENTIONS`). The source's
    definitions are recorded in ``mask_sources``.

    An image's uid is ``uid_prefix`` and its file's stem. The import never changes the file,
    source or size of an image the catalogue holds (:func:`_other_image`: a DICOM of the same
    name): that image is left out with a line naming it and the way out (``uid_prefix``). Two
    files of one stem (``a.png``, ``a.jpg``) are both left out: which one the masks belong to
    is not known.
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
    files = _one_file_a_uid(files, uid_prefix, summary)
    existing = _catalogued(engine, [uid_prefix + p.stem for p in files])
    for path in tqdm(files, desc=f"masks {root.name}", unit="img"):
        uid = uid_prefix + path.stem
        try:
            h, w = _image_size(path)
        except (CxrlabelError, OSError, ValueError, AttributeError) as e:  # one bad image never stops the import
            log.warning("%s: image left out: %s", uid, e)
            summary.skipped += 1
            continue
        if (why := _other_image(existing.get(uid), source, path.resolve(), h, w)) is not None:
            log.warning("%s: the catalogue holds %s; left out, the stored image unchanged: import this folder "
                        "under other uids with --uid-prefix (e.g. --uid-prefix %s_)", uid, why, source)
            summary.skipped += 1
            continue
        rows = _mask_rows(root, masks, uid, path.stem, (h, w), summary)
        image = {"uid": uid, "source": source, "path": str(path.resolve()), "height": h, "width": w}
        _store(engine, [image], rows, update=("path", "height", "width"))
        summary.images += 1
        summary.masks += len(rows)
    with engine.begin() as conn:
        record_source(conn, source, definitions)
    return summary


def _one_file_a_uid(files: list[Path], uid_prefix: str, summary: ImportSummary) -> list[Path]:
    """``files`` but those that share a uid (``a.png`` and ``a.jpg``): both left out, with a
    line naming them, since which one the masks belong to is not known."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(uid_prefix + path.stem, []).append(path)
    for uid, clash in by_stem.items():
        if len(clash) > 1:
            log.warning("%s: %s share this uid; both left out: rename one (or keep one) and import again", uid,
                        " and ".join(p.name for p in clash))
            summary.skipped += len(clash)
    return [p for p in files if len(by_stem[uid_prefix + p.stem]) == 1]


def _mask_rows(root: Path, masks: dict[str, str], uid: str, stem: str, shape: tuple[int, int],
               summary: ImportSummary) -> list[dict]:
    """The ``masks`` rows of one image: each structure's file of that ``stem`` read
    (:func:`_mask_file`), one that cannot be read or is of another ``shape`` left out with a
    line (counted in ``summary``)."""
    rows = []
    for structure, sub in masks.items():
        found = _same_stem(root / sub, stem)
        if found is None:
            continue
        try:
            mask = _mask_file(found)
        except MaskImportError as e:
            log.warning("%s: %s; skipped", uid, e)
            summary.skipped += 1
            continue
        if mask.shape != shape:
            log.warning("%s: mask %s is %s, image is %s; skipped", uid, found, mask.shape, shape)
            summary.skipped += 1
            continue
        rows.append(mask_row(uid, structure, mask))
    return rows


def _catalogued(engine: Engine, uids: Sequence[str]) -> dict[str, Any]:
    """The catalogue's rows (source, path, height, width) of those of ``uids`` it holds."""
    t = D.images
    with engine.connect() as conn:
        return {r.uid: r for r in D.rows_in(conn, select(t.c.uid, t.c.source, t.c.path, t.c.height, t.c.width),
                                           t.c.uid, list(uids))}


def _other_image(row: Any, source: str, path: Path, height: int, width: int) -> str | None:
    """What makes the catalogued ``row`` another image than this source's file of this size
    (None: none is stored, or it is this one: a catalogue row without a file, a clinic's
    report by this name, takes the file and its masks; one of this source in another folder
    takes the new path)."""
    if row is None:
        return None
    other_file = row.path is not None and row.path != str(path)
    if other_file and row.source != source:
        return f"an image of source {row.source!r} under this uid ({row.path})"
    if row.height is not None and row.width is not None and (row.height, row.width) != (height, width):
        return (f"an image of {row.width} x {row.height} pixels under this uid ({row.path or 'no file'}), "
                f"this one {width} x {height}")
    return None


def _same_stem(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".PNG", ".bmp", ".tif", ".gif", ".jpg"):
        p = folder / f"{stem}{suffix}"
        if p.exists():
            return p
    return None

"""What the input check catches and misses: is this a frontal chest radiograph the model can read?

The test set is made of images the project may ship or make, each labelled through the
labelling path (`pipeline.label.postprocess`, the model's cleaned masks, the score's atlas):

* **real chest films** (must pass): every annotated film of the database (GeneralBlockchain,
  the Wingspan half), the two NIH samples and the real chest DICOMs of `../shared/data`;
* **made from real films** (must be flagged): each of the first N annotated films turned a
  quarter, half and three quarters, flipped left-right, and cropped to its left half, its
  central half and its top half;
* **not chest films** (must be flagged): scikit-image's sample images (photos, figures,
  microscopy, a retina, text) and every two-dimensional image among pydicom's test files (CT,
  MR, ultrasound, nuclear medicine, screen captures), judged by the pixels alone and again
  with their DICOM header (`inputs.header_check`).

It prints the share flagged per kind, every miss and every real film flagged, and the range of
each anatomy reading over the real films (what `pipeline/quality/inputs.py`'s limits sit
outside of).

Usage: python bench/input_check.py --db sqlite:///data/catalogue.db [--model default] [--made 40]
       [--shared ../shared/data] [--cache data/cache]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import db as D  # noqa: E402
from pipeline.imaging import Geometry, preprocess, upright  # noqa: E402
from pipeline.label import Item, postprocess, reframe  # noqa: E402
from pipeline.model import infer, resolve_model  # noqa: E402
from pipeline.quality import inputs  # noqa: E402


def made_variants(image: np.ndarray) -> dict[str, np.ndarray]:
    """A real cached film turned, flipped and cropped (each re-padded to the cache square)."""
    s = image.shape[0]

    def padded(part: np.ndarray) -> np.ndarray:
        h, w = part.shape
        scale = s / max(h, w)
        small = cv2.resize(part, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        out = np.zeros((s, s), np.uint8)
        y, x = (s - small.shape[0]) // 2, (s - small.shape[1]) // 2
        out[y:y + small.shape[0], x:x + small.shape[1]] = small
        return out
    return {"turned 90": np.rot90(image, 1).copy(), "turned 180": np.rot90(image, 2).copy(),
            "turned 270": np.rot90(image, 3).copy(), "flipped": np.fliplr(image).copy(),
            "cropped: left half": padded(image[:, : s // 2]), "cropped: central half":
            padded(image[s // 4: 3 * s // 4, s // 4: 3 * s // 4]), "cropped: top half": padded(image[: s // 2])}


def skimage_images(folder: Path) -> list[Path]:
    """scikit-image's sample images (the ones its wheel ships), as PNG files."""
    try:
        import skimage
    except ImportError:
        print("scikit-image is not installed: its sample images are left out")
        return []
    data = Path(skimage.__file__).parent / "data"
    out = []
    for f in sorted(data.iterdir()):
        if f.suffix.lower() not in (".png", ".jpg", ".gif") or "chessboard" in f.name and "GRAY" in f.name:
            continue
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if img is None or min(img.shape[:2]) < 16:
            continue
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        path = folder / f"skimage_{f.stem}.png"
        cv2.imwrite(str(path), img)
        out.append(path)
    faces = data / "lfw_subset.npy"
    if faces.exists():  # a face, 25 px, blown up
        face = (np.load(faces)[0] * 255).astype(np.uint8)
        path = folder / "skimage_lfw_face.png"
        cv2.imwrite(str(path), cv2.resize(face, (200, 200)))
        out.append(path)
    return out


def pydicom_images() -> list[Path]:
    """pydicom's test files that hold one decodable two-dimensional image."""
    import pydicom
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    out = []
    for f in sorted(root.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(f)
            arr = ds.pixel_array
        except Exception:  # no pixels, or a codec this install lacks
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) == 1 and arr.ndim in (2, 3) and min(arr.shape[:2]) >= 32:
            out.append(f)
    return out


def header_of(path: Path) -> tuple[str | None, str | None, str | None]:
    import pydicom
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.get("Modality"), ds.get("BodyPartExamined"), ds.get("ViewPosition")


def judged(lm, images: list[tuple], looks: inputs.Appearance | None) -> list[tuple[str, str, dict]]:
    """``(name, reason, readings)`` per ``(name, cached image, its geometry, the annotated
    film it is or was made from)``, as labelling reads it; the film it came from is left out
    of the appearance it is compared with."""
    size = lm.spec.size
    cache_geom = Geometry.fit(size, size, size, "pad")
    out = []
    for n in range(0, len(images), 16):
        part = images[n:n + 16]
        films = [(g.film_box() if g is not None else (0.0, 0.0, size - 1.0, size - 1.0)) for _, _, g, _ in part]
        imgs = [upright(img)[0] for _, img, _, _ in part]
        probs = reframe(lm, imgs, films, infer(lm, imgs))
        for (name, _, _, source), img, p, film in zip(part, imgs, probs, films, strict=True):
            r = postprocess(Item(name, img, cache_geom), p, lm.spec.structures, lm.quality)
            masks = {s: r.masks[s].decode() for s in lm.spec.structures}
            fit = lm.quality.atlas.fit(masks) if lm.quality is not None and lm.quality.atlas is not None else None
            look = looks.look(inputs.thumbnail(img, film), source) if looks is not None else None
            out.append((name, inputs.check(masks, film, fit, look),
                        {**inputs.anatomy(masks, film), "atlas": np.mean(list(fit.values())) if fit else None,
                         **{f"look_{k}": v for k, v in (look or {}).items()}}))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True, help="a catalogue with the annotated films (make masks)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--cache")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--made", type=int, default=40, help="real films to turn, flip and crop")
    ap.add_argument("--dump", type=Path, help="write every image's readings and verdict here (JSON)")
    args = ap.parse_args(argv)
    engine = D.connect(args.db)
    lm = resolve_model(engine, args.model, "cpu")
    from pipeline.train.config import TrainConfig
    from pipeline.train.data import load_dataset
    ds = load_dataset(engine, TrainConfig.from_preset("tiny", size=lm.spec.size, mode=lm.spec.mode), args.cache)
    looks = inputs.Appearance(np.stack([inputs.thumbnail(ds.images[i], ds.geoms[i].film_box())
                                        for i in range(len(ds.uids))]))
    real = [(f"{u}", ds.images[i], ds.geoms[i], i) for i, u in enumerate(ds.uids)]
    for f in sorted((args.shared / "nih-samples").glob("*.png")) + sorted((args.shared / "dicom").glob("*.dcm")):
        img, geom = preprocess(f, lm.spec.size, lm.spec.mode)
        real.append((f.name, img, geom, None))
    step = max(1, len(ds.uids) // args.made)
    made = [(f"{kind} {ds.uids[i][:24]}", v, None, i) for i in range(0, len(ds.uids), step)[:args.made]
            for kind, v in made_variants(ds.images[i]).items()]
    with tempfile.TemporaryDirectory() as tmp:
        others = []
        for f in skimage_images(Path(tmp)) + pydicom_images():
            try:
                img, geom = preprocess(f, lm.spec.size, lm.spec.mode)
            except Exception as e:  # noqa: BLE001 - an image labelling could not read is no test of the check
                print(f"  ({f.name}: not decoded: {type(e).__name__}: {e})")
                continue
            others.append((f.name, img, geom, header_of(f) if f.suffix == ".dcm" else None))
    rows = {"real chest films": judged(lm, real, looks), "made from real films": judged(lm, made, looks),
            "not chest films": judged(lm, [(n, i, g, None) for n, i, g, _ in others], looks)}
    if args.dump:
        import json
        args.dump.write_text(json.dumps({kind: [[n, r, {k: (float(v) if v is not None else None) for k, v in a.items()}]
                                               for n, r, a in got] for kind, got in rows.items()}))
    has_atlas = lm.quality is not None and lm.quality.atlas is not None
    print(f"model {lm.name} ({lm.path.name}, {lm.sha256[:12]}), atlas: {has_atlas}")
    print("| images | n | flagged | share |")
    print("|---|---|---|---|")
    for kind, got in rows.items():
        flagged = sum(r != inputs.OK for _, r, _ in got)
        print(f"| {kind} | {len(got)} | {flagged} | {flagged / max(len(got), 1):.1%} |")
    headers = [(n, inputs.header_check(*h) if h else None) for n, _, _, h in others]
    both = sum((r != inputs.OK) or bool(h) for (_, r, _), (_, h) in zip(rows["not chest films"], headers, strict=True))
    print(f"| not chest films, with their DICOM header | {len(others)} | {both} | {both / max(len(others), 1):.1%} |")
    by_kind = defaultdict(lambda: [0, 0])
    for name, r, _ in rows["made from real films"]:
        k = name.rsplit(" ", 1)[0]
        by_kind[k][0] += r != inputs.OK
        by_kind[k][1] += 1
    print("made, by kind: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in by_kind.items()))
    print("\nreal chest films flagged:")
    for name, r, a in rows["real chest films"]:
        if r != inputs.OK:
            print(f"  {name}: {r}  {({k: round(v, 3) for k, v in a.items() if v is not None})}")
    print("\nmisses (passed as chest films):")
    for kind in ("made from real films", "not chest films"):
        for name, r, a in rows[kind]:
            if r == inputs.OK:
                print(f"  {kind}: {name}  {({k: round(v, 3) for k, v in a.items() if v is not None})}")
    print("\nreal chest films' anatomy (min, 1st percentile, median, max):")
    keys = rows["real chest films"][0][2].keys()
    for k in keys:
        v = np.array([a[k] for _, _, a in rows["real chest films"] if a[k] is not None], float)
        if len(v):
            print(f"  {k}: {v.min():.3f}, {np.percentile(v, 1):.3f}, {np.median(v):.3f}, {v.max():.3f}")
    print("\nreasons given: " + ", ".join(sorted({r.split('?')[0] for got in rows.values() for _, r, _ in got})))
    return 0


if __name__ == "__main__":
    sys.exit(main())

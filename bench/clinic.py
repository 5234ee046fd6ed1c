"""Build a clinic-like DICOM archive of N files from the real shared images, and its reports.

Usage: python bench/clinic.py N --out DIR [--data ../shared/data] [--seed 0] [--annotated 40]

Each file takes a real chest X-ray (GeneralBlockchain, NIH samples, the shared DICOMs) and
varies what real archives vary: size (512-3000 px), bit depth (8/12/16), photometric
interpretation (MONOCHROME1/2), transfer syntax (explicit/implicit little endian, RLE,
JPEG baseline, JPEG 2000 lossless and lossy), rescale and window tags, pixel spacing, view,
age and sex. ``DIR/reports.csv`` holds a report per study in English or Russian (SOPInstanceUID,
Report), and ``DIR/ris_export.csv`` the same reports as a RIS export would give them (cp1251,
``;``: Accession, Conclusion, Age, Sex, File). The reports are *synthetic*: they exercise the
group rules and the pipeline, they say nothing true about the images.

``DIR/clinic_a_annotated/`` holds a clinic's annotated films (``--annotated``, 40): Wingspan
films of the half bench/adapt.py calls the new source, through one equipment change and with
the heart outlined 3 px wider on each side by another reader (bench/adapt.py's heart shift),
as ``png/`` and ``mask/{heart,left_lung,right_lung}/``: what README's "Your clinic's films"
adapts the shipped model on. The shipped model trained on these films' originals, so its
figures on them flatter it.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from pipeline.imaging import decode

REPO = Path(__file__).resolve().parents[1]
REPORTS = {
    "cardiomegaly": ["Cardiomegaly. No pleural effusion.", "The heart is moderately enlarged.",
                     "Кардиомегалия.", "Тень сердца расширена влево. Застойные явления."],
    "healthy": ["No acute cardiopulmonary abnormality. Normal chest.", "Lungs are clear. Normal study.",
                "Норма.", "Без патологии."],
    "other": ["Right lower lobe pneumonia.", "Small left pleural effusion.",
              "Правосторонняя пневмония.", "Pending comparison."],
}
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit,
            JPEG2000Lossless, JPEG2000]


def sources(data: Path) -> list[Path]:
    files = sorted((data / "generalblockchain" / "images").glob("*"))
    files += sorted((data / "nih-samples").glob("*.png")) + sorted((data / "dicom").glob("RG1_UNCR.dcm"))
    files += sorted((data / "dicom").glob("cr_chest_pa_jpeg_baseline.dcm"))
    if not files:
        sys.exit(f"no source images under {data}: pass --data")
    return files


def make_dataset(pixels: np.ndarray, bits: int, mono1: bool, rng: random.Random, i: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"P{i // 2:06d}"
    ds.PatientSex = rng.choice(["M", "F"])
    ds.PatientAge = f"{rng.randint(18, 95):03d}Y"
    ds.StudyDate = f"20{rng.randint(10, 24):02d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    ds.Modality = rng.choice(["CR", "DX"])
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = rng.choice(["PA", "PA", "AP"])
    ds.StudyDescription = "CHEST 1 VIEW"
    spacing = f"{rng.uniform(0.1, 0.2):.3f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rng.random() < 0.5:
        ds.WindowCenter = str(int(2 ** (bits - 1)))
        ds.WindowWidth = str(int(2**bits * rng.uniform(0.7, 1.0)))
    if rng.random() < 0.3:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "0", "US"
    return ds


def write_one(src: Path, out: Path, i: int, rng: random.Random) -> str:
    unit, _, _ = decode(src)
    side = rng.randint(512, 3000)
    scale = side / max(unit.shape)
    unit = cv2.resize(unit, (max(8, int(unit.shape[1] * scale)), max(8, int(unit.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA)
    syntax = rng.choice(SYNTAXES)
    bits = 8 if syntax == JPEGBaseline8Bit else rng.choice([8, 12, 16])
    mono1 = rng.random() < 0.3
    stored = (1.0 - unit) if mono1 else unit
    pixels = np.round(stored * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)
    ds = make_dataset(pixels, bits, mono1, rng, i)
    if syntax == JPEGBaseline8Bit:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds.file_meta.TransferSyntaxUID = syntax
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if syntax in (RLELossless, JPEG2000Lossless):
            ds.compress(syntax)
        elif syntax == JPEG2000:
            ds.compress(syntax, j2k_cr=[20])
        elif syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    folder = out / f"{i // 100:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"IM{i:06d}.dcm", enforce_file_format=True)
    return ds.SOPInstanceUID


def annotated(out: Path, data: Path, n: int) -> Path:
    """``n`` annotated films of another clinic under ``out`` (see the module's docstring)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_adapt", REPO / "bench" / "adapt.py")
    adapt = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(adapt)  # type: ignore[union-attr]
    src = data / "wingspan"
    names = [p.name for p in sorted((src / "png").iterdir()) if adapt.half(p.name) == 1][:n]
    structures = ("heart", "left_lung", "right_lung")
    for sub in ("png", *(f"mask/{s}" for s in structures)):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        mine = f"clinic_a_{k + 1:04d}.png"
        img = cv2.imread(str(src / "png" / name), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(out / "png" / mine), adapt.equipment(img, k))
        for s in structures:
            mask = cv2.imread(str(src / "mask" / s / name), cv2.IMREAD_GRAYSCALE)
            if s == "heart":
                mask = cv2.dilate(mask, np.ones((1, 2 * adapt.WIDER + 1), np.uint8))
            cv2.imwrite(str(out / "mask" / s / mine), mask)
    return out


def ris_export(out: Path, rows: list[tuple[str, str, str, str, str]]) -> Path:
    """The reports as a RIS export gives them: cp1251, ``;``, one row per film."""
    path = out / "ris_export.csv"
    with open(path, "w", newline="", encoding="cp1251") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Accession", "Conclusion", "Age", "Sex", "File"])
        w.writerows(rows)
    return path


def build(n: int, out: Path, data: Path, seed: int = 0, n_annotated: int = 40) -> Path:
    """Write ``n`` DICOM files, ``reports.csv``, ``ris_export.csv`` and ``n_annotated`` annotated
    films under ``out``; returns the path of ``reports.csv``."""
    from tqdm import tqdm
    rng = random.Random(seed)
    files = sources(data)
    out.mkdir(parents=True, exist_ok=True)
    rows, ris = [], []
    for i in tqdm(range(n), desc="clinic", unit="file"):
        sop = write_one(files[i % len(files)], out, i, rng)
        group = rng.choices(["cardiomegaly", "healthy", "other"], [0.4, 0.4, 0.2])[0]
        rows.append((sop, rng.choice(REPORTS[group])))
        ds = pydicom.dcmread(out / f"{i // 100:04d}" / f"IM{i:06d}.dcm", stop_before_pixels=True)
        ris.append((f"A-{i + 1}", rows[-1][1], str(int(ds.PatientAge[:3])), ds.PatientSex,
                    f"{i // 100:04d}/IM{i:06d}.dcm"))
    ris_export(out, ris)
    if n_annotated:
        annotated(out / "clinic_a_annotated", data, n_annotated)
    reports = out / "reports.csv"
    with open(reports, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["SOPInstanceUID", "Report"])
        w.writerows(rows)
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--annotated", type=int, default=40, help="annotated films of another clinic (0: none)")
    args = ap.parse_args(argv)
    print(build(args.n, args.out, args.data, args.seed, args.annotated))
    return 0


if __name__ == "__main__":
    sys.exit(main())

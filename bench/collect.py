"""`collect` throughput against a naive floor measured in the same run.

The floor: for each file, a full-size decode (pydicom / PIL) to grey and a plain
`cv2.resize` to the target size, in one process. `collect` adds the intensity pipeline,
geometry, atomic cache writes and database rows, but decodes large JPEGs at reduced size
and runs a process pool. Files: the 100 GeneralBlockchain images (44+39 JPEGs, many larger
than 2000 px) and a generated clinic archive of DICOM files.

Usage: python bench/collect.py [--size 256] [--workers 1 2] [--clinic 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from clinic import build  # noqa: E402

from pipeline import db as D  # noqa: E402
from pipeline.collect import Settings, collect  # noqa: E402
from pipeline.imaging import is_dicom  # noqa: E402


def naive(paths: list[Path], size: int) -> float:
    import pydicom
    t = time.perf_counter()
    for p in paths:
        if is_dicom(p):
            arr = pydicom.dcmread(p).pixel_array.astype(np.float32)
        else:
            arr = np.asarray(Image.open(p).convert("L"), np.float32)
        cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA)
    return len(paths) / (time.perf_counter() - t)


def ours(paths: list[Path], size: int, workers: int, tmp: Path) -> float:
    engine = D.connect(f"sqlite:///{tmp / f'c{workers}.db'}")
    items = [(f"u{i}", str(p)) for i, p in enumerate(paths)]
    with engine.begin() as c:
        c.execute(D.images.insert(), [{"uid": u, "source": "bench", "path": p,
                                       "loaded_at": D.utcnow()} for u, p in items])
    t = time.perf_counter()
    s = collect(engine, items, Settings(size), tmp / f"cache{workers}", workers, progress=False)
    took = time.perf_counter() - t
    assert s.failed == 0, s
    return len(paths) / took


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clinic", type=int, default=100)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"GeneralBlockchain JPEG/PNG": sorted((args.data / "generalblockchain/images").glob("*"))}
        if args.clinic:
            build(args.clinic, tmp / "clinic", args.data)
            sets["clinic DICOM"] = sorted((tmp / "clinic").rglob("*.dcm"))
        for name, paths in sets.items():
            floor = naive(paths, args.size)
            line = f"{name} ({len(paths)} files, {args.size}px): naive {floor:.1f} img/s"
            for w in args.workers:
                ips = ours(paths, args.size, w, _mk(tmp / name.split()[0]))
                line += f"; collect x{w} {ips:.1f} img/s (ratio {ips / floor:.2f})"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

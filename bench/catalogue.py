"""Catalogue loading speed and memory.

1. NIH Data_Entry CSV (112,120 rows) into SQLite via `catalogue.load_nih`, as a ratio to
   `sqlite3`'s `.import` of the same decompressed CSV measured in the same run
   (ratio = sqlite3 time / our time; 1.0 = as fast as sqlite3's C importer).
2. A generated CSV of N rows (default 2,000,000) through `catalogue.load_csv`: time, and peak
   RSS after 1/4 of the rows versus after all of them (flat = streamed in batches).

Usage: python bench/catalogue.py [--rows 2000000] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import gzip
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import catalogue as C
from pipeline import db as D

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nih_ratio(data: Path, tmp: Path) -> None:
    src = data / "catalogues/nih/Data_Entry_2017_v2020.csv.gz"
    plain = tmp / "nih.csv"
    with gzip.open(src, "rb") as f, open(plain, "wb") as g:
        shutil.copyfileobj(f, g)
    if shutil.which("sqlite3") is None:
        sys.exit("sqlite3 command not found: apt-get install sqlite3")
    t = time.perf_counter()
    subprocess.run(["sqlite3", str(tmp / "base.db"), ".mode csv", f".import {plain} t"], check=True)
    base = time.perf_counter() - t
    engine = D.connect(f"sqlite:///{tmp / 'ours.db'}")
    t = time.perf_counter()
    s = C.load_nih(engine, plain, progress=False)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    C.load_nih(engine, plain, progress=False)
    reload = time.perf_counter() - t
    print(f"NIH {s.loaded} rows: sqlite3 .import {base:.2f} s, cxrlabel {ours:.2f} s "
          f"(reload {reload:.2f} s); ratio {base / ours:.2f} (goal >= 0.5)")


def write_csv(path: Path, rows: int) -> None:
    texts = ["Cardiomegaly.", "No acute cardiopulmonary abnormality.", "Норма.", "Small effusion."]
    with open(path, "w") as f:
        f.write("id,patient,age,sex,report\n")
        for i in range(rows):
            f.write(f"img{i:08d},p{i // 3},{20 + i % 70},{'MF'[i % 2]},{texts[i % 4]}\n")


def load_child(path: str, db: str) -> None:
    """Runs in a fresh process: load one CSV, print seconds and peak RSS."""
    mapping = C.parse_mapping(["uid=id", "patient_id=patient", "age=age", "sex=sex", "text=report"])
    engine = D.connect(db)
    t = time.perf_counter()
    s = C.load_csv(engine, Path(path), mapping, progress=False)
    print(s.loaded, time.perf_counter() - t, peak_rss_mb())


def big_csv(tmp: Path, rows: int) -> None:
    out = []
    for n in (rows // 4, rows):
        path = tmp / f"gen_{n}.csv"
        write_csv(path, n)
        res = subprocess.run([sys.executable, __file__, "--child", str(path), f"sqlite:///{tmp / f'gen_{n}.db'}"],
                             capture_output=True, text=True, check=True)
        loaded, took, rss = res.stdout.split()
        out.append((int(loaded), float(took), float(rss)))
        print(f"generated CSV, {int(loaded):,} rows: {float(took):.1f} s "
              f"({int(loaded) / float(took):,.0f} rows/s), peak RSS {float(rss):.0f} MB")
    print(f"peak RSS ratio {out[1][2] / out[0][2]:.2f} for 4x the rows (flat = 1.0)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        load_child(*args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        nih_ratio(args.data, Path(tmp))
        big_csv(Path(tmp), args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

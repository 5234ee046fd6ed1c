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


def big_csv(tmp: Path, rows: int) -> None:
    path = tmp / "big.csv"
    with open(path, "w") as f:
        f.write("id,patient,age,sex,report\n")
        texts = ["Cardiomegaly.", "No acute cardiopulmonary abnormality.", "Норма.", "Small effusion."]
        for i in range(rows):
            f.write(f"img{i:08d},p{i // 3},{20 + i % 70},{'MF'[i % 2]},{texts[i % 4]}\n")
    mapping = C.parse_mapping(["uid=id", "patient_id=patient", "age=age", "sex=sex", "text=report"])
    engine = D.connect(f"sqlite:///{tmp / 'big.db'}")
    quarter = tmp / "quarter.csv"
    with open(path) as f, open(quarter, "w") as g:
        for i, line in enumerate(f):
            if i > rows // 4:
                break
            g.write(line)
    t = time.perf_counter()
    C.load_csv(engine, quarter, mapping, progress=False)
    rss_quarter = peak_rss_mb()
    C.load_csv(engine, path, mapping, progress=False)
    took = time.perf_counter() - t
    rss_all = peak_rss_mb()
    print(f"generated CSV: {rows // 4 + rows} rows in {took:.1f} s ({(rows // 4 + rows) / took:,.0f} rows/s); "
          f"peak RSS after {rows // 4:,} rows {rss_quarter:.0f} MB, after {rows:,} rows {rss_all:.0f} MB "
          f"(ratio {rss_all / rss_quarter:.2f}, flat = 1.0)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        nih_ratio(args.data, Path(tmp))
        big_csv(Path(tmp), args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Labelling from a PACS against labelling the same films from disk, in one run (issue 43, point 7).

A private Orthanc (Debian's, with its DICOMweb plugin; tests/conftest.py's ``running_orthanc``)
on loopback holds N films made from the shared chest DICOMs (JPEG 2000 lossy, JPEG baseline
and JPEG 2000 lossless in turn; each copy a new patient, study, series and instance), stored
over STOW-RS; the same files lie in a folder. Measured:

1. STOW-RS store rate (what `export seg|sr --to` pays per object is of this order);
2. `catalogue load dicomweb` rows/s, with the series metadata (every header field, the
   default) and with QIDO's fields alone (``--fields qido``), against `catalogue load dicom`
   of the folder;
3. cold `label` (an empty cache: every film fetched or read, decoded, labelled and stored)
   from the PACS against from the folder, alternated ``--repeat`` times, each ratio against
   the run beside it, median quoted; goal: from the PACS at >= 0.8 of from disk with the
   default concurrency (one request in flight per decoder process).

Usage: python bench/pacs.py [--n 60] [--repeat 3] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import DICOM, PACS_PASSWORD, PACS_USER, orthanc_available, running_orthanc  # noqa: E402

KINDS = ("RG1_J2KI.dcm", "cr_chest_pa_jpeg_baseline.dcm", "RG1_J2KR.dcm")


def make_films(out: Path, n: int) -> list[Path]:
    """``n`` films: the shared ones in turn, each a new patient, study, series and instance."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n):
        ds = pydicom.dcmread(DICOM / KINDS[k % len(KINDS)])
        ds.PatientID = f"BENCH{k:05d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"film{k:05d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def cx(db: str, *args: str, env: dict) -> float:
    """Seconds a `cxrlabel` command took (it must succeed)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "--db", db, *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, help="label's decoder processes [every core]")
    args = ap.parse_args()
    if not orthanc_available():
        sys.exit("Orthanc not installed: apt-get install orthanc orthanc-dicomweb")
    work = Path(tempfile.mkdtemp(prefix="cxrlabel-pacs-bench-"))
    files = make_films(work / "films", args.n)
    env = {**os.environ, "CXRLABEL_PACS_USER": PACS_USER, "CXRLABEL_PACS_PASSWORD": PACS_PASSWORD}
    workers = ["--workers", str(args.workers)] if args.workers else []
    (work / "orthanc").mkdir()
    started = time.perf_counter()
    with running_orthanc(work / "orthanc", files) as pacs:
        stow = time.perf_counter() - started
        print(f"{args.n} films ({', '.join(KINDS)} in turn), {sum(f.stat().st_size for f in files) / 1e6:.0f} MB; "
              f"{os.cpu_count()} cores")
        print(f"STOW-RS into Orthanc (16 a request, with its start-up): {args.n / stow:.1f} instances/s")
        rates = {}
        for name, extra in (("dicomweb, series metadata", []), ("dicomweb, QIDO fields", ["--fields", "qido"])):
            db = f"sqlite:///{work / f'cat_{len(rates)}.db'}"
            rates[name] = args.n / cx(db, "catalogue", "load", "dicomweb", pacs.url, *extra, env=env)
        rates["dicom folder"] = args.n / cx(f"sqlite:///{work / 'cat_disk.db'}", "catalogue", "load", "dicom",
                                            str(work / "films"), env=env)
        for name, rate in rates.items():
            print(f"catalogue load {name}: {rate:.1f} rows/s (process start-up included)")
        ratios = []
        for k in range(args.repeat):
            seconds = {}
            for where in (("disk", "pacs") if k % 2 == 0 else ("pacs", "disk")):
                db = f"sqlite:///{work / f'label_{where}_{k}.db'}"
                if where == "pacs":
                    cx(db, "catalogue", "load", "dicomweb", pacs.url, env=env)
                else:
                    cx(db, "catalogue", "load", "dicom", str(work / "films"), env=env)
                run_env = {**env, "CXRLABEL_CACHE": str(work / f"cache_{where}_{k}")}
                seconds[where] = cx(db, "label", "--all", *workers, env=run_env)
            ratios.append(seconds["disk"] / seconds["pacs"])
            print(f"run {k + 1}: cold label from disk {args.n / seconds['disk']:.2f} films/s, from the PACS "
                  f"{args.n / seconds['pacs']:.2f} films/s: ratio {ratios[-1]:.2f}", flush=True)
        print(f"from the PACS / from disk, median of {args.repeat}: {statistics.median(ratios):.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()

"""Quality of the group rules on OpenI, against its MeSH major tags (never read by the rules).

Usage: python bench/groups_openi.py [../shared/data/catalogues/openi/NLMCXR_reports.tgz] [--rules F]
Prints precision/recall for cardiomegaly and precision for healthy (MeSH exactly 'normal'),
and how many reports a second the rules group on one core.

Which MeSH tags make a report cardiomegaly: OpenI indexes the same written finding under two
headings, 'Cardiomegaly' and 'Cardiac Shadow/enlarged' ("enlarged heart", "enlargement of the
heart" and "the cardiac silhouette is enlarged" all appear under the second). An enlarged
cardiac silhouette is how a film shows an enlarged heart, and the product's cardiomegaly group
means exactly that, so the yardstick is either heading; the figures against 'Cardiomegaly'
alone are printed beside it.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.groups import classify, load_rules

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/catalogues/openi/NLMCXR_reports.tgz"


def reports(path: Path):
    with tarfile.open(path) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if not m.name.endswith(".xml"):
                continue
            root = ET.parse(tar.extractfile(m)).getroot()
            sec = {e.get("Label"): (e.text or "").strip() for e in root.iter("AbstractText")}
            text = " ".join(s for s in (sec.get("FINDINGS"), sec.get("IMPRESSION")) if s)
            mesh = [(e.text or "").strip() for e in root.iter("major")]
            yield m.name, text, mesh


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("source", nargs="?", default=str(DEFAULT))
    ap.add_argument("--rules")
    ap.add_argument("--show", type=int, default=0, help="print N errors of each kind")
    args = ap.parse_args(argv)
    rules = load_rules(args.rules)
    tp = fp = fn = htp = hfp = n = hn = strict_tp = strict_fp = strict_fn = 0
    errors: dict[str, list] = {"cardio_fp": [], "cardio_fn": [], "healthy_fp": []}
    indexed = [r for r in reports(Path(args.source)) if r[2] != ["No Indexing"]]  # else no yardstick
    start = time.perf_counter()
    groups = [classify(text, None, rules) for _, text, _ in indexed]
    seconds = time.perf_counter() - start
    for (name, text, mesh), (group, why) in zip(indexed, groups, strict=True):
        n += 1
        strict = any(t.lower().startswith("cardiomegaly") for t in mesh)
        truth_c = strict or any(t.lower().startswith("cardiac shadow/enlarged") for t in mesh)
        truth_h = mesh == ["normal"]
        hn += truth_h
        strict_tp += group == "cardiomegaly" and strict
        strict_fp += group == "cardiomegaly" and not strict
        strict_fn += group != "cardiomegaly" and strict
        if group == "cardiomegaly":
            tp += truth_c
            fp += not truth_c
            if not truth_c:
                errors["cardio_fp"].append((name, why, mesh, text))
        elif truth_c:
            fn += 1
            errors["cardio_fn"].append((name, why, mesh, text))
        if group == "healthy":
            htp += truth_h
            hfp += not truth_h
            if not truth_h:
                errors["healthy_fp"].append((name, why, mesh, text))
    p = tp / max(1, tp + fp)
    r = tp / max(1, tp + fn)
    hp = htp / max(1, htp + hfp)
    print(f"reports with MeSH tags: {n}, grouped at {n / seconds:,.0f} reports/s on one core")
    print(f"cardiomegaly (MeSH Cardiomegaly or Cardiac Shadow/enlarged): precision {p:.3f} recall {r:.3f} "
          f"(tp {tp}, fp {fp}, fn {fn})")
    print(f"cardiomegaly (MeSH Cardiomegaly alone): precision {strict_tp / max(1, strict_tp + strict_fp):.3f} "
          f"recall {strict_tp / max(1, strict_tp + strict_fn):.3f} (tp {strict_tp}, fp {strict_fp}, fn {strict_fn})")
    print(f"healthy: precision {hp:.3f} recall {htp / max(1, hn):.3f} (tp {htp}, fp {hfp}, mesh-normal {hn})")
    for kind, rows in errors.items():
        for row in rows[: args.show]:
            print(f"--- {kind} {row[0]} {row[1]} {row[2]}\n    {row[3][:400]}")
    ok = p >= 0.975 and r >= 0.985 and hp >= 0.95 and n / seconds >= 1000
    print("targets (cardiomegaly P>=0.975 R>=0.985, healthy P>=0.95, >=1,000 reports/s):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())

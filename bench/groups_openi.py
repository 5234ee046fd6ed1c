"""Quality of the group rules on OpenI, against its MeSH major tags (never read by the rules).

Usage: python bench/groups_openi.py [../shared/data/catalogues/openi/NLMCXR_reports.tgz] [--rules F]
Prints precision/recall for cardiomegaly (MeSH 'Cardiomegaly*') and precision for healthy
(MeSH exactly 'normal').
"""

from __future__ import annotations

import argparse
import sys
import tarfile
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
    tp = fp = fn = htp = hfp = n = hn = 0
    errors: dict[str, list] = {"cardio_fp": [], "cardio_fn": [], "healthy_fp": []}
    for name, text, mesh in reports(Path(args.source)):
        if mesh == ["No Indexing"]:  # not annotated: no yardstick to judge by
            continue
        n += 1
        truth_c = any(t.lower().startswith("cardiomegaly") for t in mesh)
        truth_h = mesh == ["normal"]
        hn += truth_h
        group, why = classify(text, None, rules)
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
    print(f"reports with MeSH tags: {n}")
    print(f"cardiomegaly: precision {p:.3f} recall {r:.3f} (tp {tp}, fp {fp}, fn {fn})")
    print(f"healthy: precision {hp:.3f} recall {htp / max(1, hn):.3f} (tp {htp}, fp {hfp}, mesh-normal {hn})")
    for kind, rows in errors.items():
        for row in rows[: args.show]:
            print(f"--- {kind} {row[0]} {row[1]} {row[2]}\n    {row[3][:400]}")
    ok = p >= 0.95 and r >= 0.90 and hp >= 0.95
    print("targets (cardiomegaly P>=0.95 R>=0.90, healthy P>=0.95):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())

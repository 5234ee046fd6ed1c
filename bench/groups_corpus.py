"""Group rules on the project's own sentence corpus: precision and recall per language and group.

The corpus (tests/fixtures/report_corpus.tsv) holds Russian and English report sentences
written the way radiology reports are written, each with its expected group (cardiomegaly,
healthy, or none) and the construction it exercises: inflected forms, negation before and
after the term, doubt, normal-study phrasings, clause and sentence boundaries, a CTR stated
in the text, and a stated CTR that contradicts the text. The rules were written against it,
so these figures show what the rules handle, not how they generalise: for that, see
bench/groups_openi.py (English, a yardstick the rules never read).

Usage: python bench/groups_corpus.py [--corpus FILE] [--rules FILE] [--show]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.groups import decide, load_rules  # noqa: E402

DEFAULT = REPO / "tests" / "fixtures" / "report_corpus.tsv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT)
    ap.add_argument("--rules")
    ap.add_argument("--show", action="store_true", help="print every sentence decided wrongly, with its steps")
    args = ap.parse_args(argv)
    rules = load_rules(args.rules)
    with open(args.corpus, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        d = decide(r["text"], None, rules, trace=True)
        r["got"], r["steps"] = d.group or "none", d.steps
    print(f"{len(rows)} sentences from {args.corpus.name}, rules {rules.source}")
    print("| language | group | sentences | precision | recall |")
    print("|---|---|---|---|---|")
    for lang in sorted({r["lang"] for r in rows}):
        mine = [r for r in rows if r["lang"] == lang]
        for group in ("cardiomegaly", "healthy", "none"):
            tp = sum(r["got"] == group and r["expected"] == group for r in mine)
            called = sum(r["got"] == group for r in mine)
            truth = sum(r["expected"] == group for r in mine)
            p = f"{tp / called:.3f} ({tp}/{called})" if called else "-"
            rec = f"{tp / truth:.3f} ({tp}/{truth})" if truth else "-"
            print(f"| {lang} | {group} | {truth} | {p} | {rec} |")
    wrong = [r for r in rows if r["got"] != r["expected"]]
    print(f"decided wrongly: {len(wrong)}")
    for r in wrong if args.show else []:
        print(f"- [{r['lang']} {r['construction']}] expected {r['expected']}, got {r['got']}: {r['text']}")
        for step in r["steps"]:
            print(f"    {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

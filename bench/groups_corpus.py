"""Group rules on the project's own corpora: precision and recall per corpus part, language and group.

* tests/fixtures/report_corpus.tsv: hand-written Russian and English report sentences, each
  with its expected group (cardiomegaly, healthy, or none) and the construction it exercises
  (inflected forms, negation before and after the term, doubt, normal-study phrasings, clause
  and sentence boundaries, a CTR stated in the text, one that contradicts the text);
* tests/fixtures/report_grammar.tsv: reports written by bench/report_grammar.py from a grammar
  of the ways a finding is stated, in two parts: ``tune`` (the rules were fitted on it) and
  ``heldout`` (never read while writing the rules: its figures are how the rules generalise
  to phrasing of the kinds the grammar knows).

The rules were written against the first corpus and the tune part, so their figures show what
the rules handle; the held-out part and bench/groups_openi.py (English, MeSH) show how they
generalise.

Usage: python bench/groups_corpus.py [--corpus FILE ...] [--rules FILE] [--show]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.groups import decide, load_rules  # noqa: E402

DEFAULT = [REPO / "tests" / "fixtures" / "report_corpus.tsv", REPO / "tests" / "fixtures" / "report_grammar.tsv"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, action="append",
                    help="a corpus TSV (repeat; default: both of the project's)")
    ap.add_argument("--rules")
    ap.add_argument("--show", action="store_true", help="print every sentence decided wrongly, with its steps")
    args = ap.parse_args(argv)
    rules = load_rules(args.rules)
    rows = []
    for path in args.corpus or DEFAULT:
        with open(path, encoding="utf-8") as f:
            rows += [{**r, "part": f"{path.stem} {r.get('part', '')}".strip()}
                     for r in csv.DictReader(f, delimiter="\t")]
    for r in rows:
        d = decide(r["text"], None, rules, trace=True)
        r["got"], r["steps"] = d.group or "none", d.steps
    print(f"{len(rows)} reports, rules {rules.source}")
    print("| corpus | language | group | reports | precision | recall |")
    print("|---|---|---|---|---|---|")
    for part in dict.fromkeys(r["part"] for r in rows):
        for lang in sorted({r["lang"] for r in rows if r["part"] == part}):
            mine = [r for r in rows if r["lang"] == lang and r["part"] == part]
            for group in ("cardiomegaly", "healthy", "none"):
                tp = sum(r["got"] == group and r["expected"] == group for r in mine)
                called = sum(r["got"] == group for r in mine)
                truth = sum(r["expected"] == group for r in mine)
                p = f"{tp / called:.3f} ({tp}/{called})" if called else "-"
                rec = f"{tp / truth:.3f} ({tp}/{truth})" if truth else "-"
                print(f"| {part} | {lang} | {group} | {truth} | {p} | {rec} |")
    wrong = [r for r in rows if r["got"] != r["expected"]]
    print(f"decided wrongly: {len(wrong)}")
    for r in wrong if args.show else []:
        print(f"- [{r['part']} {r['lang']} {r['construction']}] expected {r['expected']}, got {r['got']}: {r['text']}")
        for step in r["steps"]:
            print(f"    {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

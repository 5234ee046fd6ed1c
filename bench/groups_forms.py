"""Stems or lemmas? The Russian group rules against every word form pymorphy3 knows.

The Russian rules match word stems (``расширен\\w*``, ``сердц\\w*``), so one pattern is meant
to cover every case, number and gender of a word. The alternative is to lemmatise each word
(pymorphy3) and write the rules on lemmas. This measures both on the same words:

* forms: pymorphy3 generates every form of the words the heart rules are about (the heart,
  its shadow, diameter and ventricle; enlarged and widened as participles and as nouns;
  cardiomegaly), each is put into a finding sentence, and the shipped stem rules must decide
  it as the sentence says (enlarged, or the same stated absent);
* lemmas: how many of the same forms pymorphy3's first parse takes back to the right lemma;
* speed: reports a second on one core of the stem rules deciding the project's two corpora
  (tests/fixtures/report_corpus.tsv and report_grammar.tsv), against lemmatising the same
  reports' Russian words alone, without a cache and with a warm one.

Usage: python bench/groups_forms.py [--rules FILE] [--show]
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.groups import decide, load_rules  # noqa: E402

CORPORA = [REPO / "tests" / "fixtures" / "report_corpus.tsv", REPO / "tests" / "fixtures" / "report_grammar.tsv"]

# (lemma, parts of speech kept, sentence with {w}, the group the sentence means)
CASES = [
    ("сердце", {"NOUN"}, "{w} расширено влево", "cardiomegaly"),
    ("сердце", {"NOUN"}, "{w} обычных размеров", "healthy"),
    ("тень", {"NOUN"}, "{w} сердца расширена в поперечнике", "cardiomegaly"),
    ("поперечник", {"NOUN"}, "{w} сердца увеличен", "cardiomegaly"),
    ("желудочек", {"NOUN"}, "левый {w} увеличен", "cardiomegaly"),
    ("расширенный", {"PRTF", "PRTS"}, "Сердце {w}", "cardiomegaly"),
    ("расширенный", {"PRTF", "PRTS"}, "Тень сердца не {w}", "healthy"),
    ("увеличенный", {"PRTF", "PRTS"}, "Сердце умеренно {w} влево", "cardiomegaly"),
    ("увеличенный", {"PRTF", "PRTS"}, "Сердце не {w}", "healthy"),
    ("расширение", {"NOUN"}, "Определяется {w} тени сердца", "cardiomegaly"),
    ("расширение", {"NOUN"}, "{w} тени сердца не выявлено", "healthy"),
    ("увеличение", {"NOUN"}, "Отмечается {w} левого желудочка", "cardiomegaly"),
    ("кардиомегалия", {"NOUN"}, "Рентгенологически {w}", "cardiomegaly"),
    ("кардиомегалия", {"NOUN"}, "Без признаков {w}", "healthy"),
]


def forms(morph, lemma: str, pos: set[str]) -> list[str]:
    """Every form of ``lemma`` pymorphy3 knows, in the parts of speech ``pos`` (participles:
    passive only, the ones a finding uses)."""
    parse = next(p for p in morph.parse(lemma) if p.tag.POS in pos)
    return sorted({f.word for f in parse.lexeme
                   if f.tag.POS in pos and (f.tag.POS not in ("PRTF", "PRTS") or "pssv" in f.tag)})


def lemma_of(morph, word: str) -> str:
    """pymorphy3's first parse, its lemma; a participle's lemma is its verb's, so it is read
    as the participle's full form (as a rule written on lemmas would name it)."""
    p = morph.parse(word)[0]
    if p.tag.POS in ("PRTF", "PRTS"):
        full = p.inflect({"PRTF", "sing", "masc", "nomn"} if p.tag.POS == "PRTS" else {"sing", "masc", "nomn"})
        return full.word if full else p.normal_form
    return p.normal_form


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules")
    ap.add_argument("--show", action="store_true", help="print each form decided wrongly")
    args = ap.parse_args(argv)
    try:
        import pymorphy3
    except ImportError:
        print("this bench needs pymorphy3: pip install pymorphy3")
        return 2
    morph = pymorphy3.MorphAnalyzer()
    rules = load_rules(args.rules)
    print("| words | sentence | forms | stems decide right | pymorphy3 lemma right |")
    print("|---|---|---|---|---|")
    all_forms = stem_right = lemma_right = 0
    for lemma, pos, template, expected in CASES:
        words = forms(morph, lemma, pos)
        right = [w for w in words if (decide(template.format(w=w) + ".", None, rules).group or "none") == expected]
        lemmas = [w for w in words if lemma_of(morph, w) == lemma]
        all_forms += len(words)
        stem_right += len(right)
        lemma_right += len(lemmas)
        print(f"| {lemma} | {template} -> {expected} | {len(words)} | {len(right)} | {len(lemmas)} |")
        for w in sorted(set(words) - set(right)) if args.show else []:
            print(f"    stems wrong: {template.format(w=w)}")
        for w in sorted(set(words) - set(lemmas)) if args.show else []:
            print(f"    lemma wrong: {w} -> {lemma_of(morph, w)}")
    print(f"| all | | {all_forms} | {stem_right} ({stem_right / all_forms:.1%}) | "
          f"{lemma_right} ({lemma_right / all_forms:.1%}) |")

    reports = []
    for path in CORPORA:
        with open(path, encoding="utf-8") as f:
            reports += [r["text"] for r in csv.DictReader(f, delimiter="\t") if r["lang"] == "ru"]
    words = [re.findall(r"[а-яё]+", t.lower()) for t in reports]
    start = time.perf_counter()
    for t in reports:
        decide(t, None, rules)
    stems = len(reports) / (time.perf_counter() - start)
    start = time.perf_counter()
    for ws in words:
        [morph.parse(w)[0].normal_form for w in ws]
    cold = len(reports) / (time.perf_counter() - start)
    cached = lru_cache(maxsize=None)(lambda w: morph.parse(w)[0].normal_form)
    for ws in words:
        [cached(w) for w in ws]
    start = time.perf_counter()
    for ws in words:
        [cached(w) for w in ws]
    warm = len(reports) / (time.perf_counter() - start)
    n_words = sum(map(len, words))
    print(f"\n{len(reports)} Russian reports ({n_words / len(reports):.1f} words each), one core:")
    print(f"- stem rules, the whole decision: {stems:,.0f} reports/s")
    print(f"- pymorphy3 lemmas alone, before any rule: {cold:,.0f} reports/s without a cache, "
          f"{warm:,.0f} with a warm one")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A grammar of the ways a chest film report states (or does not state) an enlarged heart or a
normal study, in Russian and English, and the sentences it writes.

The group rules were written against hand-picked sentences (tests/fixtures/report_corpus.tsv);
this grammar writes reports by kinds of phrasing instead: who the subject is (the heart, its
shadow, its size, its diameter, `Cor`, the left ventricle), how the finding is predicated
(participle, noun, "of large size", a stated CTR), where the negation or doubt stands (before,
after, closing the sentence, a rule-out request), what modifies it (degree, direction, a
descriptive phrase between commas), and how it is typed (capitals, a doubled letter, a missing
space, ё or е). Each report is a few statements of heart, lungs and the rest, and its expected
group follows from what the statements say, not from the rules:

* cardiomegaly: the heart is stated enlarged (however modified), with no doubt on it;
* healthy: every statement is normal (a rule-out request in the referral is a question, not a
  finding, so it does not spoil a normal study);
* none: a doubted enlargement, or a normal heart beside an abnormal finding.

Parts are written from different seeds: ``tune`` (the rules may be fitted on it) and
``heldout`` (never read while writing rules; bench/groups_corpus.py reports it). A held-out
part, once read to fix a rule, is tuning data from then on: the first one (seed 5122026) was,
on 2026-12-05, so it joined ``tune`` and a fresh held-out part was drawn (bench/RESULTS.md).
A held-out report never repeats a tuning one.

Usage: python bench/report_grammar.py [--out tests/fixtures/report_grammar.tsv]
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "report_grammar.tsv"
# (part, seed, reports per language, shapes), in the order they were drawn; the past's and a
# relative's statements (CONTEXT_SHAPES) came on 2026-12-07 with a held-out part of their own
PARTS = [("tune", 20261205, 200, "plain"), ("tune", 5122026, 100, "plain"), ("heldout", 1812202612, 150, "plain"),
         ("tune", 7122026, 80, "context"), ("heldout", 2612071207, 80, "context")]


@dataclass
class Statement:
    text: str
    kind: str  # 'enlarged', 'doubted', 'heart_normal', 'normal', 'abnormal', 'referral'
    construction: str


# ------------------------------------------------------------------------------------ Russian
# a subject and its gender (m, f, n, p) for the participle's ending
RU_HEART = [("сердце", "n"), ("тень сердца", "f"), ("сердечная тень", "f"), ("поперечник сердца", "m"),
            ("размеры сердца", "p"), ("сердечная тень в поперечнике", "f"), ("тень сердца в размерах", "f"),
            ("левый желудочек", "m"), ("сердце в поперечнике", "n"), ("контуры сердца", "p")]
RU_END = {"m": "", "f": "а", "n": "о", "p": "ы"}
RU_DEGREE = ["", "умеренно ", "значительно ", "незначительно ", "резко ", "несколько ", "слегка "]
RU_DIRECTION = ["", " влево", " в поперечнике", " за счет левых отделов", " в обе стороны", " влево и вниз",
                " за счёт левого желудочка"]
RU_VERB = ["расширен", "увеличен"]
RU_DESCRIPTIVE = ["с четкими ровными контурами", "обычно расположенное", "как и на прежних снимках",
                  "по сравнению с предыдущим исследованием", "с сохранённой талией",
                  "митральной конфигурации", "при глубоком вдохе", "аортальной конфигурации"]
RU_NOUNS = ["кардиомегалия", "расширение тени сердца", "увеличение размеров сердца",
            "расширение сердца влево", "увеличение левого желудочка", "расширение границ сердца"]
RU_NOUNS_GEN = ["кардиомегалии", "расширения тени сердца", "увеличения размеров сердца",
                "расширения сердца", "увеличения сердца"]
RU_NORMAL_HEART = ["не расширен{e}", "не увеличен{e}", "обычных размеров", "нормальных размеров",
                   "обычной формы и размеров", "в пределах нормы", "без особенностей", "обычной конфигурации",
                   "не изменен{e}", "не расширен{e} в поперечнике"]
RU_LUNG_NORMAL = ["Легкие без очаговых и инфильтративных теней",
                  "В легких без свежих очаговых и инфильтративных изменений",
                  "Легочные поля прозрачны", "Лёгочный рисунок не изменён", "Легкие расправлены, прозрачны",
                  "Очаговых и инфильтративных изменений в легких не выявлено", "Лёгкие без патологических изменений",
                  "Легочная ткань без очаговых теней", "Pulmo: без очаговых и инфильтративных теней",
                  "Pulmo - без особенностей", "Инфильтративных теней не определяется"]
RU_OTHER_NORMAL = ["Синусы свободны", "Корни структурны", "Купола диафрагмы четкие, ровные",
                   "Реберно-диафрагмальные синусы свободные", "Корни легких не расширены, структурны",
                   "Диафрагма расположена обычно", "Средостение не смещено", "Аорта не изменена"]
RU_WHOLE_NORMAL = ["Без рентгенологических признаков патологии органов грудной клетки",
                   "Органы грудной клетки без видимой патологии", "Рентгенологических признаков патологии не выявлено",
                   "Органы грудной полости - возрастная норма",
                   "Рентгенологическая картина соответствует возрастной норме",
                   "Патологических изменений органов грудной клетки не выявлено", "Норма",
                   "Данных за патологию органов грудной клетки нет"]
RU_ABNORMAL = ["В нижней доле правого легкого инфильтрация", "Справа в синусе небольшое количество жидкости",
               "Очаговая тень в S6 левого легкого", "Пневмофиброз в нижних отделах", "Аорта уплотнена, развернута",
               "Корни легких расширены, малоструктурны", "Левосторонний плевральный выпот",
               "Усиление легочного рисунка за счет интерстициального компонента", "Застойные явления в малом круге",
               "Единичные кальцинаты в корнях", "Плевральные наслоения справа", "Деформация легочного рисунка"]
RU_REFERRAL = ["Направлен с целью исключения {x}", "Цель исследования: исключить {y}", "Для исключения {x}",
               "На предмет {x}", "Диагноз при направлении: {q}?", "Исключить {y}"]
RU_REFERRAL_X = [("пневмонии", "пневмонию", "пневмония"), ("кардиомегалии", "кардиомегалию", "кардиомегалия"),
                 ("туберкулеза", "туберкулез", "туберкулез"), ("плеврита", "плеврит", "плеврит")]
RU_DOUBT_PRE = ["возможно, ", "вероятно, ", "по-видимому, ", "предположительно "]


def ru_heart_enlarged(r: random.Random) -> Statement:
    kind = r.choice(["participle", "participle", "noun", "descriptive", "size", "latin", "post_participle"])
    subject, g = r.choice(RU_HEART)
    pred = r.choice(RU_DEGREE) + r.choice(RU_VERB) + RU_END[g] + r.choice(RU_DIRECTION)
    if kind == "participle":
        return Statement(f"{subject} {pred}", "enlarged", "ru_enlarged_participle")
    if kind == "post_participle":  # predicate first, as a finding list writes it
        return Statement(f"{pred.strip()} {subject}", "enlarged", "ru_enlarged_predicate_first")
    if kind == "noun":
        lead = r.choice(["", "Определяется ", "Отмечается ", "Выявлена ", "Рентгенологически "])
        noun = r.choice(RU_NOUNS)
        return Statement(f"{lead}{noun}", "enlarged", "ru_enlarged_noun")
    if kind == "descriptive":
        subject, g = r.choice([("сердце", "n"), ("тень сердца", "f"), ("сердечная тень", "f")])
        desc = r.choice(RU_DESCRIPTIVE)
        if desc == "обычно расположенное":
            desc = {"n": "обычно расположенное", "f": "обычно расположенная"}[g]
        pred = r.choice(RU_DEGREE) + r.choice(RU_VERB) + RU_END[g] + r.choice(RU_DIRECTION)
        return Statement(f"{subject}, {desc}, {pred}", "enlarged", "ru_enlarged_after_descriptive")
    if kind == "size":
        subject = r.choice(["сердце", "тень сердца", "сердечная тень"])
        size = r.choice(["больших размеров", "значительно больших размеров", "увеличенных размеров"])
        return Statement(f"{subject} {size}", "enlarged", "ru_enlarged_size")
    finding = r.choice(["расширено влево", "увеличено", "расширено в поперечнике", "кардиомегалия",
                        "умеренно расширено", "расширено за счет левых отделов"])
    sep = r.choice([": ", " - ", " – ", " — "])
    return Statement(f"Cor{sep}{finding}", "enlarged", "ru_enlarged_latin")


def ru_heart_normal(r: random.Random) -> Statement:
    kind = r.choice(["predicate", "predicate", "negated_noun", "post_negated", "latin", "descriptive"])
    if kind == "predicate":
        subject, g = r.choice(RU_HEART[:5])
        choices = ["не увеличен{e}", "в пределах нормы", "не изменен{e}"] if g == "p" else RU_NORMAL_HEART
        return Statement(f"{subject} {r.choice(choices).format(e=RU_END[g])}", "heart_normal", "ru_heart_normal")
    if kind == "negated_noun":
        lead = r.choice(["Без признаков ", "Нет ", "Данных за ", "Признаков "])
        noun = r.choice(RU_NOUNS_GEN)
        text = {"Данных за ": f"Данных за {r.choice(['кардиомегалию', 'расширение сердца'])} нет",
                "Признаков ": f"Признаков {noun} не выявлено"}.get(lead, lead + noun)
        return Statement(text, "heart_normal", "ru_heart_negated_noun")
    if kind == "post_negated":
        noun = r.choice(RU_NOUNS_GEN)
        verb = r.choice(["не выявлено", "не определяется", "нет", "не отмечается", "не обнаружено"])
        return Statement(f"{noun} {verb}", "heart_normal", "ru_heart_negation_after")
    if kind == "latin":
        finding = r.choice(["N", "норма", "без особенностей", "не расширено", "обычных размеров", "в норме"])
        return Statement(f"Cor{r.choice([': ', ' - ', ' – '])}{finding}", "heart_normal", "ru_heart_latin")
    subject, g = r.choice([("сердце", "n"), ("тень сердца", "f")])
    desc = r.choice(["с четкими ровными контурами", "как и ранее", "при обычной установке"])
    return Statement(f"{subject}, {desc}, не {r.choice(RU_VERB)}{RU_END[g]}", "heart_normal",
                     "ru_heart_normal_after_descriptive")


def ru_heart_doubted(r: random.Random) -> Statement:
    kind = r.choice(["pre", "post", "question", "noun", "cannot"])
    subject, g = r.choice(RU_HEART[:5])
    pred = r.choice(RU_VERB) + RU_END[g]
    if kind == "pre":
        return Statement(f"{r.choice(RU_DOUBT_PRE)}{subject} {pred}", "doubted", "ru_doubt_before")
    if kind == "post":
        return Statement(f"{subject} {pred}{r.choice([' (?)', '?', ' под вопросом'])}", "doubted", "ru_doubt_after")
    if kind == "question":
        return Statement(f"{r.choice(['Кардиомегалия', 'Расширение тени сердца'])}?", "doubted", "ru_doubt_question")
    if kind == "noun":
        return Statement(f"{r.choice(['Сомнительное', 'Нельзя исключить', 'Подозрение на'])} "
                         f"{r.choice(['расширение тени сердца', 'кардиомегалию', 'увеличение левого желудочка'])}",
                         "doubted", "ru_doubt_noun")
    return Statement(f"{r.choice(['Кардиомегалия', 'Расширение сердца влево'])} не исключается", "doubted",
                     "ru_doubt_closing")


RU_PAST_NOUN = ["кардиомегалия", "расширение тени сердца", "увеличение левого желудочка", "расширение сердца влево",
                "увеличение размеров сердца"]
RU_PAST_PARTICIPLE = {"кардиомегалия": "выявленная", "расширение тени сердца": "описанное",
                      "увеличение левого желудочка": "выявленное", "расширение сердца влево": "отмеченное",
                      "увеличение размеров сердца": "выявленное"}
RU_RELATIVE = ["матери", "отца", "брата", "сестры", "родителей"]


def ru_heart_past(r: random.Random) -> Statement:
    """An enlargement of the past, not today's film's (ConText's historical context)."""
    noun = r.choice(RU_PAST_NOUN)
    kind = r.choice(["before", "after", "earlier", "earlier_after", "previous_films"])
    if kind == "before":
        return Statement(f"В анамнезе {noun}", "historical", "ru_past_before")
    if kind == "after":
        return Statement(f"{noun} в анамнезе", "historical", "ru_past_after")
    if kind == "earlier":
        return Statement(f"Ранее {RU_PAST_PARTICIPLE[noun]} {noun}", "historical", "ru_past_earlier")
    if kind == "earlier_after":
        return Statement(f"{noun} {RU_PAST_PARTICIPLE[noun]} ранее",
                         "historical", "ru_past_earlier_after")
    verb = "определялась" if noun == "кардиомегалия" else "определялось"
    return Statement(f"На {r.choice(['предыдущих', 'прежних'])} {r.choice(['снимках', 'рентгенограммах'])} "
                     f"{verb} {noun}", "historical", "ru_past_previous_films")


def ru_heart_family(r: random.Random) -> Statement:
    """A relative's enlarged heart (ConText's experiencer)."""
    noun = r.choice(["кардиомегалия", "кардиомиопатия с кардиомегалией", "расширение сердца"])
    kind = r.choice(["before", "after", "family"])
    if kind == "before":
        return Statement(f"У {r.choice(RU_RELATIVE)} {noun}", "family", "ru_family_before")
    if kind == "after":
        return Statement(f"{noun} у {r.choice(RU_RELATIVE)}", "family", "ru_family_after")
    return Statement(f"Семейный анамнез: {noun} у {r.choice(RU_RELATIVE)}", "family", "ru_family_history")


def ru_referral(r: random.Random) -> Statement:
    gen, acc, nom = r.choice(RU_REFERRAL_X)
    return Statement(r.choice(RU_REFERRAL).format(x=gen, y=acc, q=nom), "referral", "ru_referral")


RU = {"historical": ru_heart_past, "family": ru_heart_family,
      "enlarged": ru_heart_enlarged, "heart_normal": ru_heart_normal, "doubted": ru_heart_doubted,
      "referral": ru_referral,
      "lung_normal": lambda r: Statement(r.choice(RU_LUNG_NORMAL), "normal", "ru_lungs_normal"),
      "other_normal": lambda r: Statement(r.choice(RU_OTHER_NORMAL), "normal", "ru_other_normal"),
      "whole_normal": lambda r: Statement(r.choice(RU_WHOLE_NORMAL), "normal", "ru_whole_normal"),
      "abnormal": lambda r: Statement(r.choice(RU_ABNORMAL), "abnormal", "ru_abnormal")}

# ------------------------------------------------------------------------------------ English
EN_HEART = ["the heart", "heart size", "the cardiac silhouette", "the cardiac shadow", "cardiac size",
            "the heart size", "the cardiomediastinal silhouette", "the cardiac contour"]
EN_DEGREE = ["", "mildly ", "moderately ", "markedly ", "slightly ", "severely ", "significantly "]
EN_VERB = ["is {d}enlarged", "appears {d}enlarged", "remains {d}enlarged", "is again {d}enlarged",
           "is {d}increased", "has {d}increased"]
EN_DESCRIPTIVE = ["as before", "allowing for technique", "accounting for the AP projection",
                  "as on the prior study", "with a left ventricular configuration", "for the patient's age"]
EN_NOUNS = ["cardiomegaly", "cardiac enlargement", "an enlarged heart", "enlargement of the cardiac silhouette",
            "{a}cardiomegaly", "{a}cardiac enlargement", "borderline cardiomegaly", "an enlarged cardiac silhouette"]
EN_NORMAL_HEART = ["{s} is normal", "{s} is within normal limits", "{s} is not enlarged", "{s} is normal in size",
                   "{s} appears normal", "normal {n}", "no cardiomegaly", "{s} is unremarkable",
                   "cardiomegaly: none", "no evidence of cardiomegaly", "the heart is not enlarged",
                   "heart size normal", "{s} is stable and normal", "without cardiomegaly"]
EN_LUNG_NORMAL = ["The lungs are clear", "Lungs are clear bilaterally",
                  "No focal consolidation, effusion or pneumothorax", "No pleural effusion or pneumothorax",
                  "Clear lungs", "Lungs: clear", "The lungs are well expanded and clear",
                  "No focal airspace disease", "No infiltrates"]
EN_OTHER_NORMAL = ["The mediastinum is normal", "No pneumothorax", "Bony structures are intact",
                   "The costophrenic angles are sharp", "Pulmonary vasculature is normal"]
EN_WHOLE_NORMAL = ["No acute cardiopulmonary abnormality", "Normal chest radiograph",
                   "No acute cardiopulmonary process",
                   "Normal chest x-ray", "No active disease", "Negative chest", "No acute disease",
                   "Normal study", "No radiographic evidence of acute cardiopulmonary disease"]
EN_ABNORMAL = ["Right lower lobe consolidation", "Small left pleural effusion", "Patchy opacity in the left base",
               "Hyperinflated lungs consistent with emphysema", "Calcified granuloma in the right upper lobe",
               "Bibasilar atelectasis", "Pulmonary vascular congestion", "Degenerative changes of the spine",
               "Left basilar scarring", "Interstitial edema", "Tortuous aorta", "Healed rib fractures on the right"]
EN_REFERRAL = ["Indication: r/o {x}", "Reason for exam: rule out {x}", "Clinical history: evaluate for {x}",
               "History: ? {x}", "Indication: to exclude {x}", "Indication: query {x}"]
EN_REFERRAL_X = ["pneumonia", "cardiomegaly", "effusion", "pneumothorax", "CHF"]


def en_heart_enlarged(r: random.Random) -> Statement:
    kind = r.choice(["verb", "verb", "noun", "descriptive", "size", "ctr"])
    d = r.choice(EN_DEGREE)
    if kind == "verb":
        return Statement(f"{r.choice(EN_HEART)} {r.choice(EN_VERB).format(d=d)}", "enlarged", "en_enlarged_verb")
    if kind == "noun":
        lead = r.choice(["", "There is ", "Stable ", "Again seen is ", "Findings consistent with "])
        a = r.choice(["", "mild ", "moderate ", "marked ", "severe ", "slight "])
        return Statement(lead + r.choice(EN_NOUNS).format(a=a), "enlarged", "en_enlarged_noun")
    if kind == "descriptive":
        verb = r.choice(EN_VERB[:3]).format(d=d)
        return Statement(f"{r.choice(EN_HEART[:4])}, {r.choice(EN_DESCRIPTIVE)}, {verb}", "enlarged",
                         "en_enlarged_after_descriptive")
    if kind == "size":
        subject = r.choice(["The heart", "The cardiac silhouette"])
        size = r.choice(["large", "enlarged in size", "increased in size"])
        return Statement(f"{subject} is {size}", "enlarged", "en_enlarged_size")
    ratio = r.choice(["0.58", "0.61", "0.56", "0.64"])
    said = r.choice(["enlarged heart", "cardiomegaly"])
    return Statement(f"Cardiothoracic ratio {ratio}, {said}", "enlarged", "en_enlarged_ctr")


def en_heart_normal(r: random.Random) -> Statement:
    s = r.choice(EN_HEART[:7])
    n = r.choice(["heart size", "cardiac size", "cardiac silhouette", "cardiomediastinal silhouette"])
    said = r.choice([p for p in EN_NORMAL_HEART if not ("size" in s and "in size" in p)])
    return Statement(said.format(s=s, n=n), "heart_normal", "en_heart_normal")


def en_heart_doubted(r: random.Random) -> Statement:
    kind = r.choice(["pre", "post", "cannot", "may"])
    if kind == "pre":
        return Statement(f"{r.choice(['possible', 'questionable', 'suspected', 'equivocal', 'possibly mild'])} "
                         f"{r.choice(['cardiomegaly', 'cardiac enlargement'])}", "doubted", "en_doubt_before")
    if kind == "post":
        return Statement(f"{r.choice(['cardiomegaly', 'enlarged heart', 'cardiac enlargement'])}"
                         f"{r.choice(['?', ' (?)', ', questionable', ' is suspected'])}", "doubted", "en_doubt_after")
    if kind == "cannot":
        return Statement(f"{r.choice(['cannot exclude', 'cannot rule out', 'difficult to exclude'])} "
                         f"{r.choice(['cardiomegaly', 'mild cardiac enlargement'])}", "doubted", "en_doubt_cannot")
    subject = r.choice(EN_HEART[:4])
    modal = r.choice(["may be enlarged", "is possibly enlarged", "could be enlarged"])
    return Statement(f"{subject} {modal}", "doubted", "en_doubt_modal")


def en_heart_past(r: random.Random) -> Statement:
    """An enlargement of the past, not today's film's (ConText's historical context)."""
    noun = r.choice(["cardiomegaly", "cardiac enlargement", "an enlarged heart", "mild cardiomegaly"])
    kind = r.choice(["history", "ho", "prior", "past", "by_history"])
    if kind == "history":
        return Statement(f"{r.choice(['History of', 'Known history of', 'Past medical history of'])} {noun}",
                         "historical", "en_past_history")
    if kind == "ho":
        return Statement(f"H/o {noun}", "historical", "en_past_ho")
    if kind == "prior":
        return Statement(f"{r.choice(['Prior study', 'Previous radiograph', 'Old films'])} "
                         f"{r.choice(['showed', 'demonstrated'])} {noun}", "historical", "en_past_prior_study")
    if kind == "past":
        return Statement(f"{noun} in the past", "historical", "en_past_after")
    return Statement(f"{noun} by history", "historical", "en_past_by_history")


def en_heart_family(r: random.Random) -> Statement:
    """A relative's enlarged heart (ConText's experiencer)."""
    noun = r.choice(["cardiomegaly", "cardiac enlargement", "an enlarged heart"])
    relative = r.choice(["mother", "father", "brother", "sister"])
    kind = r.choice(["family", "relative_has", "patients_relative"])
    if kind == "family":
        return Statement(f"Family history of {noun}", "family", "en_family_history")
    if kind == "relative_has":
        return Statement(f"{relative} {r.choice(['has', 'had'])} {noun}", "family", "en_family_relative")
    return Statement(f"{noun} in the patient's {relative}", "family", "en_family_after")


EN = {"historical": en_heart_past, "family": en_heart_family,
      "enlarged": en_heart_enlarged, "heart_normal": en_heart_normal, "doubted": en_heart_doubted,
      "referral": lambda r: Statement(r.choice(EN_REFERRAL).format(x=r.choice(EN_REFERRAL_X)), "referral",
                                      "en_referral"),
      "lung_normal": lambda r: Statement(r.choice(EN_LUNG_NORMAL), "normal", "en_lungs_normal"),
      "other_normal": lambda r: Statement(r.choice(EN_OTHER_NORMAL), "normal", "en_other_normal"),
      "whole_normal": lambda r: Statement(r.choice(EN_WHOLE_NORMAL), "normal", "en_whole_normal"),
      "abnormal": lambda r: Statement(r.choice(EN_ABNORMAL), "abnormal", "en_abnormal")}

# ------------------------------------------------------------------------------------ reports
# the shape of a report: the heart statement and what stands beside it, and the group that follows
SHAPES = [("enlarged", ["lung_normal"], "cardiomegaly"), ("enlarged", ["abnormal"], "cardiomegaly"),
          ("enlarged", ["lung_normal", "other_normal"], "cardiomegaly"), ("enlarged", [], "cardiomegaly"),
          ("heart_normal", ["lung_normal"], "healthy"), ("heart_normal", ["lung_normal", "other_normal"], "healthy"),
          (None, ["whole_normal"], "healthy"), (None, ["lung_normal", "other_normal"], "healthy"),
          ("heart_normal", ["abnormal"], "none"), ("doubted", ["lung_normal"], "none"),
          ("doubted", ["lung_normal", "other_normal"], "none"), (None, ["abnormal"], "none")]

# what the past or a relative says beside today's statements: neither a finding nor a veto
# (ConText's historical and experiencer contexts), so the group is today's statements' group
CONTEXT_SHAPES = [("historical", ["heart_normal", "lung_normal"], "healthy"),
                  ("historical", ["lung_normal", "other_normal"], "healthy"),
                  ("historical", ["enlarged", "lung_normal"], "cardiomegaly"),
                  ("historical", ["abnormal"], "none"), ("historical", ["doubted"], "none"),
                  ("family", ["heart_normal", "lung_normal"], "healthy"), ("family", ["whole_normal"], "healthy"),
                  ("family", ["enlarged"], "cardiomegaly"), ("family", ["heart_normal", "abnormal"], "none")]


def typo(text: str, r: random.Random, lang: str) -> tuple[str, str]:
    """One way reports are typed: capitals, a missing space after a full stop, ё for е, a doubled н."""
    kind = r.choice(["caps", "nospace", "lower", "yo", "nn", "double_space"] if lang == "ru"
                    else ["caps", "nospace", "lower", "double_space"])
    if kind == "caps":
        return text.upper(), "caps"
    if kind == "nospace":
        return text.replace(". ", ".", 1), "no space after full stop"
    if kind == "lower":
        return text.lower(), "lower case"
    if kind == "double_space":
        return text.replace(" ", "  ", 2), "double space"
    if kind == "yo":
        return text.replace("Легк", "Лёгк").replace("легк", "лёгк").replace("четк", "чётк"), "ё"
    return text.replace("ширен", "ширенн", 1).replace("личен", "личенн", 1), "doubled н"


def report(lang: str, r: random.Random, shapes: str = "plain") -> tuple[str, str, str]:
    """One report: ``(text, expected group, constructions)``, of the ``plain`` shapes (today's
    statements) or the ``context`` ones (a past or a relative's finding beside them)."""
    grammar = RU if lang == "ru" else EN
    heart, beside, expected = r.choice(SHAPES if shapes == "plain" else CONTEXT_SHAPES)
    statements = [grammar[k](r) for k in ([heart] if heart else []) + beside]
    r.shuffle(statements)
    if r.random() < 0.25:  # a referral's question comes first; it is not a finding
        statements.insert(0, grammar["referral"](r))
    text = " ".join(s.text[0].upper() + s.text[1:] + ("" if s.text.endswith("?") else ".") for s in statements)
    constructions = [s.construction for s in statements]
    if r.random() < 0.2:
        text, how = typo(text, r, lang)
        constructions.append(how)
    return text, expected, "+".join(constructions)


def write(path: Path) -> list[dict]:
    rows: list[dict] = []
    for part, seed, n, shapes in PARTS:
        for lang in ("ru", "en"):
            r = random.Random(f"{seed}-{lang}")
            seen = {row["text"] for row in rows if row["lang"] == lang}
            made = 0
            while made < n:
                text, expected, how = report(lang, r, shapes)
                if text not in seen:
                    seen.add(text)
                    made += 1
                    rows.append({"part": part, "lang": lang, "expected": expected, "construction": how, "text": text})
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["part", "lang", "expected", "construction", "text"], delimiter="\t",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = write(args.out)
    print(f"{len(rows)} reports written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

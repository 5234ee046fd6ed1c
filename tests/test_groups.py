import json

import pytest
from sqlalchemy import text

from pipeline import catalogue as C
from pipeline import groups as G
from pipeline.groups import classify, load_rules
from tests.test_catalogue import nih_slice

RULES = load_rules()


@pytest.mark.parametrize("report, group", [
    # English: positives
    ("Cardiomegaly. No pleural effusion.", "cardiomegaly"),
    ("The heart is mildly enlarged. Lungs are clear.", "cardiomegaly"),
    ("Heart size is moderately enlarged, with pulmonary vascular congestion.", "cardiomegaly"),
    ("Stable cardiac enlargement.", "cardiomegaly"),
    ("Borderline heart size. No acute disease.", "cardiomegaly"),
    # English: negation and normal-size phrases are never cardiomegaly
    ("No cardiomegaly. Lungs are clear.", "healthy"),
    ("Heart size is normal. No acute cardiopulmonary abnormality.", "healthy"),
    ("The heart is not enlarged. No acute cardiopulmonary disease.", "healthy"),
    ("Normal heart size. Negative for cardiomegaly.", "healthy"),
    ("There is no evidence of cardiomegaly or effusion. Normal chest.", "healthy"),
    # ambiguous or abnormal-but-not-cardiomegaly text gets neither
    ("Possible cardiomegaly, cannot exclude pericardial effusion.", None),
    ("Heart size normal. Right lower lobe pneumonia.", None),
    ("Heart size normal. Small left pleural effusion.", None),
    ("Pending comparison.", None),
    ("", None),
    # Russian
    ("Кардиомегалия. Застойные явления в малом круге.", "cardiomegaly"),
    ("Тень сердца расширена влево.", "cardiomegaly"),
    ("Сердце увеличено в размерах.", "cardiomegaly"),
    ("Норма.", "healthy"),
    ("Без патологии.", "healthy"),
    ("Лёгкие без очаговых и инфильтративных изменений. Сердце не расширено. Норма.", "healthy"),
    ("Без кардиомегалии. Патологии не выявлено.", "healthy"),
    ("Сердце не увеличено. Правосторонняя пневмония.", None),
    ("Возможна кардиомегалия.", None),
    # ё and е are the same letter to the rules, in the text and in the patterns
    ("Лёгкие без изменений. Отёк лёгких.", None), ("Легкие без изменений. Отёк легких.", None),
    ("Лёгкие прозрачны.", "healthy"), ("Легкие прозрачны.", "healthy"),
])
def test_rules(report, group):
    assert classify(report, None, RULES)[0] == group


@pytest.mark.parametrize("labels, group", [
    ("Cardiomegaly", "cardiomegaly"), ("Cardiomegaly|Emphysema", "cardiomegaly"),
    ("No Finding", "healthy"), ("Effusion", None), ("Effusion|No Finding", None),
])
def test_structured_labels(labels, group):
    assert classify(None, labels, RULES)[0] == group


def test_rules_file_errors(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('[[group]]\nname = "x"\nmatch = ["(unclosed"]\n')
    with pytest.raises(G.GroupsError, match="bad pattern"):
        load_rules(bad)
    with pytest.raises(G.GroupsError, match="not found"):
        load_rules(tmp_path / "missing.toml")


def test_assign_sample_and_reproducibility(engine, tmp_path):
    C.load_nih(engine, nih_slice(tmp_path, 2000), progress=False)
    counts = G.assign(engine, progress=False)
    assert counts["cardiomegaly"] > 10 and counts["healthy"] > 500
    assert G.assign(engine, progress=False) == counts  # re-run: same, no duplicates
    with engine.connect() as c:
        n = c.execute(text("SELECT COUNT(*) FROM catalogue WHERE group_name IS NOT NULL")).scalar()
    assert n == counts["cardiomegaly"] + counts["healthy"]

    s = G.sample(engine, "s", per_group=200, seed=3)
    assert s.per_group == {"cardiomegaly": counts["cardiomegaly"], "healthy": 200}
    assert s.short == {"cardiomegaly": counts["cardiomegaly"]}
    with engine.connect() as c:
        first = c.execute(text("SELECT uid FROM samples WHERE name='s' ORDER BY uid")).scalars().all()
    G.sample(engine, "s", per_group=200, seed=3)
    with engine.connect() as c:
        again = c.execute(text("SELECT uid FROM samples WHERE name='s' ORDER BY uid")).scalars().all()
        assert len(again) == len(first) and again == first
    G.sample(engine, "s", per_group=200, seed=4)
    with engine.connect() as c:
        other = c.execute(text("SELECT uid FROM samples WHERE name='s' ORDER BY uid")).scalars().all()
    assert other != first
    listing = G.counts(engine)
    assert ("s/healthy", 200) in listing["samples"]


def test_selection_errors(engine):
    with engine.connect() as c:
        with pytest.raises(G.GroupsError, match="exactly one"):
            G.select_images(c, group="x", all_images=True)
        with pytest.raises(G.GroupsError, match="no group named 'cardiomegaly': there is none yet"):
            G.select_images(c, group="cardiomegaly")  # no group assigned at all yet


def test_source_narrows_a_selection(engine, tmp_path):
    C.load_nih(engine, nih_slice(tmp_path, 50), progress=False)
    with engine.begin() as c:
        c.execute(text("INSERT INTO images (uid, source, loaded_at) VALUES ('zz', 'dicom', '2026-01-01')"))
    with engine.connect() as c:
        only = G.select_images(c, source="dicom")
        assert only.pairs() == [("zz", None)] and only.description == "all source=dicom"
        some = G.select_images(c, all_images=True, source="nih", limit=7)
        assert len(some.items) == 7 and some.description == "all source=nih limit=7"
        # what a batch needs comes with the selection: pixel spacing and view
        assert some.items[0].spacing == pytest.approx((0.143, 0.143)) and some.items[0].view in ("PA", "AP")


def _corpus() -> list[dict]:
    import csv
    from pathlib import Path
    with open(Path(__file__).parent / "fixtures" / "report_corpus.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


CORPUS = _corpus()


def test_the_corpus_covers_every_construction_in_both_languages():
    assert len(CORPUS) >= 150
    kinds = {(r["lang"], r["construction"]) for r in CORPUS}
    for lang in ("ru", "en"):
        for construction in ("pre_negation", "post_negation", "uncertain", "normal", "report_ctr", "conflict",
                             "clause", "other"):
            assert (lang, construction) in kinds, (lang, construction)
    assert ("ru", "inflection") in kinds


@pytest.mark.parametrize("row", CORPUS, ids=lambda r: f"{r['lang']}-{r['construction']}-{r['text'][:40]}")
def test_corpus_sentence(row):
    d = G.decide(row["text"], None, RULES, trace=True)
    assert G.decide(row["text"], None, RULES).group == d.group  # stopping early changes nothing
    assert (d.group or "none") == row["expected"], d.steps


@pytest.mark.parametrize("report, value, stored", [
    ("КТИ 0,58.", 0.58, 0.58), ("КТИ = 55 %.", 0.55, 0.55), ("CTR 0.56, lungs clear.", 0.56, 0.56),
    ("Кардиоторакальный индекс составляет 0.61", 0.61, 0.61), ("КТИ > 0,5", 0.5, None),
    ("КТИ 5.", None, None),  # not a plausible ratio: no number
    ("Сердце расширено.", None, None),
])
def test_a_ctr_the_report_states_is_read(report, value, stored):
    found = G.report_ctr(report, RULES)
    assert (found.value if found else None) == (pytest.approx(value) if value else None)
    assert G.decide(report, None, RULES).report_ctr == stored


def test_a_sentence_boundary_keeps_a_normal_heart_from_cancelling_a_finding():
    # each sentence and clause is judged on its own: the normal heart does not excuse the pneumonia
    d = G.decide("Сердце обычных размеров. Справа в нижней доле пневмония.", None, RULES)
    assert d.group is None and any("пневмон" in s and "counts" in s for s in d.steps)
    # and a negation inside one clause does not reach across a contrast into the next
    assert G.decide("Пневмонии нет, но сердце расширено влево.", None, RULES).group == "cardiomegaly"


def test_assign_stores_the_report_ctr_and_explain_shows_the_words(engine):
    reports = {"a": "Легкие без очаговых изменений. КТИ 0,58.", "b": "Кардиомегалии нет. Норма.",
               "c": "Кардиомегалия под вопросом."}
    with engine.begin() as c:
        for uid, report in reports.items():
            c.execute(text("INSERT INTO images (uid, source, text, loaded_at) VALUES (:u, 'csv', :t, '2026-01-01')"),
                      {"u": uid, "t": report})
    assert G.assign(engine, progress=False) == {"cardiomegaly": 1, "healthy": 1, "(no group)": 1}
    with engine.connect() as c:
        got = dict(c.execute(text("SELECT uid, report_ctr FROM images ORDER BY uid")).all())
        assert got == {"a": pytest.approx(0.58), "b": None, "c": None}
        assert c.execute(text("SELECT report_ctr FROM catalogue WHERE uid = 'a'")).scalar() == pytest.approx(0.58)
    e = G.explain(engine, "b")
    assert e["group"] == e["stored_group"] == "healthy"
    assert any("'кардиомегалии'" in s and "negated by 'нет'" in s for s in e["steps"])
    assert any("doubted by 'под вопросом'" in s for s in G.explain(engine, "c")["steps"])
    with pytest.raises(G.GroupsError, match="not in the catalogue"):
        G.explain(engine, "nope")
    # a report whose CTR changes (a corrected text) updates the stored number
    with engine.begin() as c:
        c.execute(text("UPDATE images SET text = 'КТИ 0,45. Норма.' WHERE uid = 'a'"))
    G.assign(engine, progress=False)
    with engine.connect() as c:
        assert c.execute(text("SELECT report_ctr FROM images WHERE uid = 'a'")).scalar() == pytest.approx(0.45)


def test_groups_explain_command(tmp_path):
    from click.testing import CliRunner

    from pipeline import db as D
    from pipeline.cli import cli
    url = f"sqlite:///{tmp_path / 'c.db'}"
    eng = D.connect(url)
    with eng.begin() as c:
        c.execute(text("INSERT INTO images (uid, source, text, loaded_at) VALUES ('x1', 'csv', :t, '2026-01-01')"),
                  {"t": "Расширения тени сердца влево не выявлено. Без патологии."})
    eng.dispose()
    r = CliRunner().invoke(cli, ["--db", url, "groups", "explain", "x1"])
    assert r.exit_code == 0, r.output
    assert "decided    healthy" in r.output and "differs: run `cxrlabel groups assign`" in r.output
    assert "negated by 'не'" in r.output
    r = CliRunner().invoke(cli, ["--db", url, "groups", "explain", "missing"])
    assert r.exit_code != 0 and "not in the catalogue" in r.output


def test_report_vs_measured_ctr_query_puts_disagreements_first(engine):
    from pipeline.results import read_only_query, statement
    with engine.begin() as c:
        for uid, report, measured in (("same", "КТИ 0,52.", 0.53), ("far", "КТИ 0,58.", 0.47), ("none", "Норма.", 0.4)):
            c.execute(text("INSERT INTO images (uid, source, text, loaded_at) VALUES (:u, 'csv', :t, '2026-01-01')"),
                      {"u": uid, "t": report})
            c.execute(text("INSERT INTO measurements (uid, model, ctr, quality, labelled_at) "
                           "VALUES (:u, 'm', :c, 0.9, '2026-01-01')"), {"u": uid, "c": measured})
    G.assign(engine, progress=False)
    result = read_only_query(engine, statement("report_vs_measured_ctr"))
    rows = list(result.rows)
    assert [r["uid"] for r in rows] == ["far", "same"]  # no stated CTR: not in the audit
    assert rows[0]["verdict"] == "opposite sides of 0.5" and rows[1]["verdict"] == "agree"
    assert float(rows[0]["difference"]) == pytest.approx(-0.11)


@pytest.mark.parametrize("name", ["ctr_by_group", "healthy_ctr_over_0_5", "review_lowest_quality",
                                  "report_vs_measured_ctr"])
def test_every_ready_query_runs_on_both_databases(engine, name):
    # PostgreSQL has no ROUND(double precision, int): the ready queries round NUMERIC
    from pipeline.results import read_only_query, ready_queries, statement
    assert name in ready_queries()
    with engine.begin() as c:
        c.execute(text("INSERT INTO images (uid, source, text, view, loaded_at) "
                       "VALUES ('h', 'csv', 'Норма. КТИ 0,45.', 'PA', '2026-01-01')"))
        c.execute(text("INSERT INTO measurements (uid, model, ctr, quality, quality_heart, quality_left_lung, "
                       "quality_right_lung, labelled_at) "
                       "VALUES ('h', 'm', 0.5234, 0.91, 0.9, 0.92, 0.91, '2026-01-01')"))
    G.assign(engine, progress=False)
    rows = list(read_only_query(engine, statement(name)).rows)
    assert len(rows) == 1
    assert any(float(v) == pytest.approx(0.523) for v in rows[0].values() if v is not None and not isinstance(v, str))


def test_group_comparisons_count_one_film_per_patient_and_leave_flagged_films_out(engine):
    from pipeline.results import read_only_query, statement
    films = [  # uid, patient, date, ctr, input check
        ("p1a", "P1", "2025-01-01", 0.45, "ok"), ("p1b", "P1", "2026-01-01", 0.55, "ok"),
        ("solo", None, None, 0.40, "ok"),  # no patient id: a patient of its own
        ("p2a", "P2", "2024-01-01", 0.90, "turned? it looks more like a chest film turned"),  # flagged, earliest
        ("p2b", "P2", "2025-06-01", 0.50, None)]  # labelled before the check: counted
    with engine.begin() as c:
        for uid, patient, date, ctr, check in films:
            c.execute(text("INSERT INTO images (uid, source, patient_id, study_date, text, view, loaded_at) "
                           "VALUES (:u, 'csv', :p, :d, 'Норма.', 'PA', '2026-01-01')"),
                      {"u": uid, "p": patient, "d": date})
            c.execute(text("INSERT INTO measurements (uid, model, ctr, quality, input_check, labelled_at) "
                           "VALUES (:u, 'm', :c, 0.9, :k, '2026-01-01')"), {"u": uid, "c": ctr, "k": check})
    G.assign(engine, progress=False)
    (row,) = read_only_query(engine, statement("ctr_by_group")).rows
    assert row["group_name"] == "healthy" and (row["patients"], row["films"]) == (3, 4)
    assert row["counted"] == "one film per patient (earliest)"
    assert float(row["mean_ctr"]) == pytest.approx(0.45) and float(row["max_ctr"]) == pytest.approx(0.50)
    first = {r["uid"] for r in read_only_query(engine, statement(
        "SELECT uid FROM label_results WHERE patient_film = 1")).rows}
    assert first == {"p1a", "solo", "p2b"}
    from pipeline.report import _in_statistics, _selection, one_per_patient
    picked = {r["uid"] for r in one_per_patient(_in_statistics(_selection(engine, "m", [], None)))}
    assert picked == first  # the report's figures count the films the ready queries count


def _grammar() -> list[dict]:
    import csv
    from pathlib import Path
    with open(Path(__file__).parent / "fixtures" / "report_grammar.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


GRAMMAR = _grammar()


def test_the_grammar_corpus_is_the_grammars_output_with_a_held_out_part(tmp_path):
    from pathlib import Path

    from bench import report_grammar
    report_grammar.write(tmp_path / "again.tsv")
    committed = Path(__file__).parent / "fixtures" / "report_grammar.tsv"
    assert (tmp_path / "again.tsv").read_bytes() == committed.read_bytes()
    for lang in ("ru", "en"):
        mine = [r for r in GRAMMAR if r["lang"] == lang]
        assert len(mine) >= 150 and sum(r["part"] == "heldout" for r in mine) >= 100
        tune = {r["text"] for r in mine if r["part"] == "tune"}
        assert not tune & {r["text"] for r in mine if r["part"] == "heldout"}  # held out means never seen
        kinds = {c for r in mine for c in r["construction"].split("+")}
        assert {f"{lang}_referral", f"{lang}_enlarged_after_descriptive", "caps"} <= kinds
        assert any(k.startswith(f"{lang}_past_") for k in kinds) and any(k.startswith(f"{lang}_family_") for k in kinds)


@pytest.mark.parametrize("row", [r for r in GRAMMAR if r["part"] == "tune"],
                         ids=lambda r: f"{r['lang']}-{r['text'][:50]}")
def test_grammar_tuning_report(row):
    d = G.decide(row["text"], None, RULES, trace=True)
    assert (d.group or "none") == row["expected"], d.steps


def test_held_out_grammar_reports_meet_the_goals():
    """The rules were never fitted on this part: precision >= 0.99 and recall >= 0.95 for
    both groups in both languages (bench/groups_corpus.py prints the table)."""
    for lang in ("ru", "en"):
        rows = [r for r in GRAMMAR if r["part"] == "heldout" and r["lang"] == lang]
        got = [G.classify(r["text"], None, RULES)[0] or "none" for r in rows]
        for group in ("cardiomegaly", "healthy"):
            tp = sum(g == group and r["expected"] == group for g, r in zip(got, rows, strict=True))
            truth = sum(r["expected"] == group for r in rows)
            assert tp / got.count(group) >= 0.99 and tp / truth >= 0.95, (lang, group)


@pytest.mark.parametrize("report, group", [
    # the referral's question is not a finding: neither a group nor a veto
    ("Indication: r/o cardiomegaly. Heart size is normal. Lungs are clear.", "healthy"),
    ("С целью исключения кардиомегалии. Сердце не расширено. Лёгкие без очаговых теней.", "healthy"),
    ("History: ? pneumonia. No acute disease.", "healthy"),
    ("Reason for exam: rule out pneumonia. Cardiomegaly.", "cardiomegaly"),
    ("Диагноз при направлении: кардиомегалия? Cor - расширено влево.", "cardiomegaly"),
    # rule-out words inside the findings are doubt
    ("? cardiomegaly. Lungs are clear.", None),
    ("Cardiomegaly, questionable. Lungs are clear.", None),
    ("Lungs are clear. Evaluate for cardiomegaly on a PA film.", None),
    ("Нельзя исключить кардиомегалию. Лёгкие без очаговых теней.", None),
    # Latin shorthand, a finding after a colon
    ("Cor: расширено влево. Pulmo: без очаговых теней.", "cardiomegaly"),
    ("Cor: N. Pulmo: без патологии.", "healthy"),
    ("ЛЖ увеличен. Лёгкие без очаговых теней.", "cardiomegaly"),
    # a predicate after a descriptive phrase between commas, unless the phrase names another organ
    ("Тень сердца, с чёткими ровными контурами, расширена влево.", "cardiomegaly"),
    ("The cardiac silhouette, as before, is enlarged.", "cardiomegaly"),
    ("Сердце не расширено, аорта уплотнена, расширена.", None),
    # a normal study by age norms, or as no signs of pathology
    ("Органы грудной полости - возрастная норма.", "healthy"),
    ("Без рентгенологических признаков патологии органов грудной клетки.", "healthy"),
    ("ЛЕГКИЕ  БЕЗ  ОЧАГОВЫХ ТЕНЕЙ.СЕРДЦЕ НЕ РАСШИРЕНО.", "healthy"),
])
def test_referrals_rule_outs_latin_and_descriptive_phrases(report, group):
    d = G.decide(report, None, RULES, trace=True)
    assert d.group == group, d.steps


@pytest.mark.parametrize("report, group, verdict", [
    # the past is not today's film (ConText's historical context): neither a finding nor a veto
    ("В анамнезе кардиомегалия. Сердце не расширено. Лёгкие без очаговых теней.", "healthy", "historical"),
    ("Кардиомегалия в анамнезе. Лёгкие без очаговых теней.", "healthy", "historical"),
    ("Ранее выявленная кардиомегалия. Сердце не расширено.", "healthy", "historical"),
    ("History of cardiomegaly. The heart size is normal. Lungs are clear.", "healthy", "historical"),
    ("Prior study demonstrated cardiac enlargement. Heart size normal. Clear lungs.", "healthy", "historical"),
    ("History of cardiomegaly. The heart is enlarged.", "cardiomegaly", "historical"),
    # someone else's finding (the experiencer)
    ("У матери кардиомегалия. Сердце не расширено. Лёгкие без очаговых теней.", "healthy", "other"),
    ("Family history of cardiomegaly. The heart is not enlarged. Lungs are clear.", "healthy", "other"),
    ("Normal chest x-ray. An enlarged heart in the patient's father.", "healthy", "other"),
    # a comparison, or what persists, is today's finding
    ("По сравнению с предыдущим исследованием сердце расширено.", "cardiomegaly", None),
    ("Сердце, как и на прежних снимках, расширено.", "cardiomegaly", None),
    ("The heart, as on the prior study, is enlarged.", "cardiomegaly", None),
    ("Cardiomegaly, previously noted. Lungs are clear.", "cardiomegaly", None),
    ("Again seen is cardiomegaly.", "cardiomegaly", None),
])
def test_the_past_and_someone_elses_findings_are_not_todays(report, group, verdict):
    d = G.decide(report, None, RULES, trace=True)
    assert d.group == group, d.steps
    said = {"historical": "a past finding", "other": "said of someone else"}
    if verdict:
        assert any(said[verdict] in step and "cardiomegaly:" in step for step in d.steps), d.steps
    else:
        assert not any(w in step for step in d.steps for w in said.values()), d.steps


def test_a_rules_file_without_context_cues_reads_as_before(tmp_path):
    """The contexts are the rules file's: one that names none judges a phrase as it always
    did (a history of cardiomegaly counts), and its keys are checked like the others."""
    plain = tmp_path / "plain.toml"
    plain.write_text('[[group]]\nname = "cardiomegaly"\nmatch = ["cardiomegaly"]\n', encoding="utf-8")
    assert G.classify("History of cardiomegaly.", None, G.load_rules(plain))[0] == "cardiomegaly"
    bad = tmp_path / "bad.toml"
    bad.write_text('historical = "history of"\n[[group]]\nname = "c"\nmatch = ["c"]\n', encoding="utf-8")
    with pytest.raises(G.GroupsError, match="historical must be a list"):
        G.load_rules(bad)


def test_explain_says_a_referral_asked():
    steps = G.decide("Indication: r/o cardiomegaly. Lungs are clear.", None, RULES, trace=True).steps
    assert any("asked by the referral 'indication:', not a finding" in s for s in steps), steps


def test_every_form_pymorphy3_knows_of_the_heart_words_is_read():
    """The stems cover the words' forms without listing them: pymorphy3 writes every case,
    number and gender, and each is decided as its sentence says (bench/groups_forms.py)."""
    pymorphy3 = pytest.importorskip("pymorphy3")
    from bench import groups_forms
    morph = pymorphy3.MorphAnalyzer()
    for lemma, pos, template, expected in groups_forms.CASES:
        words = groups_forms.forms(morph, lemma, pos)
        assert len(words) >= 7
        for w in words:
            sentence = template.format(w=w) + "."
            assert (G.decide(sentence, None, RULES).group or "none") == expected, sentence


def test_coverage_shows_the_phrasings_the_rules_leave_ungrouped(engine):
    reports = {"a": "Cor: аортальная конфигурация. Pulmo: без очаговых теней.", "b": "Cor: увеличено, КТИ 0,61.",
               "c": "Кардиомегалия.", "d": "Heart size is normal. Lungs are clear.",
               "e": "Cor: not enlarged. Pulmo: clear.", "f": "Cor: аортальная конфигурация."}
    with engine.begin() as c:
        for uid, report in reports.items():
            c.execute(text("INSERT INTO images (uid, source, text, loaded_at) VALUES (:u, 'csv', :t, '2026-01-01')"),
                      {"u": uid, "t": report})
    G.assign(engine, progress=False)
    assert {r.uid: r.group_name for r in read_groups(engine)} == {"b": "cardiomegaly", "c": "cardiomegaly",
                                                                  "d": "healthy"}
    found = G.coverage(engine, progress=False)
    assert set(found) == {"(no group)", "cardiomegaly", "healthy"}
    # a phrasing the shipped rules leave ungrouped: two reports say it, the first is the example
    assert found["(no group)"][0] == {"phrase": "cor аортальная конфигурация", "reports": 2, "example_uid": "a"}
    assert {r["phrase"] for r in found["(no group)"]} == {"cor аортальная конфигурация", "pulmo без очаговых теней",
                                                          "cor not enlarged", "pulmo clear"}
    assert {r["phrase"] for r in found["cardiomegaly"]} == {"cor увеличено кти #", "кардиомегалия"}
    assert G.phrase("кти 0,61 и 12 мм") == "кти # и # мм"  # numbers as #, never a patient's values
    assert list(G.coverage(engine, group="healthy", progress=False)) == ["healthy"]
    from click.testing import CliRunner

    from pipeline.cli import cli
    r = CliRunner().invoke(cli, ["--db", engine.url.render_as_string(hide_password=False), "groups", "coverage",
                                 "--group", "(no group)", "--top", "2", "--json"])
    assert r.exit_code == 0 and [row["phrase"] for row in json.loads(r.stdout)["(no group)"]] == [
        "cor аортальная конфигурация", "cor not enlarged"]


def read_groups(engine):
    with engine.connect() as c:
        return c.execute(text("SELECT uid, group_name FROM groups")).all()


def test_explain_names_the_rules_file_line_that_decided(tmp_path):
    from pipeline.resources import resource
    shipped = resource("rules", "default.toml").read_text(encoding="utf-8").splitlines()
    d = G.decide("Кардиомегалия.", None, RULES, trace=True)
    line = int(d.reason.split("rules line ")[1].rstrip(")"))
    assert d.group == "cardiomegaly" and "кардиомегал" in shipped[line - 1]
    assert any("(rules line" in step for step in d.steps)
    edited = tmp_path / "mine.toml"  # a clinic's own file: its own line numbers
    edited.write_text("\n".join(shipped).replace("match = [\n  'cardiomegaly',",
                                                 "match = [\n  'cor:? увеличено',\n  'cardiomegaly',", 1),
                      encoding="utf-8")
    mine = G.load_rules(edited)
    d = G.decide("Cor: увеличено.", None, mine)
    line = int(d.reason.split("rules line ")[1].rstrip(")"))
    assert d.group == "cardiomegaly"
    assert edited.read_text(encoding="utf-8").splitlines()[line - 1] == "  'cor:? увеличено',"


def test_a_long_run_of_white_space_reads_as_one_space():
    """Runs of white space are squeezed before any pattern meets them (a pattern such as
    ``\\s+`` tried at each character of a run is quadratic: a 20 kB run took 15 s): the
    clauses, the group and the stated CTR are those of the report written plainly."""
    from pipeline.groups.reading import budget, clauses, decide

    rules = load_rules()
    plain = "Cardiomegaly. No effusion, but CTR 0.58.\nNormal lungs."
    padded = "Cardiomegaly." + " \t" * 100_000 + "No effusion," + " " * 200_000 + "but CTR 0.58.\n \n\n" \
        + "\u2003" * 50_000 + "Normal lungs."
    with budget("padded", 30):  # a guard against the quadratic read coming back, far above its pace
        got = decide(padded, None, rules)
    assert clauses(padded, rules) == clauses(plain, rules)
    assert (got.group, got.reason, got.report_ctr) == (lambda d: (d.group, d.reason, d.report_ctr))(
        decide(plain, None, rules))


def test_a_report_or_rules_pattern_that_stalls_is_a_failure_row_and_the_run_goes_on(engine, tmp_path, monkeypatch):
    """A user's pattern that backtracks exponentially (``(a+)+$``) on one report: that image
    gets no group and a `failures` row naming it; every other report is read, on both
    databases; `groups explain` of it stops with the same line."""
    from pipeline.groups import reading

    monkeypatch.setattr(reading, "REPORT_TIMEOUT", 0.3)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[group]]\nname = "cardiomegaly"\nmatch = ["cardiomegaly", "(a+)+$"]\n'
                     '[[group]]\nname = "healthy"\nmatch = ["normal"]\n')
    reports = {"u1": "Cardiomegaly.", "u2": "a" * 60 + "b", "u3": "Normal heart."}
    with engine.begin() as c:
        for uid, report in reports.items():
            c.execute(text("INSERT INTO images (uid, source, text, loaded_at) VALUES (:u, 'csv', :t, '2026-01-01')"),
                      {"u": uid, "t": report})
    counts = G.assign(engine, load_rules(rules), progress=False)
    assert counts == {"cardiomegaly": 1, "healthy": 1, "(no group)": 1}
    with engine.connect() as c:
        assert dict(c.execute(text("SELECT uid, group_name FROM groups")).all()) == {"u1": "cardiomegaly",
                                                                                  "u3": "healthy"}
        failed = c.execute(text("SELECT stage, uid, message FROM failures")).all()
    assert [(f.stage, f.uid) for f in failed] == [("groups", "u2")]
    assert "longer than 0.3 s" in failed[0].message and "CXRLABEL_REPORT_TIMEOUT" in failed[0].message
    with pytest.raises(reading.ReportTimeout, match="u2: reading its report took longer"):
        G.explain(engine, "u2", load_rules(rules))
    # read again without the stalling pattern, the failure is cleared
    rules.write_text('[[group]]\nname = "cardiomegaly"\nmatch = ["cardiomegaly"]\n')
    G.assign(engine, load_rules(rules), progress=False)
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM failures")).scalar() == 0


def test_explain_finds_a_uid_given_as_its_file_name_and_suggests_close_ones(engine):
    """The README's `groups explain 00000013_005.png`: the uid has no extension, so the file's
    name or path finds it; a uid that is not there gets the uids that start alike."""
    with engine.begin() as c:
        for uid in ("00000013_005", "00000013_006"):
            c.execute(text("INSERT INTO images (uid, source, text, loaded_at) VALUES (:u, 'nih', 'Normal.', "
                           "'2026-01-01')"), {"u": uid})
    for given in ("00000013_005.png", "/data/nih/images/00000013_005.png", "00000013_005"):
        assert G.explain(engine, given)["uid"] == "00000013_005"
    with pytest.raises(G.GroupsError, match="did you mean 00000013_005, 00000013_006"):
        G.explain(engine, "00000013_007.png")


def test_numbers_and_punctuation_alone_are_no_phrasing():
    """`groups coverage` listed '#' (1,112 reports) as the top ungrouped phrase: a clause of
    numbers and punctuation alone is no phrasing a rule could read."""
    from pipeline.groups.database import phrase
    assert phrase("12.5") == "" and phrase("# , #") == "" and phrase("--") == ""
    assert phrase("ктИ 0,58") != "" and phrase("heart size 15 cm") == "heart size # cm"

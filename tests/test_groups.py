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
        with pytest.raises(G.GroupsError, match="has no images"):
            G.select_images(c, group="cardiomegaly")


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

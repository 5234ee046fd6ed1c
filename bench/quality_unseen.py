"""The review worklist on a source its score never saw (issue 44, point 4).

A quality score is fitted on annotated films (``cxrlabel quality fit``); a clinic's films come
from other equipment and other readers. So judge the score and the worklist's trust leave one
source out: fitted on one source's films, judged on the other's (the AUROC of finding the worst
tenth of films by mean Dice, and by CTR error where the truth draws the heart alone).

The model that labels those films must not have trained on them: ``cxr_deep`` (the shipped
recipe, ``--val-frac 0``) trained on half of each source (GeneralBlockchain by a hash of the
patient, Wingspan of the film: :func:`in_training_half`), and every figure here is read on
the other halves, which neither the model nor (for the leave-source-out figures) the score saw.

Usage:
    python bench/quality_unseen.py --work /tmp/q44 --prepare
        (writes WORK/train.db with the training halves and prints the training command)
    python bench/quality_unseen.py --work /tmp/q44 --model WORK/runs/half/best.pt [--shifts]
        (labels the other halves with the model, fits the score as `quality fit` does, and prints
        the figures leaving a fold out and leaving a source out; writes WORK/unseen.json)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import delete, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import db as D  # noqa: E402

DATA = Path(os.environ.get("CXRLABEL_DATA", REPO.parent / "shared" / "data"))
CX = [sys.executable, "-m", "pipeline"]
STRUCTURES = ("heart", "left_lung", "right_lung")


def cx(db: str, *args: str, cache: Path) -> None:
    env = {**os.environ, "CXRLABEL_CACHE": str(cache)}
    subprocess.run([*CX, "--db", db, *args], check=True, env=env, cwd=REPO)


def import_both(db: str, cache: Path) -> None:
    """Both annotated sources, as drawn."""
    cx(db, "masks", "import", "generalblockchain", str(DATA / "generalblockchain"), cache=cache)
    cx(db, "masks", "import", "png-dirs", str(DATA / "wingspan"), "--images", "png", "--source", "wingspan",
       *[a for s in STRUCTURES for a in ("--mask", f"{s}=mask/{s}")], cache=cache)


def in_training_half(uid: str, source: str, patient: str | None) -> bool:
    """Half 0 of each source trains the model: Wingspan by its uid's hash (one film
    a patient), GeneralBlockchain by the patient's."""
    key = uid if source == "wingspan" else f"gb:{patient or uid}"
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 == 0


def prepare(work: Path) -> None:
    db_path = work / "train.db"
    if db_path.exists():
        db_path.unlink()
    db = f"sqlite:///{db_path}"
    import_both(db, work / "cache")
    eng = D.connect(db)
    with eng.begin() as conn:
        rows = conn.execute(select(D.images.c.uid, D.images.c.source, D.images.c.patient_id)).all()
        gone = [r.uid for r in rows if not in_training_half(r.uid, r.source, r.patient_id)]
        for table in (D.masks, D.images):
            for chunk in D.chunks(gone, 500):
                conn.execute(delete(table).where(table.c.uid.in_(chunk)))
    eng.dispose()
    kept = len(rows) - len(gone)
    print(f"{db_path}: {kept} training films of {len(rows)} (the rest are judged)")
    print(f"CXRLABEL_CACHE={work / 'cache'} cxrlabel --db {db} train --model cxr_deep --val-frac 0 "
          f"--name half --run-dir {work / 'runs' / 'half'}")


def figures(rows: list[dict], structures: list[str]) -> dict:
    """Per source: leaving a fold out (the score fitted on both sources), and leaving the source
    out (fitted on the other source alone), on every variant and on the films as they are."""
    from pipeline.quality.features import FEATURES, SHAPE
    from pipeline.quality.fit import _figures, held_out_estimates, judge, judge_trust, trust_films, unseen_sources
    from pipeline.quality.trust import held_out_trust
    names = FEATURES + ((SHAPE,) if all(SHAPE in r for r in rows) else ())
    estimate = held_out_estimates(rows, structures, 1.0, names)
    out: dict = {}
    for src in sorted({r["source"] for r in rows}):
        mine = [n for n, r in enumerate(rows) if r["source"] == src]
        j = judge(rows, estimate, src)
        films = trust_films([rows[n] for n in mine], [estimate[n] for n in mine])
        judge_trust(j, films, held_out_trust(films))
        plain = [r for r in rows if r["source"] != src or r["shift"] == "none"]
        out[src] = {"leave-fold-out, every variant": _figures(j),
                    "leave-source-out, every variant": _figures(unseen_sources(rows, structures, 1.0, names)[src]),
                    "leave-source-out, films as they are": _figures(
                        unseen_sources(plain, structures, 1.0, names)[src])}
    return out


def judged(work: Path, model: Path, shifts: bool) -> dict:
    from pipeline.model import resolve_model
    from pipeline.quality.films import from_database, label, variants
    db_path = work / "judge.db"
    db = f"sqlite:///{db_path}"
    if not db_path.exists():
        import_both(db, work / "cache")
    eng = D.connect(db)
    lm = resolve_model(eng, str(model), "cpu")
    films = label(from_database(eng, lm, str(work / "cache"), 5, 0, None, shifts), variants(shifts))
    eng.dispose()
    print(f"{films.source}: {len(films.rows)} masks", flush=True)
    return {"model": str(model), "films": films.images, "shifts": shifts,
            "by_source": figures(films.rows, list(lm.spec.structures))}


def _two(f: dict, a: str, b: str) -> str:
    return " / ".join("-" if f[k] is None else f"{f[k]:.3f}" for k in (a, b))


def table(result: dict) -> str:
    lines = ["| source | judged | films (variants) | Spearman | AUROC worst tenth by Dice: score / trust | "
             "by CTR error: score / trust |", "|---|---|---|---|---|---|"]
    for src, rows in result["by_source"].items():
        for how, f in rows.items():
            lines.append(f"| {src} | {how} | {f['films']} | {f['spearman']:.3f} | "
                         f"{_two(f, 'auroc_worst_tenth_dice', 'auroc_worst_tenth_dice_by_trust')} | "
                         f"{_two(f, 'auroc_worst_tenth_ctr', 'auroc_worst_tenth_ctr_by_trust')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--shifts", action="store_true", help="Also each film through the equipment-like shifts.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        prepare(args.work)
        return
    if args.model is None:
        raise SystemExit("name the model trained on the training halves (--model), or --prepare first")
    result = judged(args.work, args.model, args.shifts)
    (args.work / "unseen.json").write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)

"""A new clinic's films, as a clinic would live it: the parent, `train --from` on N of the new
source's films, a site CTR calibration, and a model trained on all of the new source's films but
the held-out ones, each judged on held-out films of the new source and of the parent's own.

Two real shifts (issue 44, point 3), the parents never having seen the new source:

- ``lungs``: GeneralBlockchain as the new source (its readers draw the lungs on behind the
  heart, and its films come from other equipment: COVID-19 era portable and PA films of many
  hospitals). Parent: ``cxr_deep`` trained on half of the Wingspan films (``--parent-lungs``,
  ``--structures heart,left_lung,right_lung``: it has never seen a cardiomediastinum). Dice on
  GeneralBlockchain's held-out patients (lungs in their own convention); no heart-only outline,
  so no CTR.
- ``heart``: the other half of the Wingspan films, passed through one fixed equipment change
  (:func:`equipment`: a steeper gamma, a softer detector and low-dose noise, the same for every
  film, as one machine would) and outlined by a reader who draws the heart's border
  :data:`WIDER` px wider on each side (on the 512-px films: the CTR reads about +0.014 higher,
  the size of the hidden clinic set's offset). Parent: ``cxr_deep`` trained on GeneralBlockchain
  and the first Wingspan half (``--parent-heart``). CTR bias and MAE and Dice on the held-out
  shifted films; the original source's held-out figures on the same films unshifted, as their
  own readers drew them.

For N = 10, 20, 40 films of the new source (a clinic's annotated films; the rest of its films
held out), each with a fresh database holding only those N films with manual masks, as a
clinic's would: ``train --from PARENT``; on the held-out films: the parent, the adapted model,
the parent with an offset calibration fitted on the same N films, and the reference.

Usage: python bench/adapt.py --work /tmp/a44 --parent-heart runs/parentH/best.pt \\
           --parent-lungs runs/parentL/best.pt [--ref-heart PATH] [--ref-lungs PATH] [--n 10,20,40]
       python bench/adapt.py --work /tmp/a44 --prepare   (only writes the new sources' folders)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import delete, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import db as D  # noqa: E402
from pipeline.calibration import fit  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.shifts import blur, gamma, noise  # noqa: E402

DATA = Path(os.environ.get("CXRLABEL_DATA", REPO.parent / "shared" / "data"))
WIDER = 3  # px the new reader draws the heart's border out on each side, on the 512-px films
HELD = {"heart": 28, "lungs": 30}  # held-out films of the new source
STRUCTURES = ("heart", "left_lung", "right_lung")
CX = [sys.executable, "-m", "pipeline"]


def half(name: str) -> int:
    """Which Wingspan half a film is in (0: the heart parent trains on it; 1: the new source)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2


def equipment(img: np.ndarray, seed: int) -> np.ndarray:
    """One machine's look, the same on every film (only the noise is the film's own)."""
    masks = np.zeros((0, *img.shape), np.float32)
    out, _ = gamma(img, masks, 0.45, np.random.default_rng(1))  # the same direction for every film
    out, _ = blur(out, masks, 0.35, np.random.default_rng(0))
    out, _ = noise(out, masks, 0.25, np.random.default_rng(seed))
    return out


def prepare(work: Path) -> dict[str, Path]:
    """The Wingspan halves (as drawn) and the heart shift's new source (second half shifted, its
    hearts drawn wider), as png-dirs folders."""
    src = DATA / "wingspan"
    names = sorted(p.name for p in (src / "png").iterdir())
    out = {"wingA": work / "wingA", "wingB": work / "wingB", "heartB": work / "heartB"}
    for key, path in out.items():
        if (path / "done").exists():
            continue
        for sub in ("png", *(f"mask/{s}" for s in STRUCTURES)):
            (path / sub).mkdir(parents=True, exist_ok=True)
        for k, n in enumerate(names):
            if half(n) != (0 if key == "wingA" else 1):
                continue
            for s in STRUCTURES:
                shutil.copy(src / "mask" / s / n, path / "mask" / s / n)
            if key != "heartB":
                shutil.copy(src / "png" / n, path / "png" / n)
                continue
            img = cv2.imread(str(src / "png" / n), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(str(path / "png" / n), equipment(img, k))
            heart = cv2.imread(str(src / "mask" / "heart" / n), cv2.IMREAD_GRAYSCALE)
            wider = cv2.dilate(heart, np.ones((1, 2 * WIDER + 1), np.uint8))
            cv2.imwrite(str(path / "mask" / "heart" / n), wider)
        (path / "done").write_text("")
    return out


def cx(db: str, *args: str, cache: Path) -> None:
    env = {**os.environ, "CXRLABEL_CACHE": str(cache)}
    subprocess.run([*CX, "--db", db, *args], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=REPO)


def import_source(db: str, shift: str, folders: dict[str, Path], cache: Path) -> None:
    """The new source (and, for the heart, the original films of the same patients) into ``db``."""
    if shift == "lungs":
        cx(db, "masks", "import", "generalblockchain", str(DATA / "generalblockchain"), cache=cache)
    else:
        cx(db, "masks", "import", "png-dirs", str(folders["heartB"]), "--images", "png", "--source", "clinic_h",
           "--uid-prefix", "h_", *[a for s in STRUCTURES for a in ("--mask", f"{s}=mask/{s}")], cache=cache)


def split(db: str, shift: str) -> tuple[list[str], list[str]]:
    """``(held-out films, pool in order)`` of the new source: held out by patient."""
    eng = D.connect(db)
    with eng.connect() as conn:
        rows = conn.execute(select(D.images.c.uid, D.images.c.patient_id)).all()
    eng.dispose()
    key = {u: hashlib.sha256(f"{shift}:{p or u}".encode()).hexdigest() for u, p in rows}
    order = sorted(key, key=lambda u: (key[u], u))
    held: list[str] = []
    for u in order:  # whole patients, until the held-out count is reached
        if len(held) < HELD[shift] or key[u] == key[held[-1]]:
            held.append(u)
    return held, [u for u in order if u not in set(held)]


def keep_only(db: str, uids: list[str]) -> None:
    eng = D.connect(db)
    with eng.begin() as conn:
        gone = [u for u in conn.execute(select(D.images.c.uid)).scalars() if u not in set(uids)]
        for table in (D.masks, D.images):
            for chunk in D.chunks(gone, 500):
                conn.execute(delete(table).where(table.c.uid.in_(chunk)))
    eng.dispose()


def scores(db: str, model: str, among: set[str]) -> dict:
    eng = D.connect(db)
    ev = evaluate(eng, model, include_trained=False, among=among)
    eng.dispose()
    e = ev.ctr_error
    return {"images": ev.images, "dice": {s: round(v["mean"], 4) for s, v in ev.dice.items()},
            "ctr_bias": round(e["mean"], 4) if e["n"] else None, "ctr_mae": round(e["mae"], 4) if e["n"] else None,
            "ctr_n": e["n"], "pairs": {r["uid"]: (r["ctr_pred"], r["ctr_true"]) for r in ev.per_image
                                       if "ctr_true" in r}}


def calibrated(parent_pool: dict, parent_held: dict) -> dict:
    """An offset calibration fitted on the pool films' parent CTR, applied to the held-out ones."""
    pred, true = (np.array(v, float) for v in zip(*parent_pool["pairs"].values(), strict=True))
    got = fit(pred, true, "offset")
    hp, ht = (np.array(v, float) for v in zip(*parent_held["pairs"].values(), strict=True))
    err = hp + got["intercept"] - ht
    return {"offset": round(got["intercept"], 4), "ci": [round(c, 4) for c in got["intercept_ci"]],
            "ctr_bias": round(float(err.mean()), 4), "ctr_mae": round(float(np.abs(err).mean()), 4)}


def label(db: str, model: str, uids: list[str], cache: Path, name: str) -> None:
    eng = D.connect(db)
    with eng.begin() as conn:
        conn.execute(delete(D.samples).where(D.samples.c.name == name))
        D.upsert(conn, D.samples, [{"name": name, "uid": u, "created_at": D.utcnow()} for u in uids],
                 ["name", "uid"])
    eng.dispose()
    cx(db, "label", "--sample", name, "--model", model, cache=cache)


def run_shift(shift: str, parent: Path, ref: Path | None, ns: list[int], work: Path, folders: dict) -> dict:
    cache = work / "cache"
    evaldb = f"sqlite:///{work / f'eval_{shift}.db'}"
    if not (work / f"eval_{shift}.db").exists():
        import_source(evaldb, shift, folders, cache)
        if shift == "heart":  # the original source's films of the same patients, as their readers drew them
            cx(evaldb, "masks", "import", "png-dirs", str(folders["wingB"]), "--images", "png", "--source",
               "wingspan", *[a for s in STRUCTURES for a in ("--mask", f"{s}=mask/{s}")], cache=cache)
    sdb = f"sqlite:///{work / f'split_{shift}.db'}"
    if not (work / f"split_{shift}.db").exists():
        import_source(sdb, shift, folders, cache)
    held, pool = split(sdb, shift)
    held_original = [u[2:] for u in held] if shift == "heart" else []  # h_UID: the same film unshifted
    out: dict = {"shift": shift, "parent": str(parent), "held_out": len(held), "pool": len(pool), "by_n": {}}
    label(evaldb, str(parent), held + pool + held_original, cache, "bench_all")
    out["parent_new"] = scores(evaldb, str(parent), set(held))
    if held_original:
        out["parent_original"] = scores(evaldb, str(parent), set(held_original))
    if ref:
        label(evaldb, str(ref), held + held_original, cache, "bench_ref")
        out["reference_new"] = scores(evaldb, str(ref), set(held))
    for n in ns:
        chosen = pool[:n]
        db_path = work / f"clinic_{shift}_{n}.db"
        run_dir = work / "runs" / f"adapt_{shift}_{n}"
        if not (run_dir / "best.pt").exists():
            if db_path.exists():
                db_path.unlink()
            import_source(f"sqlite:///{db_path}", shift, folders, cache)
            keep_only(f"sqlite:///{db_path}", chosen)
            started = time.perf_counter()
            cx(f"sqlite:///{db_path}", "train", "--from", str(parent), "--name", f"adapt_{shift}_{n}",
               "--run-dir", str(run_dir), "--no-resume", cache=cache)
            (run_dir / "seconds").write_text(f"{time.perf_counter() - started:.1f}")
        model = str(run_dir / "best.pt")
        label(evaldb, model, held + held_original, cache, "bench_held")
        row = {"films": n, "seconds": float((run_dir / "seconds").read_text()),
               "adapted_new": scores(evaldb, model, set(held))}
        if held_original:
            row["adapted_original"] = scores(evaldb, model, set(held_original))
            parent_pool = scores_including(evaldb, str(parent), set(chosen))
            row["calibrated_new"] = calibrated(parent_pool, out["parent_new"])
        out["by_n"][n] = row
        print(json.dumps(strip(row)), flush=True)
    return out


def scores_including(db: str, model: str, among: set[str]) -> dict:
    eng = D.connect(db)
    ev = evaluate(eng, model, include_trained=True, among=among)
    eng.dispose()
    return {"pairs": {r["uid"]: (r["ctr_pred"], r["ctr_true"]) for r in ev.per_image if "ctr_true" in r}}


def strip(d):
    """``d`` without the per-film pairs (kept in the JSON file, not printed)."""
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if k != "pairs"}
    return d


def table(result: dict) -> str:
    lines = [f"## {result['shift']} shift: {result['held_out']} held-out films of the new source", "",
             "| model | films | s | heart Dice | left / right lung Dice | CTR bias | CTR MAE | original source: "
             "Dice heart / L / R, CTR MAE |", "|---|---|---|---|---|---|---|---|"]

    def cells(s: dict | None) -> str:
        if not s:
            return "- | - | - | -"
        d = s["dice"]
        return (f"{d.get('heart', float('nan')):.4f} | {d.get('left_lung', float('nan')):.4f} / "
                f"{d.get('right_lung', float('nan')):.4f} | "
                + (f"{s['ctr_bias']:+.4f} | {s['ctr_mae']:.4f}" if s.get("ctr_mae") is not None else "- | -"))

    def orig(s: dict | None) -> str:
        if not s:
            return "-"
        d = s["dice"]
        return (f"{d['heart']:.4f} / {d['left_lung']:.4f} / {d['right_lung']:.4f}, "
                f"{s['ctr_mae']:.4f}")

    lines.append(f"| parent | 0 | - | {cells(result['parent_new'])} | {orig(result.get('parent_original'))} |")
    for n, row in result["by_n"].items():
        lines.append(f"| train --from parent | {n} | {row['seconds']:.0f} | {cells(row['adapted_new'])} | "
                     f"{orig(row.get('adapted_original'))} |")
        if "calibrated_new" in row:
            c = row["calibrated_new"]
            lines.append(f"| parent + offset calibration ({c['offset']:+.4f}, CI {c['ci'][0]:+.4f} to "
                         f"{c['ci'][1]:+.4f}) | {n} | - | as the parent | | {c['ctr_bias']:+.4f} | "
                         f"{c['ctr_mae']:.4f} | - |")
    if "reference_new" in result:
        lines.append(f"| trained on all {result['pool']} pool films | {result['pool']} | - | "
                     f"{cells(result['reference_new'])} | - |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--parent-heart", type=Path)
    ap.add_argument("--parent-lungs", type=Path)
    ap.add_argument("--ref-heart", type=Path)
    ap.add_argument("--ref-lungs", type=Path)
    ap.add_argument("--n", default="10,20,40")
    ap.add_argument("--prepare", action="store_true", help="Only write the new sources' folders.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.work)
    if args.prepare:
        print({k: str(v) for k, v in folders.items()})
        return
    ns = [int(x) for x in args.n.split(",")]
    results = []
    for shift, parent, ref in (("heart", args.parent_heart, args.ref_heart),
                               ("lungs", args.parent_lungs, args.ref_lungs)):
        if parent:
            results.append(run_shift(shift, parent, ref, ns, args.work, folders))
            print(table(results[-1]), flush=True)
    for r in results:
        (args.work / f"adapt_results_{r['shift']}.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()

"""Did a change move what labelling stores? Compare two databases labelled by the same model.

For a refactor that must not change behaviour: label the same films into two fresh databases
(`make demo DB=... ` from the commit before and after), then compare the sha256 of every
predicted mask's stored bytes and every column of every ``measurements`` row but its time and
run id.

Usage: python bench/label_snapshot.py sqlite:///before.db sqlite:///after.db
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def snapshot(url: str) -> dict[str, object]:
    """What labelling stored, keyed by what identifies it."""
    out: dict[str, object] = {}
    engine = create_engine(url)
    with engine.connect() as c:
        for r in c.execute(text("SELECT uid, structure, model, area, height, width, data FROM masks "
                                "WHERE kind = 'predicted'")):
            out[f"mask {r.uid} {r.structure} {r.model}"] = (r.area, r.height, r.width,
                                                           hashlib.sha256(r.data).hexdigest())
        for r in c.execute(text("SELECT * FROM measurements")):
            row = {k: v for k, v in r._mapping.items() if k not in ("labelled_at", "run_id")}
            out[f"measurements {row['uid']} {row['model']}"] = row
    engine.dispose()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args(argv)
    a, b = snapshot(args.before), snapshot(args.after)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    masks = sum(k.startswith("mask ") for k in a)
    print(f"{masks} predicted masks and {len(a) - masks} measurement rows before, {len(b)} entries after: "
          f"{len(differ)} differ")
    for k in differ[:20]:
        print(f"- {k}: {a.get(k)!r} -> {b.get(k)!r}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

"""Are two runs of a study the same? Compares the quality tables of two results folders byte for byte.

    python benchmarks/compare_tables.py BEFORE/results/demo-study AFTER/results/demo-study

Quality tables (variants, thirds, finetune, slices, cold, cross_model, cross_domain) must be byte-identical
for the same config: a seed fixes candidates, sampling and training. The headline and hypotheses tables
mix quality with timings measured on the machine (speedup, bound, memory), so for those the timing
columns and the speed claim's rows are set aside and the rest is compared byte for byte. ``--without-sasrec``
also sets aside SASRec's rows and columns (for two runs whose SASRec settings differ on purpose). Exit status
1 when anything differs, with the table and the columns that differ.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pandas as pd

QUALITY = ["variants", "thirds", "finetune", "slices", "cold", "cross_model", "cross_domain"]
MIXED = ["headline", "hypotheses"]
TIMING = ("speedup", "speedup_iqr", "bound", "time_bound", "above_bound", "memory_ratio")
SPEED_CLAIM = "4x speed"  # the hypotheses row whose value is a measured speedup


def quality_part(name: str, df: pd.DataFrame, sasrec: bool = True) -> pd.DataFrame:
    """The table without what the machine's clock decides (and, unless ``sasrec``, without SASRec)."""
    if name == "hypotheses":
        df = df[~df["claim"].str.contains(SPEED_CLAIM, regex=False)]
    df = df.drop(columns=[c for c in df.columns if c in TIMING or (not sasrec and "sasrec" in c)])
    if not sasrec:
        labels = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if labels:
            df = df[~df[labels].apply(lambda col: col.astype(str).str.contains("sasrec")).any(axis=1)]
    return df.reset_index(drop=True)


def compare(before: Path, after: Path, sasrec: bool = True) -> list[str]:
    """One line per table: identical, or which columns differ."""
    lines = []
    for name in QUALITY + MIXED:
        a, b = before / f"{name}.csv", after / f"{name}.csv"
        if not a.exists() and not b.exists():
            continue
        if not (a.exists() and b.exists()):
            lines.append(f"DIFFERS {name}: only in {'before' if a.exists() else 'after'}")
            continue
        ta, tb = a.read_bytes(), b.read_bytes()
        if name in MIXED or not sasrec:
            ta, tb = (quality_part(name, pd.read_csv(io.BytesIO(t)), sasrec).to_csv(index=False).encode()
                      for t in (ta, tb))
        aside = ", ".join(x for x, on in (("timings", name in MIXED), ("sasrec", not sasrec)) if on)
        if ta == tb:
            lines.append(f"identical {name} ({len(ta.splitlines()) - 1} rows{f'; set aside: {aside}' if aside else ''})")
            continue
        da, db = pd.read_csv(io.BytesIO(ta)), pd.read_csv(io.BytesIO(tb))
        cols = [c for c in da.columns if c not in db.columns or not da[c].equals(db[c])] if da.shape == db.shape else []
        lines.append(f"DIFFERS {name}: shapes {da.shape} vs {db.shape}; columns {cols or 'all'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--without-sasrec", action="store_true", help="set SASRec's rows and columns aside")
    args = ap.parse_args(argv)
    lines = compare(args.before, args.after, sasrec=not args.without_sasrec)
    print("\n".join(lines))
    return 1 if any(line.startswith("DIFFERS") for line in lines) or not lines else 0


if __name__ == "__main__":
    sys.exit(main())

"""Are two study runs the same? Compare their results tables (rows by key, values to a float tolerance) and,
given two run folders, their figure files byte for byte.

    python benchmarks/compare_results.py A/results/results.parquet B/results/results.parquet
    python benchmarks/compare_results.py RUN_A RUN_B          # results.parquet + every file under figures/

Exit status 0 when identical, 1 otherwise; the differences are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pandas as pd

from lorascope.results import compare_tables


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "source.json"
    }


def compare_figures(a: Path, b: Path) -> list[str]:
    """Lines naming every figure file that is missing on one side or differs in its bytes."""
    da, db = _digests(a), _digests(b)
    out = [f"figure only in A: {n}" for n in sorted(set(da) - set(db))]
    out += [f"figure only in B: {n}" for n in sorted(set(db) - set(da))]
    out += [f"figure differs: {n}" for n in sorted(set(da) & set(db)) if da[n] != db[n]]
    return [f"{len(set(da) | set(db))} figure files compared", *out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-9)
    ap.add_argument("--atol", type=float, default=1e-12)
    args = ap.parse_args(argv)
    runs = args.a.is_dir() and args.b.is_dir()
    ta, tb = ((p / "results" / "results.parquet") if runs else p for p in (args.a, args.b))
    diff = compare_tables(pd.read_parquet(ta), pd.read_parquet(tb), args.rtol, args.atol)
    print("\n".join(diff.lines()))
    same = diff.identical
    if runs:
        lines = compare_figures(args.a / "figures", args.b / "figures")
        print("\n".join(lines))
        same = same and len(lines) == 1
    print("IDENTICAL" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

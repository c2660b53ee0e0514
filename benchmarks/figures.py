"""Time the report's figure stage on a run's results table, and fingerprint its output bytes.

    python benchmarks/figures.py                          # a fake run (report.write_fake_run, seed 0)
    python benchmarks/figures.py runs/quickstart --reps 2 --hashes figs.json      # write fingerprints
    python benchmarks/figures.py runs/quickstart --check figs.json                 # same bytes as before?

The run folder is only read: figures go to a temporary folder. Per figure: the seconds to build it (its plotting
code) and to write PNG + SVG (matplotlib's drawing and encoding), best of ``--reps``; then ``render_figures`` end
to end. ``--check`` compares each file's sha256 with a fingerprint file written by ``--hashes`` (e.g. from the
code before an optimisation): figures are deterministic, so an optimisation must keep every byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path


def _time_each(run, out: Path, reps: int) -> list[tuple[str, float, float]]:
    from lorascope.report import _plot as P
    from lorascope.report import figures as F

    rows = []
    real_save = P.save
    for spec in F.FIGURES:
        best_build, best_save = float("inf"), float("inf")
        for _ in range(reps):
            clock = {}

            def timed_save(fig, out_dir, name, _clock=clock):
                _clock["built"] = time.perf_counter()
                return real_save(fig, out_dir, name)

            P.save = timed_save
            try:
                t0 = time.perf_counter()
                spec.make(run.df, out, run.arrays)
                t1 = time.perf_counter()
            finally:
                P.save = real_save
            if "built" in clock:
                best_build = min(best_build, clock["built"] - t0)
                best_save = min(best_save, t1 - clock["built"])
        rows.append((spec.name, best_build, best_save))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="a run folder with results/ (default: a fake run)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--hashes", help="write the sha256 of every figure file to this JSON file")
    ap.add_argument("--check", help="compare every figure file's sha256 with this JSON file")
    args = ap.parse_args(argv)

    import matplotlib  # noqa: F401  (import time is not figure time)

    from lorascope.report import load_run, render_figures, write_fake_run

    with tempfile.TemporaryDirectory(prefix="lorascope-figbench-") as tmp:
        run_dir = Path(args.run) if args.run else write_fake_run(Path(tmp) / "fake", seed=0)
        run = load_run(run_dir)
        rows = _time_each(run, Path(tmp) / "each", args.reps)
        best = float("inf")
        for i in range(args.reps):
            t0 = time.perf_counter()
            made = render_figures(run.df, Path(tmp) / f"all{i}", run.arrays)
            best = min(best, time.perf_counter() - t0)
        digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for ps in made.values() for p in ps}
    print(f"{'figure':<28} {'build s':>8} {'png+svg s':>10}")
    for name, build, save in rows:
        print(f"{name:<28} {build:>8.2f} {save:>10.2f}")
    print(f"{'sum':<28} {sum(r[1] for r in rows):>8.2f} {sum(r[2] for r in rows):>10.2f}")
    print(f"render_figures end to end: {best:.2f} s ({len(digests)} files, best of {args.reps})")
    if args.hashes:
        Path(args.hashes).write_text(json.dumps(digests, indent=2, sort_keys=True) + "\n")
    if args.check:
        want = json.loads(Path(args.check).read_text())
        diff = sorted(n for n in set(want) | set(digests) if want.get(n) != digests.get(n))
        print("byte-identical to", args.check if not diff else f"DIFFERENT from {args.check}: {diff}")
        if diff:
            raise SystemExit(1)


if __name__ == "__main__":
    main()

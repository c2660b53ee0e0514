"""Per-stage seconds of a study run, read from the run's own timing record (one run, or before/after side by side).

    python benchmarks/study_stages.py runs/quickstart                 # one run
    python benchmarks/study_stages.py before/quickstart after/quickstart  # two runs: seconds and after/before

Where the seconds come from, first found wins:

1. ``RUN/timings.json``, the study's timing record::

       {"stages": {"model_load": 3.1, "adapters": 195.2, "extraction": 158.9, "saes": 231.7,
                   "geometry": 239.4, "report": 29.8},
        "detail": {"sae:6:rank_4:seed0": 8.1, "geometry/splice": 140.2, ...},
        "reused": ["adapters"],           # stages taken from an earlier run (0 s here)
        "total": 855.0}

   written atomically after every stage (a killed run still shows what it finished), ``total`` at the end.
   ``stages`` sums to roughly ``total``; ``detail`` breaks a stage down (``<stage>/<part>`` or ``sae:<label>``).
2. ``RUN/results/meta.json`` → ``timings`` (what the study records today): ``adapters``, ``extraction``,
   ``sae:<label>`` per SAE, ``geometry``; the SAE entries are summed into a ``saes`` row. The report, the model
   load and stages reused from a cache are not recorded there.

Stages that did no work in this run (re-used) show as ``-``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["model_load", "adapters", "extraction", "saes", "geometry", "report"]


def _legacy(timings: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    stages: dict[str, float] = {}
    detail: dict[str, float] = {}
    for name, sec in timings.items():
        if name == "total":
            continue
        if name.startswith("sae:"):
            stages["saes"] = stages.get("saes", 0.0) + float(sec)
            detail[name] = float(sec)
        else:
            stages[name] = float(sec)
    return stages, detail


def read_stage_seconds(run_dir: str | Path) -> dict[str, object]:
    """{"stages": {stage: s}, "detail": {part: s}, "reused": [...], "total": s or None, "source": file} of a run."""
    run = Path(run_dir)
    record = run / "timings.json"
    if record.is_file():
        t = json.loads(record.read_text())
        return {
            "stages": {k: float(v) for k, v in t.get("stages", {}).items()},
            "detail": {k: float(v) for k, v in t.get("detail", {}).items()},
            "reused": list(t.get("reused", [])),
            "total": t.get("total"),
            "source": str(record),
        }
    meta = run / "results" / "meta.json"
    if not meta.is_file():
        raise SystemExit(
            f"error: {run} has neither timings.json nor results/meta.json; "
            "fix: pass the output_dir of a finished `lorascope run`"
        )
    timings = json.loads(meta.read_text()).get("timings") or {}
    stages, detail = _legacy(timings)
    return {"stages": stages, "detail": detail, "reused": [], "total": timings.get("total"), "source": str(meta)}


def _ordered(names: set[str]) -> list[str]:
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def format_table(runs: list[dict[str, object]], labels: list[str], detail: bool = False) -> str:
    """A text table: one row per stage (and per detail entry if asked), one seconds column per run."""
    names = _ordered(set().union(*(r["stages"].keys() for r in runs)))
    rows = [(n, [r["stages"].get(n) for r in runs]) for n in names]
    if detail:
        parts = sorted(set().union(*(r["detail"].keys() for r in runs)))
        rows += [(f"  {p}", [r["detail"].get(p) for r in runs]) for p in parts]
    totals = [r["total"] if r["total"] is not None else sum(r["stages"].values()) for r in runs]
    rows.append(("total", totals))
    head = f"{'stage':<36}" + "".join(f"{lab:>14}" for lab in labels) + ("   after/before" if len(runs) == 2 else "")
    lines = [head, "-" * len(head)]
    for name, secs in rows:
        cells = "".join(f"{s:>14.1f}" if s is not None else f"{'-':>14}" for s in secs)
        if len(runs) == 2:
            ratio = secs[1] / secs[0] if secs[0] and secs[1] is not None else None
            cells += f"{ratio:>15.2f}" if ratio is not None else f"{'':>15}"
        lines.append(f"{name:<36}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="one run folder, or two (before, after)")
    ap.add_argument("--detail", action="store_true", help="also list each SAE / sub-stage")
    args = ap.parse_args(argv)
    if len(args.runs) > 2:
        raise SystemExit("error: give one or two run folders")
    runs = [read_stage_seconds(r) for r in args.runs]
    labels = ["seconds"] if len(runs) == 1 else ["before s", "after s"]
    for r, path in zip(runs, args.runs, strict=True):
        print(f"{path}: {r['source']}")
    print(format_table(runs, labels, detail=args.detail))


if __name__ == "__main__":
    main()

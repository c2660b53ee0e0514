"""Stage 6: publish. The results table (Parquet + CSV), arrays, contexts and meta.json, mirrored atomically to
``output_dir/results`` (the stable place users and the report read), then figures and report.html."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lorascope import __version__
from lorascope.io import atomic_dir, atomic_path, read_json, write_json
from lorascope.results import ResultRow, rows_to_frame
from lorascope.study.adapters import Adapter
from lorascope.study.cache import RESULTS, RunState

SORT_KEY = ["family", "metric", "layer", "rank", "adapter"]


def write_results(st: RunState, stage_dir: Path, rows: list[ResultRow], adapters: list[Adapter], store) -> None:
    """results.parquet/csv + arrays + contexts.json + meta.json into ``stage_dir/results``."""
    df = rows_to_frame(rows).sort_values(SORT_KEY, kind="stable")
    res = stage_dir / RESULTS
    (res / "arrays").mkdir(parents=True, exist_ok=True)
    with atomic_path(res / "results.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(res / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    for f in (stage_dir / "parts").glob("*.npz"):
        with atomic_path(res / "arrays" / f.name) as tmp:
            shutil.copyfile(f, tmp)
    contexts = [c for f in sorted((stage_dir / "parts").glob("*.ctx")) for c in read_json(f)]
    write_json(res / "contexts.json", contexts)
    cfg = st.config
    write_json(
        res / "meta.json",
        {
            "name": cfg.name,
            "model": cfg.model.spec,
            "d_model": store.d_model,
            "n_layers": store.manifest.get("config", {}).get("model", {}).get("n_layers"),
            "layers": list(cfg.extraction.layers),
            "adapters": {a.name: a.rank for a in adapters},
            "fine_tunes": {a.name: {"kind": a.kind, "step": a.step} for a in adapters},
            "reference_saes": _reference_picks(cfg),
            "config": cfg.model_dump(),
            "lorascope_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def _reference_picks(cfg) -> dict[str, str]:
    """Which pretrained reference SAE file each layer used, and why (empty when the reference SAEs were trained)."""
    if cfg.reference_sae.source != "path":
        return {}
    from lorascope.study.saes import reference_picks

    return {str(layer): pick.describe() for layer, pick in reference_picks(cfg).items()}


def _source(stage_dir: Path, density_dir: Path | None) -> str:
    """What the published results were made from (the measure stage's folder, plus the density stage's)."""
    return stage_dir.name + ("" if density_dir is None else f"+{density_dir.name}")


def _merge_density(res: Path, density_dir: Path) -> None:
    """Append the density stage's rows to the results table in ``res`` (Parquet and CSV)."""
    import pandas as pd

    from lorascope.study.density import read_rows

    rows = read_rows(density_dir)
    if not rows:
        return
    df = pd.concat([pd.read_parquet(res / "results.parquet"), rows_to_frame(rows)], ignore_index=True)
    df = df.sort_values(SORT_KEY, kind="stable")
    df.to_parquet(res / "results.parquet", index=False)
    df.to_csv(res / "results.csv", index=False)


def publish(st: RunState, stage_dir: Path, density_dir: Path | None = None) -> Path:
    """Mirror the measure stage's results (with the density stage's rows, when it ran) into output_dir/results
    (skipped when already there)."""
    src, dst = stage_dir / RESULTS, st.out / RESULTS
    marker = dst / "source.json"
    if marker.is_file() and read_json(marker).get("geometry") == _source(stage_dir, density_dir):
        return dst
    with atomic_dir(dst) as tmp:  # a killed publish leaves the old results folder or none, never a mixture
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if density_dir is not None:
            _merge_density(Path(tmp), density_dir)
        meta = read_json(tmp / "meta.json")
        meta["timings"] = st.timings
        write_json(tmp / "meta.json", meta)
        write_json(tmp / "source.json", {"geometry": _source(stage_dir, density_dir)})
    return dst


def report(st: RunState, stage_dir: Path, density_dir: Path | None = None) -> Path | None:
    """Figures and report.html of the published results (skipped when already made from this stage)."""
    try:
        from lorascope.report import write_report
    except ImportError:
        return None
    path = st.out / "report.html"
    stamp = st.out / "figures" / "source.json"
    if path.is_file() and stamp.is_file() and read_json(stamp).get("geometry") == _source(stage_dir, density_dir):
        return path
    st.log("writing figures and report.html")
    t0 = time.perf_counter()
    path = write_report(st.out)
    write_json(stamp, {"geometry": _source(stage_dir, density_dir)})
    st.finished("report", t0)
    return path

"""Read a run folder (as lorascope.study.publish writes it: results table, per-(layer, adapter) arrays, contexts, meta).

Everything except the results table is optional: a partial run still gives a partial report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorascope.errors import LorascopeError
from lorascope.results import COLUMNS

ARRAY_FILE = re.compile(r"^L(-?\d+)__(.*)\.npz$")
_NUMERIC = ["layer", "rank", "value", "ci_low", "ci_high", "null_value", "n", "d"]


@dataclass
class RunData:
    """A loaded run folder. ``arrays[(layer, adapter)]`` maps npz keys to numpy arrays."""

    run_dir: Path
    df: Any  # pandas.DataFrame with lorascope.results.COLUMNS
    arrays: dict[tuple[int, str], dict[str, np.ndarray]] = field(default_factory=dict)
    contexts: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def normalize_frame(df):
    """Check the columns and coerce dtypes (layer/rank int, numbers float, text str). Returns a copy."""
    import pandas as pd

    if "ci_unit" not in df.columns:  # tables written before the column existed
        df = df.assign(ci_unit="")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise LorascopeError(
            f"results table lacks columns {missing}",
            fix="re-run the pipeline; the table must have lorascope.results.COLUMNS",
        )
    out = df[COLUMNS].copy()
    for c in _NUMERIC:
        out[c] = pd.to_numeric(out[c], errors="coerce")
    out["layer"] = out["layer"].fillna(-1).astype(int)
    out["rank"] = out["rank"].fillna(-1).astype(int)
    for c in ("family", "metric", "adapter", "null_name", "ci_unit", "dtype", "note"):
        out[c] = out[c].astype(object).fillna("").astype(str)
    return out.reset_index(drop=True)


def read_results(run_dir: str | Path):
    """The results DataFrame of ``run_dir`` (Parquet; the CSV copy only when there is no Parquet file). A Parquet
    file that exists but cannot be read is an error, never silently replaced by the CSV (which may be older)."""
    import pandas as pd

    res = Path(run_dir) / "results"
    pq, csv = res / "results.parquet", res / "results.csv"
    if pq.is_file():
        try:
            frame = pd.read_parquet(pq)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for truncated/corrupt files
            raise LorascopeError(
                f"{pq} is not a readable Parquet file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})",
                fix="re-run `lorascope run CONFIG` to rewrite the results (it resumes from the finished stages)",
            ) from exc
        return normalize_frame(frame)
    if csv.is_file():
        return normalize_frame(pd.read_csv(csv, keep_default_na=False, na_values=["", "nan", "NaN"]))
    raise LorascopeError(
        f"no results table in {res}", fix="point at a run folder written by `lorascope run`, or run the pipeline first"
    )


def read_arrays(run_dir: str | Path) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """All ``results/arrays/L{layer}__{adapter}.npz`` files, keyed by (layer, adapter)."""
    folder = Path(run_dir) / "results" / "arrays"
    out: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        m = ARRAY_FILE.match(p.name)
        if not m:
            continue
        try:
            with np.load(p, allow_pickle=False) as z:
                out[(int(m.group(1)), m.group(2))] = {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError) as exc:
            raise LorascopeError(f"cannot read {p}: {exc}", fix="delete the file and re-run the pipeline") from exc
    return out


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LorascopeError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", fix="delete the file and re-run the pipeline"
        ) from exc


def load_run(run_dir: str | Path) -> RunData:
    """Load the results table (required) and arrays, contexts and meta (optional) of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LorascopeError(f"run folder {run_dir} does not exist", fix="check the path")
    df = read_results(run_dir)
    extra = run_dir / "absorption" / "absorption.csv"  # written by `lorascope absorption --out RUN_DIR/absorption`
    if extra.is_file():
        import pandas as pd

        rows = normalize_frame(pd.read_csv(extra, keep_default_na=False, na_values=["", "nan", "NaN"]))
        df = pd.concat([df[df.family != "absorption"], rows], ignore_index=True)
    contexts = _read_json(run_dir / "results" / "contexts.json", [])
    meta = _read_json(run_dir / "results" / "meta.json", {})
    if not isinstance(contexts, list):
        raise LorascopeError(
            f"{run_dir / 'results' / 'contexts.json'} is not a list", fix="re-run the pipeline's contexts stage"
        )
    return RunData(
        run_dir=run_dir,
        df=df,
        arrays=read_arrays(run_dir),
        contexts=contexts,
        meta=meta if isinstance(meta, dict) else {},
    )

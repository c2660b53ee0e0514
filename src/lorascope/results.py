"""The tidy results table: one row per statistic, keyed by layer, adapter/rank and metric.

Every stage that measures something returns ``list[ResultRow]``; the pipeline concatenates them into one
table (Parquet + CSV) and the report reads only that table. A statistic without a null or CI leaves those NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

COLUMNS = [
    "family",
    "metric",
    "layer",
    "adapter",
    "rank",
    "value",
    "ci_low",
    "ci_high",
    "null_value",
    "null_name",
    "ci_unit",
    "n",
    "d",
    "dtype",
    "note",
]


@dataclass
class ResultRow:
    """One statistic.

    family: group of metrics ("delta_norm", "reconstruction", "decoder_similarity", "subspace", "cka",
            "density", "splice", "absorption", …); metric: the statistic's name within it ("mmcs_adapter_to_ref");
            every name a study writes is in :mod:`lorascope.results_schema`.
    layer/adapter/rank: where it was measured (-1 / "" when not applicable).
    value, ci_low, ci_high: point estimate and bootstrap interval (NaN when none).
    null_value, null_name: the control it should be read against ("random_isotropic", "seed_vs_seed", …).
    ci_unit: what the interval resampled ("document", "seed" or "atom"; "" when there is no interval).
    n: number of tokens/atoms it was computed on; d: dimension; dtype: precision of the inputs.
    """

    family: str
    metric: str
    value: float
    layer: int = -1
    adapter: str = ""
    rank: int = -1
    ci_low: float = math.nan
    ci_high: float = math.nan
    null_value: float = math.nan
    null_name: str = ""
    ci_unit: str = ""
    n: int = 0
    d: int = 0
    dtype: str = "float32"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # side values (not table columns)

    def as_record(self) -> dict[str, Any]:
        rec = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        rec["value"] = float(rec["value"])
        return rec


def rows_to_frame(rows: list[ResultRow]):
    """A pandas DataFrame with the columns in :data:`COLUMNS` order."""
    import pandas as pd

    df = pd.DataFrame([r.as_record() for r in rows], columns=COLUMNS)
    return df


def row_from_record(rec: dict[str, Any]) -> ResultRow:
    known = {f.name for f in fields(ResultRow)}
    return ResultRow(**{k: v for k, v in rec.items() if k in known})


KEY = ["family", "metric", "layer", "adapter", "rank"]
FLOAT_COLUMNS = ["value", "ci_low", "ci_high", "null_value"]


@dataclass
class TableDiff:
    """How two results tables differ: rows only in one, and (key, column, a, b) for values that disagree."""

    only_a: list[tuple]
    only_b: list[tuple]
    changed: list[tuple]
    n_rows: int

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.changed)

    def lines(self, limit: int = 50) -> list[str]:
        out = [
            f"{self.n_rows} rows compared: {len(self.only_a)} only in A, {len(self.only_b)} only in B, "
            f"{len(self.changed)} differing values"
        ]
        out += [f"only in A: {k}" for k in self.only_a[:limit]]
        out += [f"only in B: {k}" for k in self.only_b[:limit]]
        out += [f"differs: {k} {col}: {a!r} vs {b!r}" for k, col, a, b in self.changed[:limit]]
        return out


def _same(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        a, b = float(a), float(b)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return a == b


def compare_tables(a, b, rtol: float = 1e-9, atol: float = 1e-12) -> TableDiff:
    """Compare two results tables (DataFrames with :data:`COLUMNS`) row by row on :data:`KEY`: float columns to
    ``rtol``/``atol`` (NaN equals NaN), every other column exactly. Duplicate keys are compared in order."""

    def index(df) -> dict[tuple, dict[str, Any]]:
        out: dict[tuple, dict[str, Any]] = {}
        for rec in df.to_dict("records"):
            key = tuple(rec[c] for c in KEY)
            while key in out:  # a repeated key (should not happen): keep both, numbered
                key = (*key, "#")
            out[key] = rec
        return out

    ia, ib = index(a), index(b)
    changed = []
    for key in sorted(set(ia) & set(ib), key=str):
        for col in [c for c in COLUMNS if c not in KEY]:
            va, vb = ia[key].get(col), ib[key].get(col)
            tol = (rtol, atol) if col in FLOAT_COLUMNS else (0.0, 0.0)
            if not _same(va, vb, *tol):
                changed.append((key, col, va, vb))
    return TableDiff(
        sorted(set(ia) - set(ib), key=str), sorted(set(ib) - set(ia), key=str), changed, len(set(ia) | set(ib))
    )


__all__ = ["COLUMNS", "KEY", "ResultRow", "TableDiff", "asdict", "compare_tables", "row_from_record", "rows_to_frame"]

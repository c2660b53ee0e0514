"""The tidy results table: one row per statistic, keyed by layer, adapter/rank and metric.

Every stage that measures something returns ``list[ResultRow]``; the pipeline concatenates them into one
table (Parquet + CSV) and the report reads only that table. A statistic without a null or CI leaves those NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

COLUMNS = ["family", "metric", "layer", "adapter", "rank", "value", "ci_low", "ci_high", "null_value",
           "null_name", "n", "d", "dtype", "note"]


@dataclass
class ResultRow:
    """One statistic.

    family: group of metrics ("delta_norm", "reconstruction", "decoder_similarity", "subspace", "cka",
            "density", "splice", "absorption", …); metric: the statistic's name within it ("mmcs_adapter_to_ref").
    layer/adapter/rank: where it was measured (-1 / "" when not applicable).
    value, ci_low, ci_high: point estimate and bootstrap interval (NaN when none).
    null_value, null_name: the control it should be read against ("random_isotropic", "seed_vs_seed", …).
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
    n: int = 0
    d: int = 0
    dtype: str = "float32"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

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


__all__ = ["COLUMNS", "ResultRow", "rows_to_frame", "row_from_record", "asdict"]

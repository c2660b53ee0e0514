"""Verdicts that read a statistic against its strongest null and its ceiling, never against a weak control.

Each helper returns one of a few fixed strings (the findings print them) and is a pure function of numbers:
- :func:`alignment_verdict`: "no alignment" / "weak" / "at ceiling" / "not testable here".
- :func:`reconstruction_verdict`: "holds" / "does not hold" / "not testable here" for "the dictionary
  reconstructs Δ better than the best control"; FVU's own null is the mean predictor (FVU = 1).
- :func:`overlap_verdict`: "beyond chance" / "at chance" for selection-aware subspace overlap.
Intervals are (low, high) pairs or any object with ``low``/``high`` (``CI``, ``UnitCI``); a NaN bound means no
interval exists and the verdict is "not testable here" rather than a guess (Efron & Tibshirani 1993 on reading
percentile intervals; the "strongest baseline" rule follows SAEBench, Karvonen et al. 2025).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lorascope.errors import LorascopeError

NOT_TESTABLE = "not testable here"
ALIGNMENT_VERDICTS = ("no alignment", "weak", "at ceiling", NOT_TESTABLE)
RECONSTRUCTION_VERDICTS = ("holds", "does not hold", NOT_TESTABLE)
FVU_NULL = 1.0  # FVU of predicting Δ's mean for every token (the null_value of every FVU row)


def _bounds(ci: Any) -> tuple[float, float]:
    low, high = (ci.low, ci.high) if hasattr(ci, "low") else ci
    low, high = float(low), float(high)
    if not math.isnan(low) and not math.isnan(high) and low > high:
        raise LorascopeError(f"interval low {low} > high {high}", fix="pass (low, high)")
    return low, high


def _strongest(nulls: Any) -> float:
    if hasattr(nulls, "strongest"):
        return float(nulls.strongest)
    if isinstance(nulls, Mapping):
        vals = [float(v) for v in nulls.values() if not math.isnan(float(v))]
        return max(vals) if vals else float("nan")
    return float(nulls)


def alignment_verdict(value: float, ci: Any, nulls: Any, ceiling: Any) -> str:
    """MMCS(adapter -> reference) read against the strongest null and the seed-vs-seed ceiling.

    ``nulls``: :class:`~lorascope.geometry.nulls.AlignmentNulls`, a mapping name -> value, or one number;
    ``ceiling``: the seed-vs-seed ceiling over alive atoms, a number or an interval (then its lower bound is
    used: the ceiling is itself estimated); None when no ceiling is available.
    - "no alignment": the interval's lower bound is not above the strongest null (or the value is not), and the
      test had power: the ceiling's lower bound is above that null (or no ceiling is available);
    - "not testable here" instead of "no alignment" when the ceiling is not above the strongest null: two seeds of
      the adapter recipe agree no better than random atoms do, so no reference dictionary could have shown
      alignment (e.g. a Δ of participation ratio ~1.5, where random atoms with Δ's covariance all point one way);
    - "at ceiling": the ceiling (its lower bound) is within or below the interval;
    - "weak": above the null and clearly below the ceiling.
    """
    low, high = _bounds(ci)
    null = _strongest(nulls)
    if math.isnan(low) or math.isnan(high) or math.isnan(null):
        return NOT_TESTABLE
    interval = hasattr(ceiling, "low") or isinstance(ceiling, tuple | list)
    top = float("nan") if ceiling is None else (_bounds(ceiling)[0] if interval else float(ceiling))
    if low <= null or value <= null:
        return NOT_TESTABLE if not math.isnan(top) and top <= null else "no alignment"
    if not math.isnan(top) and high >= top:
        return "at ceiling"
    return "weak"


def best_control(control_fvus: Mapping[str, float]) -> tuple[str, float]:
    """(name, FVU) of the best (lowest-FVU) control, e.g. {"ref_sae_difference": .., "ref_active_lstsq": ..}."""
    vals = {k: float(v) for k, v in control_fvus.items() if not math.isnan(float(v))}
    if not vals:
        raise LorascopeError("no control FVU given", fix="pass the FVUs of ref_sae_difference and ref_active_lstsq")
    name = min(vals, key=vals.__getitem__)
    return name, vals[name]


def reconstruction_verdict(diff_ci: Any, fvu_ci: Any) -> str:
    """Does the dictionary reconstruct Δ better than the best control and than the mean predictor?

    ``diff_ci``: interval of FVU(dictionary) − FVU(best control), paired over the same document resamples
    (:func:`~lorascope.geometry.bootstrap.fvu_bootstrap_samples`); ``fvu_ci``: interval of FVU(dictionary).
    "holds" only when both intervals lie wholly below 0 and below :data:`FVU_NULL` respectively.
    """
    d_low, d_high = _bounds(diff_ci)
    f_low, f_high = _bounds(fvu_ci)
    if any(math.isnan(v) for v in (d_low, d_high, f_low, f_high)):
        return NOT_TESTABLE
    return "holds" if d_high < 0 and f_high < FVU_NULL else "does not hold"


def overlap_verdict(value: float, null_q95: float) -> str:
    """Selection-aware overlap: "beyond chance" when above the 95th percentile of the selected null."""
    if math.isnan(value) or math.isnan(null_q95):
        return NOT_TESTABLE
    return "beyond chance" if value > null_q95 else "at chance"


__all__ = [
    "ALIGNMENT_VERDICTS",
    "FVU_NULL",
    "NOT_TESTABLE",
    "RECONSTRUCTION_VERDICTS",
    "alignment_verdict",
    "best_control",
    "overlap_verdict",
    "reconstruction_verdict",
]

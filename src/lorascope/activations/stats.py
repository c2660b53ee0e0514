"""Per-(layer, adapter) statistics of h_Δ accumulated while extracting (no second pass over the store).

Kept per (layer, adapter): a float64 :class:`~lorascope.geometry.StreamingCovariance` of Δ (mean, covariance,
eigen-spectrum, participation ratio), exact float64 sums for mean ‖Δ‖, mean ‖Δ‖/‖h_base‖ and the energy ratio
Σ‖Δ‖²/Σ‖h_base‖², and log10-binned histograms (0.01 dex bins, so quantiles are within ±1.2%) of ‖Δ‖ and
‖Δ‖/‖h_base‖. The whole state is a handful of tensors, saved exactly (float64 / int64) after every shard so an
interrupted extraction resumes to bitwise the same statistics, and mergeable across ranks.
"""

from __future__ import annotations

import math

import torch

from lorascope.geometry import StreamingCovariance, n_components_for_variance, participation_ratio
from lorascope.geometry.density import token_norms

LOG10_MIN, LOG10_MAX, BINS = -12.0, 8.0, 2000
_SUMS = ("n", "sum_norm", "sum_ratio", "sum_sq_delta", "sum_sq_base")
QUANTILES = (0.1, 0.5, 0.9, 0.99)


def _log_hist(values: torch.Tensor) -> torch.Tensor:
    v = torch.log10(values.double().clamp_min(10.0**LOG10_MIN))
    idx = ((v - LOG10_MIN) / (LOG10_MAX - LOG10_MIN) * BINS).floor().long().clamp(0, BINS - 1)
    return torch.bincount(idx, minlength=BINS)


def _hist_quantile(counts: torch.Tensor, q: float) -> float:
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    cum = torch.cumsum(counts, 0)
    i = int(torch.searchsorted(cum, torch.tensor(q * total, dtype=cum.dtype), right=False).clamp(max=BINS - 1))
    width = (LOG10_MAX - LOG10_MIN) / BINS
    return 10.0 ** (LOG10_MIN + (i + 0.5) * width)


class DeltaStats:
    """Streaming statistics of Δ rows [n, d] paired with their base rows (float64 accumulation)."""

    def __init__(self, d: int) -> None:
        self.d = d
        self.cov = StreamingCovariance(d)
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        self.hist_norm = torch.zeros(BINS, dtype=torch.long)
        self.hist_ratio = torch.zeros(BINS, dtype=torch.long)

    def update(self, base: torch.Tensor, delta: torch.Tensor) -> None:
        if delta.shape[0] == 0:
            return
        self.cov.update(delta)
        dn, bn, ratio = token_norms(base, delta)
        self.sums += torch.stack(
            [
                torch.tensor(float(delta.shape[0]), dtype=torch.float64),
                dn.sum(),
                ratio.sum(),
                (dn * dn).sum(),
                (bn * bn).sum(),
            ]
        )
        self.hist_norm += _log_hist(dn)
        self.hist_ratio += _log_hist(ratio)

    @property
    def n(self) -> int:
        return int(self.sums[0])

    def merge(self, other: DeltaStats) -> DeltaStats:
        self.cov.merge(other.cov)
        self.sums += other.sums
        self.hist_norm += other.hist_norm
        self.hist_ratio += other.hist_ratio
        return self

    # exact (de)serialisation for the extraction checkpoint
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        cov = {f"{prefix}.cov_{k}": v for k, v in self.cov.state().items()}
        return {
            **cov,
            f"{prefix}.sums": self.sums.clone(),
            f"{prefix}.hist_norm": self.hist_norm.clone(),
            f"{prefix}.hist_ratio": self.hist_ratio.clone(),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str, d: int) -> DeltaStats:
        s = cls(d)
        s.cov = StreamingCovariance.from_state({k: tensors[f"{prefix}.cov_{k}"] for k in ("n", "mean", "scatter")}, d)
        s.sums = tensors[f"{prefix}.sums"].clone()
        s.hist_norm = tensors[f"{prefix}.hist_norm"].clone()
        s.hist_ratio = tensors[f"{prefix}.hist_ratio"].clone()
        return s

    def summary(self, top_eigvals: int = 32) -> dict:
        """JSON-able summary: counts, norm quantiles, energy ratio, effective rank of Δ (float64 spectrum)."""
        n = self.n
        out: dict = {"n_tokens": n}
        if n == 0:
            return out
        s = self.sums.tolist()
        out["delta_norm"] = {
            "mean": s[1] / n,
            **{f"q{int(q * 100)}": _hist_quantile(self.hist_norm, q) for q in QUANTILES},
        }
        out["relative_norm"] = {
            "mean": s[2] / n,
            **{f"q{int(q * 100)}": _hist_quantile(self.hist_ratio, q) for q in QUANTILES},
        }
        out["energy_ratio"] = s[3] / s[4] if s[4] > 0 else float("nan")
        out["mean_delta_norm"] = float(self.cov.mean.norm())
        if n >= 2:
            lam = self.cov.eigvals()
            out["participation_ratio"] = participation_ratio(lam)
            out["n_components_90"] = n_components_for_variance(lam, 0.9)
            out["n_components_99"] = n_components_for_variance(lam, 0.99)
            out["total_variance"] = float(lam.sum())
            out["top_eigvals"] = [float(x) for x in lam[:top_eigvals]]
        out["quantile_resolution_dex"] = (LOG10_MAX - LOG10_MIN) / BINS
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def vectors(self) -> dict[str, torch.Tensor]:
        """Mean Δ [d] and the full covariance spectrum [d] (descending), float64."""
        if self.n < 2:
            return {}
        return {"mean": self.cov.mean.clone(), "eigvals": self.cov.eigvals().contiguous()}


__all__ = ["DeltaStats"]

"""Sparsity, norms and spectra: density histograms, delta-norm summaries, streaming covariance, effective
rank.

``StreamingCovariance`` is the float64 mean/covariance accumulator the activation-extraction stage reuses. It
merges batches with Chan et al.'s pairwise update (mean and centred scatter combined exactly), so the
result does not suffer the cancellation of Σxxᵀ - n·μμᵀ when the data sit far from the origin.

Effective rank of Δ from its covariance eigenvalues λ: participation ratio PR = (Σλ)² / Σλ² (1 for one
direction, d for isotropic data) and the number of principal components needed for 90% / 99% of the variance.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from lorascope import results_schema as schema
from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor, paired_activations
from lorascope.geometry.metrics import feature_density, l0
from lorascope.results import ResultRow


class StreamingCovariance:
    """Running mean [d] and scatter [d, d] in float64 over batches x [n, d] (O(d²) memory)."""

    def __init__(self, d: int | None = None) -> None:
        self.n = 0
        self.d = d
        self._mean: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None

    def update(self, x) -> StreamingCovariance:
        x = as_tensor(x, "x", torch.float64, ndim=2)
        if self.d is not None and x.shape[1] != self.d:
            raise LorascopeError(
                f"batch has width {x.shape[1]} but the covariance is {self.d}-dimensional",
                fix="stream one layer at a time",
            )
        if x.shape[0] == 0:
            return self
        m = x.mean(0)
        xc = x - m
        return self._merge(x.shape[0], m, xc.T @ xc)

    def _merge(self, nb: int, mb: torch.Tensor, sb: torch.Tensor) -> StreamingCovariance:
        if self._mean is None:
            self.d = mb.shape[0]
            self.n, self._mean, self._scatter = nb, mb.clone(), sb.clone()
            return self
        na = self.n
        n = na + nb
        delta = mb - self._mean
        self._scatter += sb + torch.outer(delta, delta) * (na * nb / n)
        self._mean += delta * (nb / n)
        self.n = n
        return self

    def merge(self, other: StreamingCovariance) -> StreamingCovariance:
        """Fold another accumulator (e.g. from another worker) into this one."""
        if other._mean is None:
            return self
        if self.d is not None and other.d != self.d:
            raise LorascopeError(
                f"cannot merge covariances of widths {self.d} and {other.d}",
                fix="merge accumulators of the same layer",
            )
        return self._merge(other.n, other._mean, other._scatter)

    def state(self) -> dict[str, torch.Tensor]:
        """Exact state for checkpoints: {"n": [1] int64, "mean": [d], "scatter": [d, d]} (float64)."""
        d = self.d or 0
        mean = self._mean if self._mean is not None else torch.zeros(d, dtype=torch.float64)
        scatter = self._scatter if self._scatter is not None else torch.zeros(d, d, dtype=torch.float64)
        return {
            "n": torch.tensor([self.n], dtype=torch.long),
            "mean": mean.contiguous(),
            "scatter": scatter.contiguous(),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], d: int | None = None) -> StreamingCovariance:
        """Inverse of :meth:`state` (bit-exact)."""
        cov = cls(d if d is not None else int(state["mean"].shape[0]))
        n = int(state["n"][0])
        if n:
            cov._merge(n, state["mean"].clone(), state["scatter"].clone())
        return cov

    def _need(self, k: int = 1) -> None:
        if self.n < k:
            raise LorascopeError(f"covariance needs at least {k} samples, got {self.n}", fix="stream more tokens")

    @property
    def mean(self) -> torch.Tensor:
        self._need()
        return self._mean

    def cov(self, ddof: int = 1) -> torch.Tensor:
        """Covariance [d, d]: scatter / (n - ddof)."""
        self._need(ddof + 1)
        return self._scatter / (self.n - ddof)

    def eigvals(self, ddof: int = 1) -> torch.Tensor:
        """Eigenvalues of the covariance [d], descending, clipped at 0."""
        return torch.linalg.eigvalsh(self.cov(ddof)).flip(0).clamp_min(0.0)

    def top_components(self, k: int) -> torch.Tensor:
        """Top-k principal directions [k, d] (rows, float64)."""
        if not 1 <= k <= (self.d or 0):
            raise LorascopeError(f"k = {k} is not in 1..{self.d}", fix="choose k <= d")
        _, vecs = torch.linalg.eigh(self.cov())
        return vecs.flip(1)[:, :k].T.contiguous()


def participation_ratio(eigvals) -> float:
    """(Σλ)² / Σλ² of a spectrum [d] (effective number of dimensions)."""
    lam = as_tensor(eigvals, "eigvals", torch.float64).reshape(-1).clamp_min(0.0)
    s2 = float((lam * lam).sum())
    return float(lam.sum()) ** 2 / s2 if s2 > 0 else float("nan")


def n_components_for_variance(eigvals, fraction: float) -> int:
    """Smallest number of leading components whose eigenvalues sum to >= ``fraction`` of the total."""
    if not 0 < fraction <= 1:
        raise LorascopeError(f"fraction = {fraction} must be in (0, 1]", fix="use e.g. 0.9 or 0.99")
    lam = torch.sort(as_tensor(eigvals, "eigvals", torch.float64).reshape(-1).clamp_min(0.0), descending=True)[0]
    total = float(lam.sum())
    if total <= 0:
        return 0
    frac = torch.cumsum(lam, 0) / total
    return int(torch.searchsorted(frac, torch.tensor([fraction * (1 - 1e-12)], dtype=torch.float64))[0]) + 1


def spectrum_rows(cov: StreamingCovariance, name: str = "delta", **where) -> list[ResultRow]:
    """Rows (family "effective_rank"): participation ratio and #components for 90% / 99% of the variance."""
    lam = cov.eigvals()
    common = dict(family="effective_rank", n=cov.n, d=int(cov.d or 0), dtype="float64", **where)
    return [
        ResultRow(metric=f"participation_ratio_{name}", value=participation_ratio(lam), **common),
        ResultRow(metric=f"n_components_90_{name}", value=float(n_components_for_variance(lam, 0.9)), **common),
        ResultRow(metric=f"n_components_99_{name}", value=float(n_components_for_variance(lam, 0.99)), **common),
    ]


def density_histogram(density, n_bins: int = 40, log10_min: float = -8.0) -> dict[str, np.ndarray | int]:
    """Histogram of per-latent density [F] on log10 bins from ``log10_min`` to 0.

    Returns ``counts`` [n_bins], ``edges`` [n_bins + 1] (log10 units) and ``dead`` (latents with density 0,
    counted separately since log10(0) = -inf). Densities below 10^log10_min land in the first bin.
    """
    dens = as_tensor(density, "density", torch.float64).reshape(-1).cpu().numpy()
    if ((dens < 0) | (dens > 1)).any():
        raise LorascopeError("densities must lie in [0, 1]", fix="pass fractions of tokens, not counts")
    alive = dens[dens > 0]
    edges = np.linspace(log10_min, 0.0, n_bins + 1)
    counts, _ = np.histogram(np.clip(np.log10(alive), log10_min, 0.0), bins=edges)
    return {"counts": counts, "edges": edges, "dead": int((dens == 0).sum())}


def _quantile_summary(v: torch.Tensor) -> dict[str, float]:
    q = (
        torch.quantile(v, torch.tensor([0.5, 0.9, 0.99], dtype=v.dtype))
        if v.numel() <= 2**24
        else torch.from_numpy(np.quantile(v.numpy(), [0.5, 0.9, 0.99]))
    )
    return {"mean": float(v.mean()), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


class TokenNorms(NamedTuple):
    """Per-token float64 norms: ‖Δ_t‖, ‖h_base,t‖ and their ratio ‖Δ_t‖/‖h_base,t‖ (base norm floored at 1e-30)."""

    delta: torch.Tensor
    base: torch.Tensor
    ratio: torch.Tensor


def token_norms(h_base: torch.Tensor, delta: torch.Tensor) -> TokenNorms:
    """The one computation of Δ norms (extraction statistics, DeltaNormStats and the study's analysis use it)."""
    dn = delta.double().norm(dim=1)
    bn = h_base.double().norm(dim=1)
    return TokenNorms(dn, bn, dn / bn.clamp_min(1e-30))


class DeltaNormStats:
    """Per-token ‖Δ_t‖ and ‖Δ_t‖/‖h_base,t‖, kept as N float64s each (quantiles need all values)."""

    def __init__(self) -> None:
        self._norms: list[torch.Tensor] = []
        self._ratios: list[torch.Tensor] = []
        self.d = 0

    def update(self, h_base, h_ft) -> None:
        hb, hf = paired_activations(h_base, h_ft)
        self.d = hb.shape[1]
        tn = token_norms(hb, hf - hb)
        self._norms.append(tn.delta.cpu())
        self._ratios.append(tn.ratio.cpu())

    def summary(self) -> dict[str, dict[str, float]]:
        if not self._norms:
            raise LorascopeError("no tokens seen", fix="call update() with at least one batch")
        return {
            "delta_norm": _quantile_summary(torch.cat(self._norms)),
            "relative_delta_norm": _quantile_summary(torch.cat(self._ratios)),
        }

    def rows(self, **where) -> list[ResultRow]:
        """Rows (family "delta_norm"): mean, median, p90, p99 of ‖Δ‖ (``delta_norm_*``) and ‖Δ‖/‖h_base‖
        (``rel_delta_norm_*``)."""
        n = sum(int(t.numel()) for t in self._norms)
        summary = self.summary()
        named = [(schema.delta_norm, summary["delta_norm"]), (schema.rel_delta_norm, summary["relative_delta_norm"])]
        return [
            ResultRow(family=schema.DELTA_NORM, metric=name(stat), value=v, n=n, d=self.d, dtype="float64", **where)
            for name, stats in named
            for stat, v in stats.items()
        ]


def mean_active_features(codes) -> float:
    """Mean number of active latents per token (L0), from metrics.l0."""
    return l0(codes)


__all__ = [
    "DeltaNormStats",
    "StreamingCovariance",
    "density_histogram",
    "feature_density",
    "mean_active_features",
    "n_components_for_variance",
    "participation_ratio",
    "spectrum_rows",
]

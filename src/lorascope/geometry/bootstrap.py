"""Percentile bootstrap intervals over tokens (or any resampling unit), seeded and deterministic on CPU.

- :func:`bootstrap_ci`: a statistic of per-token values (default the mean; the mean has a vectorised path).
- :func:`bootstrap_ratio_ci`: ratio of sums Σ num / Σ den (per-token numerators and denominators).
- :func:`bootstrap_fvu_ci`: FVU = Σ err / Σ ‖x - μ*‖² where μ* is the *resample's* mean, so the denominator is
  recomputed per resample as Σ w·sq - ‖Σ w·xsum‖² / Σ w·count (w = resample counts). Units may be tokens
  (xsum = x_t, count = 1) or groups such as batches or prompts (their sums), which gives a block bootstrap.
Cost of the FVU interval: O(n_boot · U · d) (one [chunk, U] x [U, d] product per chunk of resamples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor

_CHUNK_ELEMS = 2**23


class CI(NamedTuple):
    """Point estimate on the full data and a percentile interval [low, high]."""

    value: float
    low: float
    high: float


def _check(n_boot: int, alpha: float, n: int) -> None:
    if n_boot < 1:
        raise LorascopeError(f"n_boot = {n_boot} must be >= 1", fix="use e.g. n_boot=1000")
    if not 0 < alpha < 1:
        raise LorascopeError(f"alpha = {alpha} must be in (0, 1)", fix="use alpha=0.05 for a 95% interval")
    if n < 2:
        raise LorascopeError(f"bootstrap needs at least 2 units, got {n}", fix="pass more tokens")


def _counts(n: int, b: int, gen: torch.Generator) -> torch.Tensor:
    """[b, n] float64 resample counts (each row sums to n)."""
    idx = torch.randint(0, n, (b, n), generator=gen)
    w = torch.zeros(b, n, dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones(b, n, dtype=torch.float64))
    return w


def _percentiles(samples: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    out = torch.quantile(samples, q, dim=0)
    return out[0], out[1]


def _resampled(n: int, n_boot: int, seed: int, width: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Concatenate fn(w) over chunks of resample-count matrices w [b, n]."""
    gen = torch.Generator().manual_seed(seed)
    b = max(1, _CHUNK_ELEMS // max(n * max(width, 1), 1))
    parts = []
    for start in range(0, n_boot, b):
        parts.append(fn(_counts(n, min(b, n_boot - start), gen)))
    return torch.cat(parts)


def bootstrap_ci(
    values, stat: Callable | None = None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> CI:
    """Percentile interval of ``stat`` (default: mean) over resamples of the per-token ``values`` [N]."""
    v = as_tensor(values, "values", torch.float64).reshape(-1).cpu()
    _check(n_boot, alpha, v.numel())
    n = v.numel()
    if stat is None:
        samples = _resampled(n, n_boot, seed, 1, lambda w: (w @ v) / n)
        point = float(v.mean())
    else:
        gen = torch.Generator().manual_seed(seed)
        samples = torch.tensor(
            [float(stat(v[torch.randint(0, n, (n,), generator=gen)])) for _ in range(n_boot)],
            dtype=torch.float64,
        )
        point = float(stat(v))
    lo, hi = _percentiles(samples, alpha)
    return CI(point, float(lo), float(hi))


def bootstrap_ratio_ci(num, den, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> CI:
    """Interval for Σ num / Σ den, resampling units (tokens) jointly: num [N], den [N]."""
    a = as_tensor(num, "num", torch.float64).reshape(-1).cpu()
    b = as_tensor(den, "den", torch.float64).reshape(-1).cpu()
    if a.shape != b.shape:
        raise LorascopeError(
            f"num has {a.numel()} entries but den has {b.numel()}", fix="pass one pair per token"
        )
    _check(n_boot, alpha, a.numel())
    samples = _resampled(a.numel(), n_boot, seed, 2, lambda w: (w @ a) / (w @ b))
    lo, hi = _percentiles(samples, alpha)
    return CI(float(a.sum() / b.sum()), float(lo), float(hi))


def bootstrap_fvu_ci(
    err, sq, xsum, count=None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> list[CI]:
    """FVU intervals for one or several reconstructions of the same data, resampling units jointly.

    err [U] or [U, m]: per-unit Σ‖x - x̂‖² (m reconstructions); sq [U]: per-unit Σ‖x‖²; xsum [U, d]: per-unit
    Σ x; count [U]: tokens per unit (default 1 = token-level units). Returns one :class:`CI` per column of
    err.
    """
    e = as_tensor(err, "err", torch.float64).cpu()
    e = e[:, None] if e.ndim == 1 else e
    s = as_tensor(sq, "sq", torch.float64).reshape(-1).cpu()
    xs = as_tensor(xsum, "xsum", torch.float64, ndim=2).cpu()
    u = e.shape[0]
    c = (
        torch.ones(u, dtype=torch.float64)
        if count is None
        else as_tensor(count, "count", torch.float64).reshape(-1)
    )
    if not (s.numel() == xs.shape[0] == c.numel() == u):
        raise LorascopeError(
            "err, sq, xsum and count must have one entry per unit", fix="pass per-unit arrays of equal length"
        )
    _check(n_boot, alpha, u)

    def fvu_of(w: torch.Tensor) -> torch.Tensor:
        mean_sum = w @ xs  # [b, d]
        den = w @ s - (mean_sum * mean_sum).sum(1) / (w @ c)
        return (w @ e) / den[:, None]

    samples = _resampled(u, n_boot, seed, xs.shape[1] + e.shape[1], fvu_of)
    point = fvu_of(torch.ones(1, u, dtype=torch.float64))[0]
    lo, hi = _percentiles(samples, alpha)
    return [CI(float(point[j]), float(lo[j]), float(hi[j])) for j in range(e.shape[1])]


__all__ = ["CI", "bootstrap_ci", "bootstrap_fvu_ci", "bootstrap_ratio_ci"]

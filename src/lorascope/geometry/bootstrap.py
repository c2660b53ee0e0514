"""Percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13), seeded and deterministic on CPU.

Resampling unit. Tokens of one document are strongly correlated, so a token bootstrap treats ~70 dependent
tokens as 70 independent draws and gives intervals several times too narrow. Every token-derived statistic
must resample *documents* (the cluster / block bootstrap of Efron & Tibshirani §8.5 and Davison & Hinkley 1997
§3.8): :func:`document_bootstrap_mean_ci`, :func:`document_bootstrap_ratio_ci`,
:func:`document_bootstrap_fvu_ci` take a document id per token and return :class:`UnitCI`, which carries its
``ci_unit`` ("document"; "seed" or "atom" for :func:`unit_bootstrap_ci` over independent units). Ratio
statistics are recomputed from the resample's numerator and denominator (FVU also from the resample's mean).

Token-level helpers (kept for statistics whose units really are independent):

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

import numpy as np
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


def bootstrap_ci(values, stat: Callable | None = None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> CI:
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
        raise LorascopeError(f"num has {a.numel()} entries but den has {b.numel()}", fix="pass one pair per token")
    _check(n_boot, alpha, a.numel())
    samples = _resampled(a.numel(), n_boot, seed, 2, lambda w: (w @ a) / (w @ b))
    lo, hi = _percentiles(samples, alpha)
    return CI(float(a.sum() / b.sum()), float(lo), float(hi))


def fvu_unit_samples(
    e: torch.Tensor, s: torch.Tensor, xs: torch.Tensor, c: torch.Tensor, n_boot: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(point [m], samples [n_boot, m]) of FVU from per-unit sums: e [U, m] errors, s [U] Σ‖x‖², xs [U, d] Σx,
    c [U] token counts. Each resample recomputes numerator, denominator and the mean from its units."""

    def fvu_of(w: torch.Tensor) -> torch.Tensor:
        mean_sum = w @ xs  # [b, d]
        den = w @ s - (mean_sum * mean_sum).sum(1) / (w @ c)
        return (w @ e) / den[:, None]

    point = fvu_of(torch.ones(1, e.shape[0], dtype=torch.float64))[0]
    if n_boot < 1:
        return point, point[None]
    return point, _resampled(e.shape[0], n_boot, seed, xs.shape[1] + e.shape[1], fvu_of)


def bootstrap_fvu_ci(err, sq, xsum, count=None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> list[CI]:
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
    c = torch.ones(u, dtype=torch.float64) if count is None else as_tensor(count, "count", torch.float64).reshape(-1)
    if not (s.numel() == xs.shape[0] == c.numel() == u):
        raise LorascopeError(
            "err, sq, xsum and count must have one entry per unit", fix="pass per-unit arrays of equal length"
        )
    _check(n_boot, alpha, u)

    point, samples = fvu_unit_samples(e, s, xs, c, n_boot, seed)
    lo, hi = _percentiles(samples, alpha)
    return [CI(float(point[j]), float(lo[j]), float(hi[j])) for j in range(e.shape[1])]


__all__ = ["CI", "bootstrap_ci", "bootstrap_fvu_ci", "bootstrap_ratio_ci"]


# --------------------------------------------------------------------------------------------------------------
# Document-level (cluster) bootstrap
# --------------------------------------------------------------------------------------------------------------

CI_UNITS = ("document", "seed", "atom", "token")


class UnitCI(NamedTuple):
    """Point estimate, percentile interval [low, high], what was resampled (``ci_unit``) and how many units."""

    value: float
    low: float
    high: float
    ci_unit: str
    n_units: int


def document_index(doc_ids) -> tuple[torch.Tensor, int]:
    """Dense document index [N] (int64 in 0..U-1, ids in sorted order) and the number of documents U.

    ``doc_ids``: one id per token (ints, strings or a tensor of ids, e.g. the store's ``doc_index``).
    """
    if isinstance(doc_ids, torch.Tensor):
        _, inv = torch.unique(doc_ids.reshape(-1).cpu(), return_inverse=True)
    else:
        _, inv_np = np.unique(np.asarray(doc_ids).reshape(-1), return_inverse=True)
        inv = torch.from_numpy(inv_np.reshape(-1).astype(np.int64))
    return inv, int(inv.max()) + 1 if inv.numel() else 0


def document_sums(values, doc_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document sums [U, ...] (float64) of per-token ``values`` [N, ...] and token counts [U]."""
    v = as_tensor(values, "values", torch.float64).cpu()
    inv, u = document_index(doc_ids)
    if inv.numel() != v.shape[0]:
        raise LorascopeError(
            f"values have {v.shape[0]} tokens but doc_ids has {inv.numel()} entries",
            fix="pass one document id per token (e.g. the store's doc_index)",
        )
    sums = torch.zeros(u, *v.shape[1:], dtype=torch.float64).index_add_(0, inv, v)
    counts = torch.zeros(u, dtype=torch.float64).index_add_(0, inv, torch.ones(inv.numel(), dtype=torch.float64))
    return sums, counts


def resample_counts(n_units: int, n_boot: int, seed: int = 0) -> torch.Tensor:
    """[n_boot, n_units] float64 multinomial resample counts (each row sums to n_units), seeded."""
    return _counts(n_units, n_boot, torch.Generator().manual_seed(seed))


def _unit_ci(point: float, samples: torch.Tensor, alpha: float, unit: str, n: int) -> UnitCI:
    lo, hi = _percentiles(samples, alpha)
    return UnitCI(float(point), float(lo), float(hi), unit, n)


def document_bootstrap_ratio_ci(num, den, doc_ids, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> UnitCI:
    """Σ num / Σ den over tokens, resampling documents: num, den [N] per token, doc_ids [N].

    Each resample draws U documents with replacement and recomputes both sums from the drawn documents.
    """
    a_tok = as_tensor(num, "num", torch.float64).reshape(-1)
    b_tok = as_tensor(den, "den", torch.float64).reshape(-1)
    if a_tok.shape != b_tok.shape:
        raise LorascopeError(
            f"num has {a_tok.numel()} entries but den has {b_tok.numel()}",
            fix="pass one numerator and one denominator per token",
        )
    sums, _ = document_sums(torch.stack([a_tok, b_tok], 1), doc_ids)
    a, b = sums[:, 0].contiguous(), sums[:, 1].contiguous()
    _check(n_boot, alpha, a.shape[0])
    samples = _resampled(a.shape[0], n_boot, seed, 2, lambda w: (w @ a) / (w @ b))
    return _unit_ci(float(a.sum() / b.sum()), samples, alpha, "document", a.shape[0])


def document_bootstrap_mean_ci(values, doc_ids, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> UnitCI:
    """Token-weighted mean of ``values`` [N] (Σ v / N), resampling documents (each resample's N varies)."""
    v = as_tensor(values, "values", torch.float64).reshape(-1).cpu()
    return document_bootstrap_ratio_ci(v, torch.ones_like(v), doc_ids, n_boot, alpha, seed)


def fvu_bootstrap_samples(err, x, doc_ids, n_boot: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(point [m], samples [n_boot, m], U) of FVU for m reconstructions of x, resampling documents.

    err [N] or [N, m]: per-token ‖x_t − x̂_t‖²; x [N, d] the reconstructed data (Δ); doc_ids [N]. FVU of a
    resample = Σ w·err / (Σ w·‖x‖² − ‖Σ w·x‖² / Σ w·count): numerator, denominator and the mean μ all come from
    the resampled documents. The same resamples serve every column, so column differences are paired.
    """
    e = as_tensor(err, "err", torch.float64).cpu()
    e = e[:, None] if e.ndim == 1 else e
    X = as_tensor(x, "x", torch.float64, ndim=2).cpu()
    if e.shape[0] != X.shape[0]:
        raise LorascopeError(f"err has {e.shape[0]} tokens but x has {X.shape[0]}", fix="pass one err per token")
    es, count = document_sums(e, doc_ids)
    xs, _ = document_sums(X, doc_ids)
    sq, _ = document_sums((X * X).sum(1), doc_ids)
    _check(max(n_boot, 1), 0.05, es.shape[0])
    point, samples = fvu_unit_samples(es, sq, xs, count, n_boot, seed)
    u = es.shape[0]
    return point, samples, u


def document_bootstrap_fvu_ci(err, x, doc_ids, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> list[UnitCI]:
    """One document-bootstrap :class:`UnitCI` per column of ``err`` (see :func:`fvu_bootstrap_samples`)."""
    _check(n_boot, alpha, 2)
    point, samples, u = fvu_bootstrap_samples(err, x, doc_ids, n_boot, seed)
    return [_unit_ci(float(point[j]), samples[:, j], alpha, "document", u) for j in range(point.numel())]


def unit_bootstrap_ci(values, ci_unit: str, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> UnitCI:
    """Mean of independent units (``ci_unit`` "seed": one value per SAE seed; "atom": one per atom), resampled.

    Atoms of one SAE are not independent draws of anything a reader cares about; an "atom" interval describes
    the spread over atoms of *this* dictionary, and the label says so. With < 2 units the interval is NaN.
    """
    if ci_unit not in CI_UNITS:
        raise LorascopeError(f"unknown ci_unit {ci_unit!r}", fix=f"use one of {CI_UNITS}")
    v = as_tensor(values, "values", torch.float64).reshape(-1).cpu()
    if v.numel() < 2:
        point = float(v.mean()) if v.numel() else float("nan")
        return UnitCI(point, float("nan"), float("nan"), ci_unit, v.numel())
    _check(n_boot, alpha, v.numel())
    samples = _resampled(v.numel(), n_boot, seed, 1, lambda w: (w @ v) / v.numel())
    return _unit_ci(float(v.mean()), samples, alpha, ci_unit, v.numel())


__all__ += [
    "CI_UNITS",
    "UnitCI",
    "document_bootstrap_fvu_ci",
    "document_bootstrap_mean_ci",
    "document_bootstrap_ratio_ci",
    "document_index",
    "document_sums",
    "fvu_bootstrap_samples",
    "fvu_unit_samples",
    "resample_counts",
    "unit_bootstrap_ci",
]

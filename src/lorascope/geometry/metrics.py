"""Reconstruction and sparsity metrics: one implementation, used by the trainer, geometry and reports.

FVU (fraction of variance unexplained) = sum_tokens ||x - x_hat||^2 / sum_tokens ||x - mu||^2, with mu the
per-dimension mean over the *whole evaluation set* (not per batch, so the number does not depend on batching).
Predicting mu for every token gives exactly 1, a perfect reconstruction 0. :class:`ReconstructionStats` streams
over batches in float64 and gives the same number as :func:`fvu` on the concatenated data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorascope.geometry._array import as_tensor, same_dim


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained of ``x_hat`` [N, d] for ``x`` [N, d], dataset-level mean."""
    s = ReconstructionStats()
    s.update(x, x_hat)
    return s.fvu


def mse(x, x_hat) -> float:
    """Mean over tokens and dimensions of (x - x_hat)^2."""
    s = ReconstructionStats()
    s.update(x, x_hat)
    return s.mse


def cosine_similarity_rows(x, x_hat, eps: float = 1e-12) -> torch.Tensor:
    """Per-row cosine between ``x`` and ``x_hat`` [N] (float64)."""
    x = as_tensor(x, "x", torch.float64, ndim=2)
    x_hat = as_tensor(x_hat, "x_hat", torch.float64, ndim=2)
    same_dim(x, x_hat, "x", "x_hat")
    return (x * x_hat).sum(1) / (x.norm(dim=1) * x_hat.norm(dim=1)).clamp_min(eps)


def l0(codes) -> float:
    """Mean number of non-zero latents per token."""
    c = as_tensor(codes, "codes", ndim=2, check_finite=False)
    return float((c != 0).sum(1, dtype=torch.float64).mean()) if c.shape[0] else float("nan")


def feature_density(codes) -> torch.Tensor:
    """Fraction of tokens on which each latent is active [d_sae] (float64)."""
    c = as_tensor(codes, "codes", ndim=2, check_finite=False)
    return (c != 0).sum(0, dtype=torch.float64) / max(c.shape[0], 1)


@dataclass
class ReconstructionStats:
    """Streaming accumulator for FVU, MSE, mean cosine, L0, per-latent density over many batches.

    Sums are float64. Variance about the dataset mean uses sum||x||^2 - n||mean||^2, which for activation-scale
    data in float64 agrees with the two-pass formula to ~1e-12 relative.
    """

    n: int = 0
    d: int = 0
    sum_sq_err: float = 0.0
    sum_sq_x: float = 0.0
    sum_cos: float = 0.0
    sum_l0: float = 0.0
    n_codes: int = 0
    sum_x: torch.Tensor | None = None
    active_counts: torch.Tensor | None = field(default=None, repr=False)

    def update(self, x, x_hat, codes=None) -> None:
        x = as_tensor(x, "x", torch.float64, ndim=2)
        x_hat = as_tensor(x_hat, "x_hat", torch.float64, ndim=2)
        same_dim(x, x_hat, "x", "x_hat")
        if x.shape[0] != x_hat.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but x_hat has {x_hat.shape[0]}")
        if self.sum_x is None:
            self.d = x.shape[1]
            self.sum_x = torch.zeros(self.d, dtype=torch.float64, device=x.device)
        self.n += x.shape[0]
        self.sum_sq_err += float(((x - x_hat) ** 2).sum())
        self.sum_sq_x += float((x * x).sum())
        self.sum_x += x.sum(0)
        self.sum_cos += float(cosine_similarity_rows(x, x_hat).sum())
        if codes is not None:
            c = as_tensor(codes, "codes", ndim=2, check_finite=False)
            active = c != 0
            self.sum_l0 += float(active.sum(dtype=torch.float64))
            self.n_codes += c.shape[0]
            counts = active.sum(0, dtype=torch.float64)
            self.active_counts = counts if self.active_counts is None else self.active_counts + counts

    @property
    def total_variance(self) -> float:
        """sum_tokens ||x - mu||^2 with mu the mean over everything seen."""
        if self.n == 0:
            return float("nan")
        mean = self.sum_x / self.n
        return self.sum_sq_x - self.n * float((mean * mean).sum())

    @property
    def fvu(self) -> float:
        tv = self.total_variance
        return self.sum_sq_err / tv if tv > 0 else float("nan")

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    @property
    def mse(self) -> float:
        return self.sum_sq_err / (self.n * self.d) if self.n else float("nan")

    @property
    def cosine(self) -> float:
        return self.sum_cos / self.n if self.n else float("nan")

    @property
    def l0(self) -> float:
        return self.sum_l0 / self.n_codes if self.n_codes else float("nan")

    @property
    def density(self) -> torch.Tensor | None:
        return None if self.active_counts is None else self.active_counts / self.n_codes

    @property
    def dead_count(self) -> int:
        return 0 if self.active_counts is None else int((self.active_counts == 0).sum())

    def as_dict(self) -> dict[str, float]:
        return {
            "fvu": self.fvu,
            "explained_variance": self.explained_variance,
            "mse": self.mse,
            "cosine": self.cosine,
            "l0": self.l0,
            "dead": float(self.dead_count),
            "n_tokens": float(self.n),
        }

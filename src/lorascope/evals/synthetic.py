"""Planted-feature data with exact ground truth: sparse sums of features that are *subspaces*, not directions.

Model (everything drawn from ``seed``; float32 output, float64 internally):
- Feature i (of ``n_features``) is a random subspace of R^d with intrinsic dimension
  d_i = ``dims[i % len(dims)]`` (so the mixture of dimensions is deterministic and balanced). Its basis
  B_i [d_i, d] has orthonormal rows (QR of a Gaussian matrix); different features are independent random
  subspaces (not mutually orthogonal).
- Each sample activates exactly ``active`` distinct features, drawn without replacement with probabilities
  ``frequency = "uniform"`` (all equal) or ``"zipf"`` (p_i ∝ (i + 1)^-zipf_exponent, feature 0 most frequent).
- An active feature's coordinates c ∈ R^{d_i} are  u · m  with u uniform on the unit sphere S^{d_i−1} (a
  normalised Gaussian; for d_i = 1 a random sign) and magnitude m = |N(0, 1)| + ``magnitude_offset``.
- x = Σ_{active i} c_i B_i + ``noise`` · N(0, I_d)  (isotropic Gaussian noise, per-coordinate std ``noise``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lorascope.errors import LorascopeError


@dataclass(frozen=True)
class PlantedConfig:
    d: int = 128
    n_features: int = 64
    dims: tuple[int, ...] = (1, 2, 3, 4)
    active: int = 4
    frequency: str = "uniform"
    zipf_exponent: float = 1.0
    magnitude_offset: float = 0.5
    noise: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.d < 1 or self.n_features < 1 or not self.dims:
            raise LorascopeError(
                "planted data needs d ≥ 1, n_features ≥ 1 and a non-empty dims list",
                fix="e.g. PlantedConfig(d=128, n_features=64, dims=(1, 2, 3, 4))",
            )
        if min(self.dims) < 1 or max(self.dims) > self.d:
            raise LorascopeError(f"feature dims {self.dims} must lie in 1..d={self.d}", fix="lower the dims")
        if not 1 <= self.active <= self.n_features:
            raise LorascopeError(
                f"active={self.active} features per sample must lie in 1..{self.n_features}",
                fix="lower active or add features",
            )
        if self.frequency not in ("uniform", "zipf"):
            raise LorascopeError(f"unknown frequency {self.frequency!r}", fix="use 'uniform' or 'zipf'")
        if self.noise < 0:
            raise LorascopeError(f"noise must be ≥ 0 (got {self.noise})", fix="pass a non-negative std")


@dataclass
class PlantedBatch:
    """Samples with their exact ground truth.

    x [N, d] float32; active [N, s] long (feature ids, sorted per row); coords [N, s, d_max] float32 with
    coords[n, j, :d_i] the coordinates of feature active[n, j] (zero padding beyond d_i); noise [N, d].
    """

    x: torch.Tensor
    active: torch.Tensor
    coords: torch.Tensor
    noise: torch.Tensor

    def presence(self, n_features: int) -> torch.Tensor:
        """bool [N, n_features]: which features are active in each sample."""
        out = torch.zeros(self.x.shape[0], n_features, dtype=torch.bool)
        return out.scatter_(1, self.active, True)


class PlantedFeatures:
    """The feature dictionary of a :class:`PlantedConfig`; draws batches deterministically."""

    def __init__(self, cfg: PlantedConfig):
        cfg.validate()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.dims = torch.tensor([cfg.dims[i % len(cfg.dims)] for i in range(cfg.n_features)])
        self.bases: list[torch.Tensor] = []  # [d_i, d] orthonormal rows, float64
        for di in self.dims.tolist():
            q, _ = torch.linalg.qr(torch.randn(cfg.d, di, generator=g, dtype=torch.float64))
            self.bases.append(q.T.contiguous())
        if cfg.frequency == "zipf":
            p = (torch.arange(cfg.n_features, dtype=torch.float64) + 1) ** -cfg.zipf_exponent
        else:
            p = torch.ones(cfg.n_features, dtype=torch.float64)
        self.probs = p / p.sum()
        d_max = int(self.dims.max())
        # padded stack of bases [F, d_max, d] (zero rows beyond d_i): one einsum builds x
        self._stack = torch.zeros(cfg.n_features, d_max, cfg.d, dtype=torch.float64)
        for i, b in enumerate(self.bases):
            self._stack[i, : b.shape[0]] = b

    @property
    def d_max(self) -> int:
        return int(self.dims.max())

    def sample(self, n: int, seed: int) -> PlantedBatch:
        """``n`` samples drawn with ``torch.Generator().manual_seed(seed)`` (independent of cfg.seed)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(int(seed))
        active = torch.multinomial(self.probs.expand(n, -1), cfg.active, replacement=False, generator=g)
        active = active.sort(dim=1).values
        dims = self.dims[active]  # [n, s]
        mask = torch.arange(self.d_max) < dims[..., None]  # [n, s, d_max]
        u = torch.randn(n, cfg.active, self.d_max, generator=g, dtype=torch.float64) * mask
        u = u / u.norm(dim=-1, keepdim=True)
        m = torch.randn(n, cfg.active, 1, generator=g, dtype=torch.float64).abs() + cfg.magnitude_offset
        coords = u * m
        x = torch.einsum("nsk,nskd->nd", coords, self._stack[active])
        noise = torch.randn(n, cfg.d, generator=g, dtype=torch.float64) * cfg.noise
        return PlantedBatch((x + noise).float(), active, coords.float(), noise.float())

    def batches(self, batch_size: int, n_batches: int | None = None, seed: int = 1) -> Iterator[torch.Tensor]:
        """Iterator of x [batch_size, d] float32 for a trainer; batch b uses seed ``seed·1_000_003 + b``.
        Infinite when ``n_batches`` is None."""
        b = 0
        while n_batches is None or b < n_batches:
            yield self.sample(batch_size, seed * 1_000_003 + b).x
            b += 1

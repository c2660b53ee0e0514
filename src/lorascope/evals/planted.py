"""How well an SAE recovers planted subspace features (ground truth from :mod:`lorascope.evals.synthetic`).

A *unit* is what the SAE uses as one feature: a SASA group (``unit_size`` = rank consecutive latents) or a
single latent of a standard SAE (``unit_size`` = 1). Unit u's contribution to sample n is
c_{n,u} = codes[n, u] W_u (no b_dec). Everything below derives from the **mass matrix**

    M[i, u] = max(0, Σ_{n : feature i active in n} ⟨c_{n,u}, s_{n,i}⟩)      [n_features, n_units]

with s_{n,i} = coords_{n,i} B_i feature i's true signal in sample n: how much of feature i's signal unit u
reconstructs (Σ_u of the unclipped sum is ⟨x̂ − b_dec, s_i⟩ ≈ ‖s_i‖² for a good SAE). Being signed, the chance
overlap of a unit that carries another co-active feature averages out (an unsigned energy inside B_i does
not: a random d_j-dim subspace puts d_i·d_j/d of its energy there, 17% at d = 24).

Per true feature i (with total mass T_i = Σ_u M[i, u]; features with T_i = 0 get split 0, recovery 0):
- ``best_unit``  = argmax_u M[i, u]; each unit's ``unit_feature`` = argmax_i M[i, u].
- ``split``      = smallest number of units whose largest masses sum to ≥ ``cover`` (default 0.9) of T_i — the
  number of units needed to carry 90% of the feature's reconstruction mass (1 = not split).
- ``leakage``    = Σ_{u : unit_feature(u) ≠ i} M[i, u] / T_i — share carried by units that belong to
  another feature (absorption-style).
- ``merged``     = another feature has the same best unit.
- ``recovery_best`` / ``recovery_cover`` = Σ_k cos² θ_k / d_i, θ the principal angles
  (scipy.linalg.subspace_angles) between span(B_i) and the span of the decoder rows of the best unit / of the
  units in the 90% cover. For a span of dimension ≥ d_i this is the mean cos² of the d_i angles; it is 1
  when the span *contains* the true subspace (extra directions are not penalised) and k/d on average for a
  random k-dim span (REFERENCE null).
- ``rank_data``  = number of singular values > ``rel_threshold``·σ_max of the best unit's outputs
  {c_{n,u*}} on the samples where i fires (the rank the unit actually uses for i); ``rank_decoder`` = the
  same count on the best unit's decoder block. Compare either with d_i (``rank_exact`` = rank_data == d_i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import subspace_angles

from lorascope.errors import LorascopeError
from lorascope.evals.synthetic import PlantedBatch, PlantedFeatures


def unit_feature_mass(
    codes: torch.Tensor, W_dec: torch.Tensor, unit_size: int, features: PlantedFeatures, batch: PlantedBatch
) -> torch.Tensor:
    """Mass matrix M [n_features, n_units] (float64) defined in the module docstring."""
    n, d_sae = codes.shape
    if d_sae % unit_size or W_dec.shape != (d_sae, features.cfg.d) or n != batch.x.shape[0]:
        raise LorascopeError(
            f"codes {tuple(codes.shape)}, W_dec {tuple(W_dec.shape)} and unit_size "
            f"{unit_size} do not fit {n} planted samples of dimension {features.cfg.d}",
            fix="pass sae.encode(batch.x), sae.W_dec and the group size (1: standard SAE)",
        )
    u = d_sae // unit_size
    c = codes.detach().double().view(n, u, unit_size)
    w = W_dec.detach().double().view(u, unit_size, -1)
    pres = batch.presence(features.cfg.n_features)
    mass = torch.zeros(features.cfg.n_features, u, dtype=torch.float64)
    for i, b in enumerate(features.bases):
        rows = pres[:, i]
        if rows.any():
            j = (batch.active[rows] == i).int().argmax(1)  # slot of feature i among the active ones
            coords = batch.coords[rows].double()[torch.arange(int(rows.sum())), j, : b.shape[0]]  # [n_i, d_i]
            mass[i] = torch.einsum("nur,urk,nk->u", c[rows], w @ b.T, coords)
    return mass.clamp_min(0)


def _span_recovery(rows: torch.Tensor, basis: torch.Tensor) -> float:
    """Σ cos² of principal angles between span(rows [k, d]) and span(basis [d_i, d]), divided by d_i."""
    if rows.shape[0] == 0 or float(rows.abs().max()) == 0:
        return 0.0
    theta = subspace_angles(rows.double().T.numpy(), basis.double().T.numpy())
    return float(np.sum(np.cos(theta) ** 2) / basis.shape[0])


def _rank(m: torch.Tensor, rel_threshold: float) -> int:
    if m.numel() == 0:
        return 0
    sv = torch.linalg.svdvals(m)
    return int((sv > rel_threshold * sv[0]).sum()) if float(sv[0]) > 0 else 0


@dataclass
class PlantedReport:
    """Per-feature results (tensors [n_features]) and each unit's feature [n_units]; see module doc."""

    dims: torch.Tensor
    split: torch.Tensor
    leakage: torch.Tensor
    merged: torch.Tensor
    recovery_best: torch.Tensor
    recovery_cover: torch.Tensor
    rank_data: torch.Tensor
    rank_decoder: torch.Tensor
    best_unit: torch.Tensor
    unit_feature: torch.Tensor
    mass: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Means over features, and split / recovery by intrinsic dimension (``split_d2`` …)."""
        out = {
            "split": float(self.split.double().mean()),
            "leakage": float(self.leakage.mean()),
            "merged_fraction": float(self.merged.double().mean()),
            "recovery_best": float(self.recovery_best.mean()),
            "recovery_cover": float(self.recovery_cover.mean()),
            "rank_exact": float((self.rank_data == self.dims).double().mean()),
            "rank_abs_error": float((self.rank_data - self.dims).abs().double().mean()),
            "rank_decoder_abs_error": float((self.rank_decoder - self.dims).abs().double().mean()),
        }
        for k in sorted(set(self.dims.tolist())):
            sel = self.dims == k
            out[f"split_d{k}"] = float(self.split[sel].double().mean())
            out[f"recovery_best_d{k}"] = float(self.recovery_best[sel].mean())
            out[f"recovery_cover_d{k}"] = float(self.recovery_cover[sel].mean())
        return out


@torch.no_grad()
def planted_report(
    codes: torch.Tensor,
    W_dec: torch.Tensor,
    unit_size: int,
    features: PlantedFeatures,
    batch: PlantedBatch,
    cover: float = 0.9,
    rel_threshold: float = 0.1,
) -> PlantedReport:
    """Score codes [N, d_sae] (``sae.encode(batch.x)``) and W_dec [d_sae, d] against the planted truth."""
    mass = unit_feature_mass(codes, W_dec, unit_size, features, batch)
    n_feat, n_units = mass.shape
    w = W_dec.detach().double().view(n_units, unit_size, -1)
    c = codes.detach().double().view(codes.shape[0], n_units, unit_size)
    pres = batch.presence(n_feat)
    total = mass.sum(1)
    best_unit = mass.argmax(1)
    unit_feature = mass.argmax(0)
    split = torch.zeros(n_feat, dtype=torch.long)
    leakage = torch.zeros(n_feat, dtype=torch.float64)
    rec_best = torch.zeros(n_feat, dtype=torch.float64)
    rec_cover = torch.zeros(n_feat, dtype=torch.float64)
    rank_data = torch.zeros(n_feat, dtype=torch.long)
    rank_dec = torch.zeros(n_feat, dtype=torch.long)
    for i in range(n_feat):
        if float(total[i]) <= 0:
            continue
        vals, order = mass[i].sort(descending=True)
        k = int((vals.cumsum(0) < cover * total[i]).sum()) + 1
        split[i] = min(k, n_units)
        foreign = unit_feature != i
        leakage[i] = mass[i, foreign].sum() / total[i]
        b = features.bases[i]
        u = int(best_unit[i])
        rec_best[i] = _span_recovery(w[u], b)
        rec_cover[i] = _span_recovery(w[order[: split[i]]].reshape(-1, w.shape[-1]), b)
        rank_data[i] = _rank(c[pres[:, i], u] @ w[u], rel_threshold)
        rank_dec[i] = _rank(w[u], rel_threshold)
    counts = torch.bincount(best_unit, minlength=n_units)
    merged = (counts[best_unit] > 1) & (total > 0)
    return PlantedReport(
        features.dims.clone(),
        split,
        leakage,
        merged,
        rec_best,
        rec_cover,
        rank_data,
        rank_dec,
        best_unit,
        unit_feature,
        mass,
    )


def sae_planted_report(
    sae: torch.nn.Module, features: PlantedFeatures, batch: PlantedBatch, **kwargs: float
) -> PlantedReport:
    """:func:`planted_report` for an SAE: unit_size = ``sae.rank`` for SASA (groups), 1 otherwise."""
    unit = int(getattr(sae, "rank", 1)) if getattr(sae, "architecture", "") == "sasa" else 1
    with torch.no_grad():
        codes = sae.encode(batch.x)
    return planted_report(codes, sae.W_dec, unit, features, batch, **kwargs)

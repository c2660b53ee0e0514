"""SASA: subspace-aware sparse autoencoder (arXiv 2606.06333; no public code: written from the paper).

Latents come in ``groups`` blocks of ``rank`` consecutive latents (d_sae = groups · rank; latent j belongs
to group j // rank). Group g's decoder rows W_dec[g·r : g·r + r] span its subspace; its codes are the
*signed, linear* encoder coordinates of that block. Per token only the ``s`` groups with the largest score
are kept (block sparsity, s·r active latents); the rest are zeroed.

- Group score (``score``): ``"coords"`` (default) = L2 norm of the group's encoder coordinates
  pre[n, g, :]; ``"output"`` = L2 norm of the group's decoder output ‖c W_g‖ (via the r×r Gram W_g W_gᵀ).
  shared/REFERENCE.md: output scoring recovered a little more but was 3.3× slower in the probe there.
- Decoder rows are kept unit-norm (base ``post_step``); REFERENCE found this better than orthonormal blocks.
- Nuclear-norm penalty λ Σ_g ‖·‖_* per group (``nuclear_coefficient`` λ, default 1e-4, times the trainer's
  sparsity warmup; 1e-3 on the map raised merging to 80% at d=128 with 96 groups, benchmarks/sasa.py).
  ``nuclear_target="decoder"``: the [r, d_in] decoder block W_g (the paper's form). With
  unit rows ‖W_g‖_F = √r is fixed, so it can only reward aligning rows, and an orthonormal block (≈ a
  random init) is its *maximum* on that sphere: its gradient there is parallel to the rows and removed, and
  it barely moves in practice (measured: λ = 1e-3 left the entropy rank of rank-4 groups on 1-2-D features
  at 3.94 vs 3.97). ``nuclear_target="map"`` (default): the group's encode-decode map W_enc,g W_dec,g
  [d, d] (rank ≤ r), invariant to the code/decoder scale, so the penalty is a plain shrinkage of its
  singular values (entropy rank 3.86 → 3.25 at λ = 1e-3 with better FVU, same setting). Its singular values
  come from the r×r product of the two blocks' QR R-factors (exact, cheap). For ``"decoder"``,
  ``nuclear_form``: ``"svd"`` = exact batched ``svdvals`` on [G, r, d_in]; ``"gram"`` =
  Σ sqrt(eig(W_g W_gᵀ) + ε) from the r×r Gram (ε = 1e-6 keeps the gradient finite when a group collapses).
- Reconstruction term: batch FVU (Σ‖x − x̂‖² / Σ‖x − x̄‖²), so λ does not depend on the activation scale.
- Dead groups (all latents in ``ctx.dead_mask``) get an AuxK-style loss: the top dead groups reconstruct
  the residual (coefficient 1/32). Rare-but-alive groups need :meth:`SASA.resample_groups` (firing-rate
  threshold, early in training, optimiser rows reset), run by the caller: it needs data and the optimiser.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from lorascope.distributed import batch_denominator
from lorascope.saes.base import (
    SAE,
    NonNegativeFloat,
    OptionalPositiveInt,
    PositiveInt,
    SAESettings,
    TrainContext,
    TrainOutput,
    register,
)


class SASASettings(SAESettings):
    """SASA settings (one line per field); ``groups`` None: d_sae // rank."""

    rank: PositiveInt
    s: PositiveInt
    groups: OptionalPositiveInt = None
    nuclear_coefficient: NonNegativeFloat = 1e-4
    nuclear_form: Literal["svd", "gram"] = "svd"
    score: Literal["coords", "output"] = "coords"
    auxk_coefficient: NonNegativeFloat = 1 / 32
    nuclear_target: Literal["map", "decoder"] = "map"
    s_start: int = 0
    anneal_fraction: float = 0.0

    def for_width(self, d_in: int, d_sae: int) -> SASASettings:
        if self.groups is None and d_sae % self.rank == 0:
            return self.model_copy(update={"groups": d_sae // self.rank})
        return self

    def check_width(self, d_in: int, d_sae: int) -> None:
        g, r = self.groups, self.rank
        if g is None or d_sae != g * r:
            raise ValueError(f"SASA d_sae={d_sae} must equal groups·rank = {g}·{r}"
                             + (f" = {g * r}" if g is not None else ""))
        if self.s > g:
            raise ValueError(f"SASA s={self.s} exceeds groups={g} (active groups per token)")
        if r > d_in:
            raise ValueError(f"SASA rank={r} exceeds d_in={d_in}")


@register("sasa", SASASettings)
class SASA(SAE):
    """Groups × rank block-sparse SAE with signed in-group codes and Top-s group gating."""

    settings: SASASettings

    @property
    def groups(self) -> int:
        return int(self.settings.groups)

    @property
    def rank(self) -> int:
        return int(self.settings.rank)

    @property
    def s(self) -> int:
        return int(self.settings.s)

    # ---- encoding ---------------------------------------------------------------------------------------
    def group_coords(self, x: torch.Tensor) -> torch.Tensor:
        """All groups' signed encoder coordinates [N, G, r]."""
        self.check_input(x)
        return self.pre_acts(x).view(x.shape[0], self.groups, self.rank)

    def group_scores(self, coords: torch.Tensor) -> torch.Tensor:
        """Group scores [N, G] used for Top-s gating (see module docstring)."""
        if self.settings.score == "output":
            w = self.W_dec.view(self.groups, self.rank, self.d_in)
            gram = w @ w.transpose(1, 2)  # [G, r, r]
            return torch.einsum("ngr,grq,ngq->ng", coords, gram, coords).clamp_min(0).sqrt()
        return coords.norm(dim=-1)

    def select(self, x: torch.Tensor, s: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-s groups per token: (group indices [N, s] long, their coordinates [N, s, r])."""
        coords = self.group_coords(x)
        with torch.no_grad():
            idx = self.group_scores(coords.detach()).topk(s or self.s, dim=1).indices
        sel = coords.gather(1, idx[..., None].expand(-1, -1, self.rank))
        return idx, sel

    def _latent_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Group indices [N, s] -> latent indices [N, s·r]."""
        ar = torch.arange(self.rank, device=idx.device)
        return (idx[..., None] * self.rank + ar).flatten(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, d_sae]: signed coordinates of the s selected groups, zeros elsewhere."""
        idx, sel = self.select(x)
        codes = torch.zeros(x.shape[0], self.d_sae, dtype=sel.dtype, device=sel.device)
        return codes.scatter(1, self._latent_indices(idx), sel.flatten(1))

    def _sparse_decode(self, lat: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Σ over the given latents of value · decoder row (no bias) [N, d_in]."""
        return F.embedding_bag(lat, self.W_dec, per_sample_weights=vals, mode="sum")

    # ---- training ---------------------------------------------------------------------------------------
    def nuclear_norms(self) -> torch.Tensor:
        """Nuclear norm of each group's decoder block [G] (differentiable; form per ``nuclear_form``)."""
        w = self.W_dec.view(self.groups, self.rank, self.d_in).float()
        if self.settings.nuclear_target == "map":
            return torch.linalg.svdvals(self._map_core(w)).sum(1)
        if self.settings.nuclear_form == "gram":
            ev = torch.linalg.eigvalsh(w @ w.transpose(1, 2))
            return (ev.clamp_min(0) + 1e-6).sqrt().sum(1)
        return torch.linalg.svdvals(w).sum(1)

    def train_s(self, ctx: TrainContext) -> int:
        """Active groups at this step: anneals linearly from ``s_start`` to ``s`` over ``anneal_fraction``."""
        s0, frac = int(self.settings.s_start), float(self.settings.anneal_fraction)
        if s0 <= self.s or frac <= 0 or ctx.total_steps <= 0:
            return self.s
        t = min(1.0, ctx.step / (frac * ctx.total_steps))
        return max(self.s, round(s0 + t * (self.s - s0)))

    def _map_core(self, w: torch.Tensor) -> torch.Tensor:
        """[G, r, r] matrices with the singular values of each group's map W_enc,g W_dec,g [d, d]."""
        a = self.W_enc.float().view(self.d_in, self.groups, self.rank).permute(1, 0, 2)  # [G, d, r]
        ra = torch.linalg.qr(a).R
        rb = torch.linalg.qr(w.transpose(1, 2)).R
        return ra @ rb.transpose(1, 2)

    @torch.no_grad()
    def map_singular_values(self) -> torch.Tensor:
        """Singular values of each group's encode-decode map W_enc,g W_dec,g [G, r] (descending)."""
        w = self.W_dec.view(self.groups, self.rank, self.d_in).float()
        return torch.linalg.svdvals(self._map_core(w)).double()

    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        idx, sel = self.select(x, self.train_s(ctx))
        lat = self._latent_indices(idx)
        x_hat = self._sparse_decode(lat, sel.flatten(1)) + self.b_dec
        total_var = batch_denominator(x, ctx.share).clamp_min(1e-12)
        sq_err = (x_hat - x).pow(2).sum()
        recon = sq_err / total_var
        lam = float(self.settings.nuclear_coefficient) * float(ctx.sparsity_scale)
        nuc = self.nuclear_norms().sum() if lam > 0 else x.new_zeros(())
        loss = recon + lam * nuc
        parts = {"mse": (sq_err / x.numel()).detach(), "fvu": recon.detach(), "nuclear": nuc.detach()}
        aux = self._auxk(x, x_hat, ctx.dead_mask)
        if aux is not None:
            loss = loss + float(self.settings.auxk_coefficient) * aux
            parts["auxk"] = aux.detach()
        return TrainOutput(loss, x_hat, lat, parts, active_is_indices=True)

    def _auxk(self, x: torch.Tensor, x_hat: torch.Tensor,
              dead_mask: torch.Tensor | None) -> torch.Tensor | None:
        """AuxK on dead groups: the top dead groups (by score) reconstruct the detached residual."""
        if dead_mask is None:
            return None
        dead = dead_mask.view(self.groups, self.rank).all(1)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        k_aux = min(n_dead, max(1, self.d_in // (2 * self.rank)))
        coords = self.group_coords(x)
        scores = self.group_scores(coords.detach()).masked_fill(~dead, -math.inf)
        idx = scores.topk(k_aux, dim=1).indices
        sel = coords.gather(1, idx[..., None].expand(-1, -1, self.rank))
        resid = (x - x_hat).detach()
        e_hat = self._sparse_decode(self._latent_indices(idx), sel.flatten(1))
        scale = min(n_dead / k_aux, 1.0)
        return scale * (e_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum().clamp_min(1e-12)

    # ---- diagnostics ------------------------------------------------------------------------------------
    @torch.no_grad()
    def group_firing_rate(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Fraction of the rows of ``x`` [N, d_in] on which each group is selected [G] (float64)."""
        counts = torch.zeros(self.groups, dtype=torch.float64)
        for i in range(0, x.shape[0], batch_size):
            idx, _ = self.select(x[i:i + batch_size])
            counts += torch.bincount(idx.flatten().cpu(), minlength=self.groups).double()
        return counts / max(x.shape[0], 1)

    @torch.no_grad()
    def group_effective_rank(self, rel_threshold: float = 0.1) -> dict[str, torch.Tensor]:
        """Per-group rank [G] of the decoder block: ``threshold_rank`` = #σ > rel_threshold·σ_max,
        ``entropy_rank`` = exp(H(σ/Σσ)) (Roy & Vetterli), ``singular_values`` [G, r]; and the same of the
        encode-decode map (``map_threshold_rank``, ``map_entropy_rank``, ``map_singular_values``)."""
        sv = torch.linalg.svdvals(self.W_dec.detach().double().view(self.groups, self.rank, self.d_in))
        mv = self.map_singular_values()
        return {"singular_values": sv, "threshold_rank": (sv > rel_threshold * sv[:, :1]).sum(1),
                "entropy_rank": entropy_rank(sv), "map_singular_values": mv,
                "map_threshold_rank": (mv > rel_threshold * mv[:, :1]).sum(1),
                "map_entropy_rank": entropy_rank(mv)}

    # ---- resampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def resample_groups(self, x: torch.Tensor, firing_rate: torch.Tensor, threshold: float = 2e-4,
                        optimizer: torch.optim.Optimizer | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-initialise groups whose firing rate [G] is below ``threshold`` from high-error rows of ``x``.

        Each such group gets r residual directions x − x̂ (rows drawn with probability ∝ ‖x − x̂‖²) as unit
        decoder rows, an encoder block 0.2·(mean alive encoder column norm)·rowsᵀ and zero b_enc; Adam
        moments of the touched rows/columns are zeroed when ``optimizer`` is given. Returns the resampled
        group indices.
        """
        rare = torch.nonzero(firing_rate.to(torch.float64) < threshold).flatten()
        if rare.numel() == 0:
            return rare
        r, d = self.rank, self.d_in
        resid = (x - self.forward(x)).float()
        w = resid.pow(2).sum(1)
        if float(w.sum()) <= 0:
            return rare[:0]
        picks = torch.multinomial(w / w.sum(), rare.numel() * r, replacement=w.numel() < rare.numel() * r,
                                  generator=generator)
        rows = resid[picks].view(rare.numel(), r, d)
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = torch.ones(self.groups, dtype=torch.bool)
        alive[rare] = False
        enc_norm = self.W_enc.view(d, self.groups, r)[:, alive].norm(dim=0).mean() if alive.any() else 1.0
        lat = self._latent_indices(rare[None]).flatten()
        self.W_dec[lat] = rows.reshape(-1, d).to(self.W_dec.dtype)
        self.W_enc[:, lat] = (0.2 * enc_norm * rows.reshape(-1, d).T).to(self.W_enc.dtype)
        self.b_enc[lat] = 0
        if optimizer is not None:
            for p, dim in ((self.W_dec, 0), (self.W_enc, 1), (self.b_enc, 0)):
                reset_optimizer_rows(optimizer, p, lat, dim)
        return rare


def entropy_rank(sv: torch.Tensor) -> torch.Tensor:
    """exp of the Shannon entropy of σ/Σσ along the last axis (1 for rank 1, k for k equal values)."""
    p = sv / sv.sum(-1, keepdim=True).clamp_min(1e-300)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.exp(h)


@torch.no_grad()
def reset_optimizer_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, index: torch.Tensor,
                         dim: int) -> None:
    """Zero each per-parameter optimiser state tensor (Adam's exp_avg, exp_avg_sq) at ``index`` on ``dim``."""
    state = optimizer.state.get(param)
    if not state:
        return
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.shape == param.shape:
            v.index_fill_(dim, index.to(v.device), 0.0)

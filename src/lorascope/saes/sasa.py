"""SASA: subspace-aware sparse autoencoder (Dalili et al., arXiv 2606.06333).

Authors' code: github.com/arshandalili/sasa (``sasa/model.py`` = the ``topk_sasa`` SAELens class;
``scripts/train_sasa.py`` and ``scripts/train_matched_budget.py`` = the training runs). This module was written
from the paper and then checked against that code; it shares no code with it.

Latents come in ``groups`` blocks of ``rank`` consecutive latents (d_sae = groups · rank; latent j belongs
to group j // rank). Group g's decoder rows W_dec[g·r : g·r + r] span its subspace; its codes are the
*signed, linear* encoder coordinates of that block. Per token only the ``s`` groups with the largest score
are kept (block sparsity, s·r active latents); the rest are zeroed.

Two recipes (``recipe`` in cfg.arch; every option lives in :class:`SASASettings`, one place):

``recipe="published"`` (default) — what the authors' code does (model.py ``TopKSASA`` /
``TopKSASAConfig``; train_sasa.py):
- input: per-token LayerNorm (SAELens ``normalize_activations="layer_norm"``): x̃ = (x − mean_d x) / (std_d x +
  1e-5), std unbiased; the SAE encodes x̃ − b_dec and its output y is mapped back as y · std + mean, so the
  saved SAE applies to raw activations (cfg.json says ``normalize_activations: layer_norm``, architecture
  ``topk_sasa`` with n_groups / group_rank / k_groups, as the authors' SAELens class reads it);
- group score = L2 norm of the group's encoder coordinates (``score="coords"``);
- W_dec rows *and* W_enc columns renormalised to unit norm every step (``encoder_renorm``); no projection
  of the decoder gradient;
- loss = Σ_d (x − x̂)² averaged over tokens, in raw units, + λ · mean_g ‖D_g‖_* with D_g the [r, d_in]
  unit-row decoder block, λ = ``nuclear_coefficient`` = 100, no warm-up of λ;
- AuxK over dead *latents*: the top-k_aux dead latents by (signed) pre-activation reconstruct the residual
  (their decode is scaled by the token's LayerNorm std, no b_dec), k_aux = min(512, #dead, d_in // 2),
  loss = min(#dead / k_aux, 1) · Σ_d (e − ê)² averaged over tokens, coefficient 1.0;
- no group resampling; trainer defaults (:meth:`SASA.trainer_defaults`): Adam lr 2e-4, betas (0.9, 0.999),
  1,000 warm-up steps, linear decay over the last 20% of steps, no global input scaling, b_dec = 0.

Differences from the authors' code that remain (all small):
- SAELens decays the LR linearly to lr/10 (its ``lr_end`` default), lorascope's trainer to 0;
- the authors renormalise at the *start* of each training step, here after each optimiser step (and the
  init is already unit-norm), so only the very last update differs;
- dead latents: SAELens's window is 1,000 steps; lorascope's trainer uses ``dead_window_tokens``
  (default min(10M, total/4) tokens);
- the nuclear norm here is the exact ``svdvals`` sum (its gradient is the polar factor U Vᵀ); the authors
  compute the same value and gradient from an eigendecomposition of the Gram with a 1e-6 ridge;
- train_matched_budget.py (the paper's matched-budget comparison) used 0 warm-up steps, train_sasa.py 1,000;
  paper settings: GPT-2 small layer 7 (resid_pre) K = 2048 groups, r = 6, s = 10; Mistral-7B 8192, 4, 15.

``recipe="lorascope"`` — lorascope's earlier variant (kept for comparison; benchmarks/sasa.py uses it):
no input normalisation (the trainer's global scale), no encoder renorm, the penalty on each group's
encode-decode map W_enc,g W_dec,g (``nuclear_target="map"``; singular values from the r×r product of QR
R-factors), *summed* over groups, λ = 1e-4 against a batch-FVU reconstruction term and ramped by the trainer's
sparsity warm-up; AuxK over dead *groups*, coefficient 1/32, normalised by the residual's variance; optional
:meth:`SASA.resample_groups`. With unit rows ‖D_g‖_F = √r is fixed, so the decoder-block penalty can only reward
aligning rows; an orthonormal block is its maximum on that sphere, which is why that variant penalises the map.

Other options (both recipes): ``score="output"`` (‖c W_g‖), ``nuclear_form="gram"`` (Σ sqrt(eig(W_g W_gᵀ)+ε)),
``s_start``/``anneal_fraction`` (anneal the active-group count from s_start down to s).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, Strict, model_validator

from lorascope.distributed import batch_denominator
from lorascope.saes.base import (
    SAE,
    NonNegativeFloat,
    OptionalPositiveInt,
    PositiveInt,
    SAEConfig,
    SAESettings,
    StrictBool,
    TrainContext,
    TrainOutput,
    register,
)

RECIPES = ("published", "lorascope")
_RECIPE_DEFAULTS: dict[str, dict] = {
    "published": {
        "input_norm": "layer_norm",
        "encoder_renorm": True,
        "nuclear_target": "decoder",
        "nuclear_reduce": "mean",
        "nuclear_coefficient": 100.0,
        "nuclear_warmup": False,
        "recon_loss": "sse",
        "auxk_over": "latents",
        "auxk_coefficient": 1.0,
        "k_aux": 512,
    },
    "lorascope": {
        "input_norm": "none",
        "encoder_renorm": False,
        "nuclear_target": "map",
        "nuclear_reduce": "sum",
        "nuclear_coefficient": 1e-4,
        "nuclear_warmup": True,
        "recon_loss": "fvu",
        "auxk_over": "groups",
        "auxk_coefficient": 1 / 32,
        "k_aux": 0,
    },
}
# what the authors' training script passes to SAELens's runner (scripts/train_sasa.py)
PUBLISHED_TRAINER = {
    "lr": 2e-4,
    "warmup_steps": 1000,
    "decay_fraction": 0.2,
    "betas": (0.9, 0.999),
    "scale_inputs": False,
    "b_dec_init": "zeros",
    "sparsity_warmup_fraction": 0.0,
}
LN_EPS = 1e-5  # SAELens's layer_norm eps (added to the std)


class SASASettings(SAESettings):
    """SASA settings (one line per field); ``groups`` None: d_sae // rank. Fields left out take the defaults of
    ``recipe`` (``_RECIPE_DEFAULTS``), so cfg.json records the recipe and every value it implied."""

    rank: PositiveInt
    s: PositiveInt
    groups: OptionalPositiveInt = None
    recipe: Literal["published", "lorascope"] = "published"
    input_norm: Literal["layer_norm", "none"]
    encoder_renorm: StrictBool
    nuclear_target: Literal["map", "decoder"]
    nuclear_reduce: Literal["mean", "sum"]
    nuclear_coefficient: NonNegativeFloat
    nuclear_warmup: StrictBool
    recon_loss: Literal["sse", "fvu"]
    auxk_over: Literal["latents", "groups"]
    auxk_coefficient: NonNegativeFloat
    k_aux: Annotated[int, Strict(), Field(ge=0)]
    nuclear_form: Literal["svd", "gram"] = "svd"
    score: Literal["coords", "output"] = "coords"
    s_start: int = 0
    anneal_fraction: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        recipe = data.get("recipe", "published")
        return {**_RECIPE_DEFAULTS.get(recipe, {}), **data}

    def for_width(self, d_in: int, d_sae: int) -> SASASettings:
        if self.groups is None and d_sae % self.rank == 0:
            return self.model_copy(update={"groups": d_sae // self.rank})
        return self

    def check_width(self, d_in: int, d_sae: int) -> None:
        g, r = self.groups, self.rank
        if g is None or d_sae != g * r:
            raise ValueError(
                f"SASA d_sae={d_sae} must equal groups·rank = {g}·{r}" + (f" = {g * r}" if g is not None else "")
            )
        if self.s > g:
            raise ValueError(f"SASA s={self.s} exceeds groups={g} (active groups per token)")
        if r > d_in:
            raise ValueError(f"SASA rank={r} exceeds d_in={d_in}")


@register("sasa", SASASettings)
class SASA(SAE):
    """Groups × rank block-sparse SAE with signed in-group codes and Top-s group gating."""

    settings: SASASettings

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self._ln_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def groups(self) -> int:
        return self.settings.groups

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def s(self) -> int:
        return self.settings.s

    def trainer_defaults(self) -> dict:
        """TrainerConfig values this recipe uses wherever the caller left the trainer's own default."""
        return dict(PUBLISHED_TRAINER) if self.settings.recipe == "published" else {}

    def saelens_fields(self) -> dict:
        """cfg.json keys of the authors' SAELens class (``topk_sasa``: n_groups, group_rank, k_groups) and the
        input normalisation SAELens applies at inference ("layer_norm" for the published recipe)."""
        return {
            "architecture": "topk_sasa",
            "n_groups": self.groups,
            "group_rank": self.rank,
            "k_groups": self.s,
            "normalize_activations": self.settings.input_norm,
        }

    # ---- per-token LayerNorm (published recipe) ---------------------------------------------------------
    def normalise_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(x̃, (mean, std)) with x̃ = (x − mean) / (std + 1e-5) per row; (x, None) when input_norm is "none"."""
        if self.settings.input_norm == "none":
            return x, None
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        return xc / (std + LN_EPS), (mu, std)

    @staticmethod
    def denormalise(y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Map an output in normalised units back to raw units: y · std + mean (as SAELens does)."""
        return y if stats is None else y * stats[1] + stats[0]

    # ---- encoding ---------------------------------------------------------------------------------------
    def group_coords(self, x: torch.Tensor) -> torch.Tensor:
        """All groups' signed encoder coordinates [N, G, r] of *already normalised* inputs."""
        return self.pre_acts(x).view(x.shape[0], self.groups, self.rank)

    def group_scores(self, coords: torch.Tensor) -> torch.Tensor:
        """Group scores [N, G] used for Top-s gating (see module docstring)."""
        if self.settings.score == "output":
            w = self.W_dec.view(self.groups, self.rank, self.d_in)
            gram = w @ w.transpose(1, 2)  # [G, r, r]
            return torch.einsum("ngr,grq,ngq->ng", coords, gram, coords).clamp_min(0).sqrt()
        return coords.norm(dim=-1)

    def _select_normalised(self, xn: torch.Tensor, s: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        coords = self.group_coords(xn)
        with torch.no_grad():
            idx = self.group_scores(coords.detach()).topk(s or self.s, dim=1).indices
        return idx, coords.gather(1, idx[..., None].expand(-1, -1, self.rank))

    def select(self, x: torch.Tensor, s: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-s groups per token of raw ``x``: (group indices [N, s] long, their coordinates [N, s, r])."""
        self.check_input(x)
        return self._select_normalised(self.normalise_input(x)[0], s)

    def _latent_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Group indices [N, s] -> latent indices [N, s·r]."""
        ar = torch.arange(self.rank, device=idx.device)
        return (idx[..., None] * self.rank + ar).flatten(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, d_sae]: signed coordinates of the s selected groups, zeros elsewhere.

        With the LayerNorm input, the rows' (mean, std) are kept for the next :meth:`decode` of codes with as
        many rows (SAELens does the same), so ``decode(encode(x))`` is in raw units."""
        self.check_input(x)
        xn, stats = self.normalise_input(x)
        self._ln_stats = None if stats is None else (stats[0].detach(), stats[1].detach())
        idx, sel = self._select_normalised(xn)
        codes = torch.zeros(x.shape[0], self.d_sae, dtype=sel.dtype, device=sel.device)
        return codes.scatter(1, self._latent_indices(idx), sel.flatten(1))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes W_dec + b_dec, mapped back to raw units with the last encode's LayerNorm stats when those
        are for the same number of rows (otherwise in normalised units: decoder directions, steering)."""
        y = codes @ self.W_dec + self.b_dec
        st = self._ln_stats
        if st is not None and codes.ndim == 2 and st[0].shape[0] == codes.shape[0]:
            return self.denormalise(y, st)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def _sparse_decode(self, lat: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Σ over the given latents of value · decoder row (no bias) [N, d_in]."""
        return F.embedding_bag(lat, self.W_dec, per_sample_weights=vals, mode="sum")

    # ---- weight constraints -----------------------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """The published recipe renormalises only (no gradient projection); lorascope's projects."""
        if not self.settings.encoder_renorm:
            super().remove_parallel_grad()

    @torch.no_grad()
    def post_step(self) -> None:
        """Unit-norm decoder rows; with ``encoder_renorm`` also unit-norm encoder columns."""
        super().post_step()
        if self.settings.encoder_renorm:
            self.W_enc /= self.W_enc.norm(dim=0, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """With the per-token LayerNorm input the weights do not depend on a global input scale (LN removes
        it; the output is mapped back with each token's own std): nothing to fold."""
        if self.settings.input_norm == "none":
            super().fold_input_scale(scale)

    # ---- training ---------------------------------------------------------------------------------------
    def nuclear_norms(self) -> torch.Tensor:
        """Nuclear norm of each group's penalised block [G] (target per ``nuclear_target``; differentiable)."""
        w = self.W_dec.view(self.groups, self.rank, self.d_in).float()
        if self.settings.nuclear_target == "map":
            return torch.linalg.svdvals(self._map_core(w)).sum(1)
        if self.settings.nuclear_form == "gram":
            ev = torch.linalg.eigvalsh(w @ w.transpose(1, 2))
            return (ev.clamp_min(0) + 1e-6).sqrt().sum(1)
        return torch.linalg.svdvals(w).sum(1)

    def nuclear_penalty(self, ctx: TrainContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ_eff · reduce_g ‖·‖_*, reduce_g ‖·‖_*) with reduce = mean or sum and λ ramped only for lorascope."""
        st = self.settings
        lam = float(st.nuclear_coefficient) * (float(ctx.sparsity_scale) if st.nuclear_warmup else 1.0)
        if lam <= 0:
            zero = self.W_dec.new_zeros(())
            return zero, zero
        norms = self.nuclear_norms()
        red = norms.mean() if st.nuclear_reduce == "mean" else norms.sum()
        return lam * red, red

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
        st = self.settings
        xn, stats = self.normalise_input(x)
        idx, sel = self._select_normalised(xn, self.train_s(ctx))
        lat = self._latent_indices(idx)
        x_hat = self.denormalise(self._sparse_decode(lat, sel.flatten(1)) + self.b_dec, stats)
        sq_err = (x_hat - x).pow(2).sum()
        if st.recon_loss == "sse":
            recon = sq_err / x.shape[0]
            fvu = sq_err.detach() / batch_denominator(x, ctx.share).clamp_min(1e-12)
        else:
            recon = sq_err / batch_denominator(x, ctx.share).clamp_min(1e-12)
            fvu = recon.detach()
        pen, nuc = self.nuclear_penalty(ctx)
        loss = recon + pen
        parts = {"mse": (sq_err / x.numel()).detach(), "fvu": fvu, "nuclear": nuc.detach()}
        if st.auxk_over == "latents":
            aux = self._auxk_latents(xn, x, x_hat, stats, ctx.dead_mask)
        else:
            aux = self._auxk_groups(xn, x, x_hat, ctx.dead_mask)
        if aux is not None:
            loss = loss + float(st.auxk_coefficient) * aux
            parts["auxk"] = aux.detach()
        return TrainOutput(loss, x_hat, lat, parts, active_is_indices=True)

    def _auxk_latents(
        self,
        xn: torch.Tensor,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor] | None,
        dead_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Published AuxK: the top-k_aux dead latents by signed pre-activation reconstruct the residual."""
        if dead_mask is None:
            return None
        n_dead = int(dead_mask.sum())
        k_aux = min(int(self.settings.k_aux), n_dead, self.d_in // 2)
        if k_aux == 0:
            return None
        pre = self.pre_acts(xn).masked_fill(~dead_mask.to(xn.device)[None, :], -math.inf)
        vals, lat = pre.topk(k_aux, dim=1)
        e_hat = self._sparse_decode(lat, vals)
        if stats is not None:
            e_hat = e_hat * stats[1]
        resid = (x - x_hat).detach()
        return min(n_dead / k_aux, 1.0) * (e_hat - resid).pow(2).sum() / x.shape[0]

    def _auxk_groups(
        self, xn: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """lorascope AuxK on dead groups: the top dead groups (by score) reconstruct the detached residual."""
        if dead_mask is None:
            return None
        dead = dead_mask.view(self.groups, self.rank).all(1)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        k_aux = min(n_dead, max(1, self.d_in // (2 * self.rank)))
        coords = self.group_coords(xn)
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
            idx, _ = self.select(x[i : i + batch_size])
            counts += torch.bincount(idx.flatten().cpu(), minlength=self.groups).double()
        return counts / max(x.shape[0], 1)

    @torch.no_grad()
    def group_effective_rank(self, rel_threshold: float = 0.1) -> dict[str, torch.Tensor]:
        """Per-group rank [G] of the decoder block: ``threshold_rank`` = #σ > rel_threshold·σ_max,
        ``entropy_rank`` = exp(H(σ/Σσ)) (Roy & Vetterli), ``singular_values`` [G, r]; and the same of the
        encode-decode map (``map_threshold_rank``, ``map_entropy_rank``, ``map_singular_values``)."""
        sv = torch.linalg.svdvals(self.W_dec.detach().double().view(self.groups, self.rank, self.d_in))
        mv = self.map_singular_values()
        return {
            "singular_values": sv,
            "threshold_rank": (sv > rel_threshold * sv[:, :1]).sum(1),
            "entropy_rank": entropy_rank(sv),
            "map_singular_values": mv,
            "map_threshold_rank": (mv > rel_threshold * mv[:, :1]).sum(1),
            "map_entropy_rank": entropy_rank(mv),
        }

    # ---- resampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def resample_groups(
        self,
        x: torch.Tensor,
        firing_rate: torch.Tensor,
        threshold: float = 2e-4,
        optimizer: torch.optim.Optimizer | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
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
        xn, _ = self.normalise_input(x)  # decoder rows live in the SAE's (normalised) input space
        idx, sel = self._select_normalised(xn)
        resid = (xn - self._sparse_decode(self._latent_indices(idx), sel.flatten(1)) - self.b_dec).float()
        w = resid.pow(2).sum(1)
        if float(w.sum()) <= 0:
            return rare[:0]
        picks = torch.multinomial(
            w / w.sum(), rare.numel() * r, replacement=w.numel() < rare.numel() * r, generator=generator
        )
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
def reset_optimizer_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """Zero each per-parameter optimiser state tensor (Adam's exp_avg, exp_avg_sq) at ``index`` on ``dim``."""
    state = optimizer.state.get(param)
    if not state:
        return
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.shape == param.shape:
            v.index_fill_(dim, index.to(v.device), 0.0)

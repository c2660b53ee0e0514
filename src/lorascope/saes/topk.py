"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each token, ReLU them.

Settings (:class:`TopKSettings`): ``k`` (required, 1..d_sae), ``k_aux`` (AuxK latents, default d_in // 2),
``auxk_coefficient`` (default 1/32).

Loss = mean_tokens ||x - x_hat||^2 + auxk_coefficient * AuxK,
AuxK = sum ||e - e_hat||^2 / sum ||e - mean(e)||^2,
where e = x - x_hat (detached) is the residual and e_hat its reconstruction (no b_dec) by the top-``k_aux``
*dead* latents (TrainContext.dead_mask); the normalisation by the residual's variance follows OpenAI's
implementation (as dictionary_learning and sparsify do). Training uses the sparse kernels of ``_sparse``
(set ``sae.sparse_kernels = False`` for the dense reference path; both give the same numbers up to float
summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorascope.distributed import batch_denominator
from lorascope.saes._sparse import Selection, decode_sparse, encode_values, topk_rows
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


def check_at_most(name: str, value: int | None, limit: int, what: str) -> None:
    """Raise ValueError when ``value`` exceeds ``limit`` (a size such as d_sae)."""
    if value is not None and value > limit:
        raise ValueError(f"{name} = {value} is larger than {what} = {limit}")


class TopKSettings(SAESettings):
    """TopK settings: active latents per token, and the AuxK term on dead latents."""

    k: PositiveInt  # active latents per token
    k_aux: OptionalPositiveInt = None  # AuxK latents; None: d_in // 2
    auxk_coefficient: NonNegativeFloat = 1 / 32

    def check_width(self, d_in: int, d_sae: int) -> None:
        check_at_most("k", self.k, d_sae, "d_sae")
        check_at_most("k_aux", self.k_aux, d_sae, "d_sae")


@register("topk", TopKSettings)
class TopKSAE(SAE):
    """TopK SAE; see module docstring."""

    settings: TopKSettings
    sparse_kernels: bool = True
    encoder_init_scale = 3**-0.5

    @property
    def k(self) -> int:
        return self.settings.k

    @property
    def k_aux(self) -> int:
        return self.settings.k_aux or max(self.d_in // 2, 1)

    @property
    def auxk_coefficient(self) -> float:
        return self.settings.auxk_coefficient

    # ---- inference -----------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        pre = self.pre_acts(x)
        v, i = pre.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, i, F.relu(v))

    # ---- training ------------------------------------------------------------------------------------------
    def _select(self, pre: torch.Tensor, ctx: TrainContext) -> tuple[torch.Tensor, Selection]:
        """Training-time selection from detached pre-activations: (pre values [nnz], Selection)."""
        v, i = topk_rows(pre, self.k)
        return v.reshape(-1), Selection.from_topk(i, self.d_sae)

    def _active_ids(self, codes: torch.Tensor, sel: Selection) -> torch.Tensor:
        """Latent ids of the pairs that fired, -1 for selected-but-zero ones ([N, k] for TopK)."""
        ids = torch.where(codes.detach() > 0, sel.cols, -1)
        return ids.view(sel.n_tokens, -1)

    def _pre_nograd(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x_c = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
            return torch.addmm(self.b_enc, x_c.to(self.W_enc.dtype), self.W_enc)

    def _codes_and_recon(
        self, x: torch.Tensor, pre_g: torch.Tensor | None, vals: torch.Tensor, sel: Selection
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU'd codes at ``sel`` [nnz] and their reconstruction without b_dec [N, d_in]."""
        if pre_g is None:
            codes = F.relu(
                encode_values(vals, x, self.W_enc, self.b_enc, self.b_dec, sel, self.cfg.apply_b_dec_to_input)
            )
            return codes, decode_sparse(codes, self.W_dec, sel)
        codes = F.relu(pre_g[sel.rows, sel.cols])
        dense = torch.zeros_like(pre_g).index_put((sel.rows, sel.cols), codes)
        return codes, dense @ self.W_dec

    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        x = x.to(self.W_enc.dtype)
        if self.sparse_kernels:
            pre, pre_g = self._pre_nograd(x), None
        else:
            pre_g = self.pre_acts(x)
            pre = pre_g.detach()
        vals, sel = self._select(pre, ctx)
        codes, recon = self._codes_and_recon(x, pre_g, vals, sel)
        x_hat = recon + self.b_dec
        err = x_hat.float() - x.float()
        mse = err.pow(2).sum(1).mean()
        loss, parts = mse, {"mse": mse.detach()}
        aux = self._auxk_loss(x, pre, pre_g, -err.detach(), ctx)
        if aux is not None:
            loss = loss + self.auxk_coefficient * aux
            parts["auxk"] = aux.detach()
        return TrainOutput(loss, x_hat, self._active_ids(codes, sel), parts, active_is_indices=True)

    def _auxk_loss(
        self,
        x: torch.Tensor,
        pre: torch.Tensor,
        pre_g: torch.Tensor | None,
        residual: torch.Tensor,
        ctx: TrainContext,
    ) -> torch.Tensor | None:
        """||residual - e_hat||^2 / ||residual - mean||^2, e_hat decoded from the top-k_aux dead latents."""
        if ctx.dead_mask is None or self.auxk_coefficient == 0:
            return None
        dead = torch.nonzero(ctx.dead_mask, as_tuple=True)[0]
        if dead.numel() == 0:
            return None
        k_aux = min(self.k_aux, dead.numel())
        v, local = topk_rows(pre[:, dead], k_aux)
        glob = dead[local]  # dead ids ascend, so rows stay sorted
        sel = Selection.from_topk(glob, self.d_sae)
        _, e_hat = self._codes_and_recon(x, pre_g, v.reshape(-1), sel)
        denom = batch_denominator(residual, ctx.share).clamp_min(1e-12)
        return (e_hat.float() - residual).pow(2).sum() / denom

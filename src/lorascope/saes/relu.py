"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Circuits Updates", April 2024).

f = ReLU(pre), x_hat = f @ W_dec + b_dec,
Loss = mean_tokens ||x - x_hat||^2 + l1_coefficient * sparsity_scale * mean_tokens sum_i f_i ||W_dec,i||.

Weighting the penalty by ||W_dec,i|| removes the cheap way out of a plain L1 penalty (shrink f, grow the
decoder row), so decoder rows can stay unconstrained, as in the April update: that is the default here
(``unit_decoder=False``; no renormalisation, no gradient projection). With ``unit_decoder=True`` the rows are
kept at norm 1 (the trainer projects out the parallel gradient and renormalises after each step), so the
weight is exactly 1 and the penalty reduces to the plain L1 of the codes; both settings are valid, they differ
in whether code magnitudes or decoder norms carry the scale.

``l1_penalty="plain"`` drops the weighting (Loss = mse + λ Σ_i f_i, the plain L1 of Bricken et al. 2023 and of
arXiv 2605.28896); pair it with ``unit_decoder=True``, which rules out the shrink-codes/grow-decoder escape.

Settings (:class:`ReLUSettings`): ``l1_coefficient`` (default 5.0, for inputs scaled to mean norm sqrt(d_in)
as the trainer does), ``unit_decoder`` (default False), ``l1_penalty`` ("decoder_norm" default, or "plain").
"""

from __future__ import annotations

from typing import Literal

import torch

from lorascope.saes.base import SAE, NonNegativeFloat, SAESettings, StrictBool, TrainContext, TrainOutput, register


class ReLUSettings(SAESettings):
    """ReLU SAE settings (one line per field)."""

    l1_coefficient: NonNegativeFloat = 5.0
    unit_decoder: StrictBool = False
    l1_penalty: Literal["decoder_norm", "plain"] = "decoder_norm"


@register("relu", ReLUSettings)
class ReLUSAE(SAE):
    """Standard ReLU SAE (SAELens ``standard``)."""

    settings: ReLUSettings

    @property
    def l1_coefficient(self) -> float:
        return self.settings.l1_coefficient

    @property
    def unit_decoder(self) -> bool:
        return self.settings.unit_decoder

    @property
    def l1_penalty(self) -> str:
        return self.settings.l1_penalty

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return torch.relu(self.pre_acts(x))

    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        f = torch.relu(self.pre_acts(x.to(self.W_enc.dtype)))
        x_hat = f @ self.W_dec + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).sum(1).mean()
        l1 = f.float().sum(1).mean() if self.l1_penalty == "plain" else (f @ self.W_dec.norm(dim=1)).mean()
        loss = mse + self.l1_coefficient * ctx.sparsity_scale * l1
        return TrainOutput(loss, x_hat, f.detach() > 0, {"mse": mse.detach(), "l1": l1.detach()})

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        if self.unit_decoder:
            super().remove_parallel_grad()

    @torch.no_grad()
    def post_step(self) -> None:
        if self.unit_decoder:
            super().post_step()

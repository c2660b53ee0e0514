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

Arch fields: ``l1_coefficient`` (default 5.0, for inputs scaled to mean norm sqrt(d_in) as the trainer does),
``unit_decoder`` (default False), ``l1_penalty`` ("decoder_norm" default, or "plain").
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lorascope.errors import LorascopeError
from lorascope.saes.base import SAE, SAEConfig, TrainContext, TrainOutput, register
from lorascope.saes.topk import check_nonnegative

L1_PENALTIES = ("decoder_norm", "plain")


@register("relu")
class ReLUSAE(SAE):
    """Standard ReLU SAE (SAELens ``standard``)."""

    default_l1_coefficient: ClassVar[float] = 5.0
    default_unit_decoder: ClassVar[bool] = False
    default_l1_penalty: ClassVar[str] = "decoder_norm"

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        check_nonnegative(cfg, "l1_coefficient")
        if not isinstance(cfg.arch.get("unit_decoder", False), bool):
            raise LorascopeError(
                "relu SAE: unit_decoder must be true or false",
                fix="pass unit_decoder=True or unit_decoder=False",
            )
        if cfg.arch.get("l1_penalty", cls.default_l1_penalty) not in L1_PENALTIES:
            raise LorascopeError(
                f"relu SAE: unknown l1_penalty {cfg.arch.get('l1_penalty')!r}",
                fix=f"use one of: {', '.join(L1_PENALTIES)}",
            )

    @property
    def l1_coefficient(self) -> float:
        return float(self.cfg.arch.get("l1_coefficient", self.default_l1_coefficient))

    @property
    def unit_decoder(self) -> bool:
        return bool(self.cfg.arch.get("unit_decoder", self.default_unit_decoder))

    @property
    def l1_penalty(self) -> str:
        return str(self.cfg.arch.get("l1_penalty", self.default_l1_penalty))

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

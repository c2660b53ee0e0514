"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): f = pre * H(pre - theta), theta > 0 per latent.

Training learns log(theta) with straight-through estimators using a rectangle kernel K(u) = 1[|u| < 1/2] of
bandwidth eps:
  d JumpReLU / d theta := -(theta / eps) K((pre - theta) / eps),   d JumpReLU / d pre = H(pre - theta);
  d H(pre - theta) / d theta := -(1 / eps) K((pre - theta) / eps), d H / d pre = 0.
Loss = mean_tokens ||x - x_hat||^2 + l0_coefficient * sparsity_scale * mean_tokens sum_i H(pre_i - theta_i),
with sparsity_scale the trainer's linear warmup of the coefficient.

Settings (:class:`JumpReLUSettings`): ``l0_coefficient`` (default 1e-3, the value the study has always
used), ``bandwidth`` (eps, default 0.05), ``threshold_init`` (default 0.1). Units: the trainer scales inputs
to mean norm sqrt(d_in), so pre-activations are O(1).
``threshold`` [d_sae] is the inference parameter (what is saved); ``log_threshold`` is what the optimiser
updates, copied into ``threshold`` after every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorascope.saes.base import (
    SAE,
    NonNegativeFloat,
    PositiveFloat,
    SAEConfig,
    SAESettings,
    TrainContext,
    TrainOutput,
    register,
)


def _window(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


def _save_theta(ctx, pre: torch.Tensor, log_theta: torch.Tensor, eps: float) -> torch.Tensor:
    """θ = exp(log θ), saved with ``pre`` and the bandwidth for the straight-through backward."""
    theta = log_theta.exp()
    ctx.save_for_backward(pre, theta)
    ctx.eps = eps
    return theta


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, log_theta, eps: float):
        theta = _save_theta(ctx, pre, log_theta, eps)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        g_pre = grad * (pre > theta)
        # d/dtheta, then chain rule d theta / d log_theta = theta
        g_theta = (grad * -(theta / ctx.eps) * _window(pre, theta, ctx.eps)).sum(0)
        return g_pre, g_theta * theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, log_theta, eps: float):
        theta = _save_theta(ctx, pre, log_theta, eps)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        g_theta = (grad * -(1.0 / ctx.eps) * _window(pre, theta, ctx.eps)).sum(0)
        return None, g_theta * theta, None


class JumpReLUSettings(SAESettings):
    """JumpReLU settings: L0 penalty, straight-through bandwidth, initial threshold."""

    l0_coefficient: NonNegativeFloat = 1e-3
    bandwidth: PositiveFloat = 0.05
    threshold_init: PositiveFloat = 0.1


@register("jumprelu", JumpReLUSettings)
class JumpReLUSAE(SAE):
    """JumpReLU SAE; see module docstring."""

    settings: JumpReLUSettings
    has_threshold = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold.requires_grad_(False)
        self.log_threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.threshold.dtype))

    @property
    def bandwidth(self) -> float:
        return self.settings.bandwidth

    @property
    def l0_coefficient(self) -> float:
        return self.settings.l0_coefficient

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        super().reset_parameters(generator)
        self.log_threshold.fill_(math.log(self.settings.threshold_init))
        self.sync_threshold()

    @torch.no_grad()
    def sync_threshold(self) -> None:
        self.threshold.copy_(self.log_threshold.exp())

    @torch.no_grad()
    def on_load_canonical(self) -> None:
        """After loading saved weights: continue training from the saved threshold."""
        self.log_threshold.copy_(self.threshold.clamp_min(1e-30).log())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        pre = self.pre_acts(x)
        return torch.relu(pre) * (pre > self.threshold)

    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        pre = self.pre_acts(x.to(self.W_enc.dtype))
        codes = _JumpReLU.apply(pre, self.log_threshold, self.bandwidth)
        x_hat = codes @ self.W_dec + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).sum(1).mean()
        l0 = _Step.apply(pre, self.log_threshold, self.bandwidth).sum(1).mean()
        loss = mse + self.l0_coefficient * ctx.sparsity_scale * l0
        return TrainOutput(loss, x_hat, codes.detach() != 0, {"mse": mse.detach(), "l0_penalty": l0.detach()})

    @torch.no_grad()
    def post_step(self) -> None:
        super().post_step()
        self.sync_threshold()

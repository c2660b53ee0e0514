"""BatchTopK SAE (Bussmann et al. 2024): training keeps the N*k largest ReLU'd pre-activations of the whole
batch of N tokens (so L0 averages k but varies per token); a global threshold, the running average of the
smallest kept activation, turns the trained SAE into a JumpReLU for inference (saved as SAELens ``jumprelu``).

Settings (:class:`BatchTopKSettings`): ``k`` (required), ``k_aux``, ``auxk_coefficient`` as for TopK,
``threshold_momentum`` (EMA rate of the threshold estimate, default 0.01; the first training step sets it
directly).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, Strict

from lorascope.distributed import batch_topk
from lorascope.saes._sparse import Selection
from lorascope.saes.base import SAEConfig, TrainContext, register
from lorascope.saes.topk import TopKSAE, TopKSettings


class BatchTopKSettings(TopKSettings):
    """TopK's settings plus the EMA rate of the inference threshold."""

    threshold_momentum: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.01


@register("batchtopk", BatchTopKSettings)
class BatchTopKSAE(TopKSAE):
    """BatchTopK at training time, JumpReLU with a shared threshold (stored per latent) at inference."""

    settings: BatchTopKSettings
    has_threshold = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold.requires_grad_(False)  # estimated, not learned
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        pre = self.pre_acts(x)
        return F.relu(pre) * (pre > self.threshold)

    def _select(self, pre: torch.Tensor, ctx: TrainContext) -> tuple[torch.Tensor, Selection]:
        n = pre.shape[0]
        v, flat = batch_topk(F.relu(pre).reshape(-1), self.k, n, ctx.share)
        keep = v > 0
        flat, perm = flat[keep].sort()
        v = v[keep][perm]
        if self.training and v.numel():
            self._update_threshold(v.min())
        return v, Selection.from_flat(flat, n, self.d_sae)

    def _active_ids(self, codes: torch.Tensor, sel: Selection) -> torch.Tensor:
        return sel.cols  # every kept pair is positive

    @torch.no_grad()
    def on_load_canonical(self) -> None:
        self.threshold_updates.fill_(1)  # further training refines the loaded threshold

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: torch.Tensor) -> None:
        m = self.settings.threshold_momentum
        value = smallest_kept.to(self.threshold.dtype)
        if int(self.threshold_updates) == 0:
            self.threshold.fill_(value)
        else:
            self.threshold.mul_(1 - m).add_(m * value)
        self.threshold_updates += 1

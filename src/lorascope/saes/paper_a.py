"""The adapter SAE of "Feature Geometry of LoRA Adapters" (arXiv 2605.28896), as its display equations state it.

    h_Δ = h_adapted − h_base;   h̃_Δ = h_Δ / σ,   σ = (1/N) Σ_i ‖h_Δ⁽ⁱ⁾‖₂   (mean norm over the training tokens)
    z = ReLU(W_enc (h̃_Δ − b_dec) + b_enc),   ĥ = W_dec z + b_dec,   L = ‖h̃_Δ − ĥ‖² + λ₁ ‖z‖₁

So: a ReLU SAE with the *plain* L1 of the codes (``l1_penalty="plain"``; the decoder-norm-weighted L1 of
``relu`` stays available as ``l1_penalty="decoder_norm"``), trained on inputs divided by their mean norm
(the class sets ``input_norm = "mean_norm"``, which the trainer reads). The trainer folds σ back into the weights
at the end, so the saved SAE applies to raw Δ: encode(Δ) equals the in-training codes of Δ/σ, decode returns
σ·ĥ. The squared error is summed over dimensions and averaged over tokens, like the L1 term.

Not stated by the paper, and chosen here (docs/paper-a.md gives the reasons): unit-norm decoder rows during
training (``unit_decoder=True``; plain L1 without it lets codes shrink while decoder rows grow), λ₁ = 0.2 in
the normalised units (``l1_coefficient``), and the trainer's usual schedule (Adam, warm-up, L1 ramp, decay).
σ is measured on the trainer's first ``init_tokens`` rows: set ``init_tokens`` ≥ the training rows to make it
the mean over every training token, as the paper's sum does.

Saved in SAELens layout as a ``standard`` SAE (inference is a plain ReLU SAE); the lorascope block keeps
``paper_a`` and its settings.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from lorascope.saes.base import NonNegativeFloat, StrictBool, register
from lorascope.saes.relu import ReLUSAE, ReLUSettings


class PaperASettings(ReLUSettings):
    """The paper's recipe as defaults: plain L1, λ₁ = 0.2 in mean-norm-1 units, unit decoder rows in training."""

    l1_coefficient: NonNegativeFloat = 0.2
    unit_decoder: StrictBool = True
    l1_penalty: Literal["decoder_norm", "plain"] = "plain"


@register("paper_a", PaperASettings)
class PaperASAE(ReLUSAE):
    """ReLU + plain L1 on mean-norm-normalised Δ (arXiv 2605.28896, its eqs. for h̃_Δ, z, ĥ and L)."""

    settings: PaperASettings
    input_norm: ClassVar[str] = "mean_norm"

"""Latent scaling: how strongly base and fine-tuned activations carry each reference-dictionary latent.

Minder et al. 2025 ("Robustly identifying concepts introduced during chat fine-tuning using crosscoders") fit, per
latent j with decoder direction d_j and activations f_j(t), the scalar that best explains a target y_t along d_j:

    β_j = argmin_β Σ_t ‖y_t − β f_j(t) d_j‖²  =  Σ_t f_j(t) (d_j · y_t)  /  (‖d_j‖² Σ_t f_j(t)²)

(closed form; their implementation: diffing-toolkit ``utils/dictionary/latent_scaling/closed_form.py``). Here the
latents are those of a reference SAE (trained on base activations), f_j is its encoding of the *fine-tuned*
residual h_ft, and the two targets are h_ft and h_base at the same tokens. β_ft ≈ 1 by construction of a good SAE;
β_base / β_ft < 1 says the base residual carries less of that latent where the fine-tune has it — the fine-tune
strengthened it; > 1, weakened it. Sums stream over batches in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from lorascope.errors import LorascopeError


@dataclass
class LatentScaling:
    """Streaming sums for the closed-form β of F latents against named targets."""

    decoder: torch.Tensor  # [F, d]
    targets: tuple[str, ...] = ("ft", "base")

    def __post_init__(self) -> None:
        if self.decoder.ndim != 2:
            raise LorascopeError(f"decoder must be [F, d], got {tuple(self.decoder.shape)}", fix="pass W_dec")
        F = self.decoder.shape[0]
        self._D = self.decoder.double()
        self.numerator = {t: torch.zeros(F, dtype=torch.float64) for t in self.targets}
        self.code_energy = torch.zeros(F, dtype=torch.float64)
        self.count_active = torch.zeros(F, dtype=torch.long)

    def update(self, codes: torch.Tensor, **targets: torch.Tensor) -> None:
        """``codes`` [N, F] latent activations; one [N, d] tensor per target name (e.g. ft=h_ft, base=h_base)."""
        if set(targets) != set(self.targets):
            raise LorascopeError(
                f"update needs targets {sorted(self.targets)}, got {sorted(targets)}",
                fix="pass one activation tensor per target name",
            )
        f = codes.double()
        if f.ndim != 2 or f.shape[1] != self._D.shape[0]:
            raise LorascopeError(
                f"codes must be [N, {self._D.shape[0]}], got {tuple(codes.shape)}",
                fix="encode the activations with the same dictionary",
            )
        for name, y in targets.items():
            if y.shape != (f.shape[0], self._D.shape[1]):
                raise LorascopeError(
                    f"target {name!r} must be [{f.shape[0]}, {self._D.shape[1]}], got {tuple(y.shape)}",
                    fix="one activation row per code row",
                )
            self.numerator[name] += (f * (y.double() @ self._D.T)).sum(0)
        self.code_energy += (f * f).sum(0)
        self.count_active += (f != 0).sum(0)

    def betas(self) -> dict[str, torch.Tensor]:
        """{target: β [F]} (NaN for latents that never fired)."""
        denom = self.code_energy * (self._D * self._D).sum(1)
        out = {}
        for name, num in self.numerator.items():
            beta = num / denom
            beta[self.count_active == 0] = float("nan")
            out[name] = beta
        return out

    def table(self) -> pd.DataFrame:
        """One row per latent: beta_ft, beta_base, ratio = β_base / β_ft, count_active; sorted by ratio (the
        latents the fine-tune strengthened most come first)."""
        b = self.betas()
        if not {"ft", "base"} <= set(b):
            raise LorascopeError("the table needs the targets 'ft' and 'base'", fix="use the default targets")
        df = pd.DataFrame(
            {
                "latent": range(len(self.count_active)),
                "beta_ft": b["ft"].numpy(),
                "beta_base": b["base"].numpy(),
                "count_active": self.count_active.numpy(),
            }
        )
        df["ratio"] = df["beta_base"] / df["beta_ft"]
        return df.sort_values(["ratio", "latent"], ignore_index=True, na_position="last")


def closed_form_betas(codes: torch.Tensor, decoder: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """β [F] of one target [N, d] for latents with ``codes`` [N, F] and ``decoder`` [F, d] (one batch)."""
    acc = LatentScaling(decoder, ("y",))
    acc.update(codes, y=target)
    return acc.betas()["y"]


__all__ = ["LatentScaling", "closed_form_betas"]

"""Intruder dimensions of a LoRA adapter and the adapter-SAE features that align with them.

Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence") call a top singular vector of
the fine-tuned weight W + ΔW an *intruder* when it is far from every singular vector of the pre-trained W: its
largest |cos| with any base left singular vector is below ε. PEFT ships only the mitigation
(``peft.tuners.lora.intruders.reduce_intruder_dimension``, which edits the model); its detection criterion — among
the ``top_k`` = 10 largest singular vectors of the merged weight, left singular vectors whose max |cos| with the
base's left singular vectors is below ε = 0.5 — is reimplemented here as a pure function with the same defaults.

Left singular vectors live in a module's output space. For modules that write to the residual stream (o_proj,
down_proj; GPT-2 c_proj; out_proj, fc2) they are residual-stream directions (before Gemma2's post-norms), which
can be compared with adapter-SAE decoder directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from lorascope.errors import LorascopeError

RESIDUAL_WRITERS = ("o_proj", "down_proj", "out_proj", "fc2", "c_proj", "dense_4h_to_h")


@dataclass
class Intruders:
    """Intruders of one weight: indices among the merged weight's singular vectors, their max |cos| with the base
    left singular vectors, the unit vectors [n, out] and their singular values."""

    indices: list[int]
    max_cos: torch.Tensor  # [top_k] max |cos| of each top merged left singular vector with the base's
    vectors: torch.Tensor  # [n, out]
    singular_values: torch.Tensor  # [n]


def intruder_dimensions(
    base_weight: torch.Tensor,
    delta_weight: torch.Tensor,
    top_k: int = 10,
    epsilon: float = 0.5,
    base_left: torch.Tensor | None = None,
) -> Intruders:
    """Intruders of W + ΔW against W (both [out, in], the nn.Linear layout), float64 SVDs.

    ``base_left``: W's left singular vectors [out, min(out, in)] if already computed (shared by every adapter of
    one base model).
    """
    if base_weight.shape != delta_weight.shape or base_weight.ndim != 2:
        raise LorascopeError(
            f"base and delta weights must be equal-shaped matrices, got {tuple(base_weight.shape)} "
            f"and {tuple(delta_weight.shape)}",
            fix="pass [out, in] weights of one module",
        )
    W = base_weight.double()
    U_base = torch.linalg.svd(W, full_matrices=False)[0] if base_left is None else base_left.double()
    U, S, _ = torch.linalg.svd(W + delta_weight.double(), full_matrices=False)
    k = min(top_k, U.shape[1])
    max_cos = (U[:, :k].T @ U_base).abs().max(dim=1).values
    idx = torch.nonzero(max_cos < epsilon).flatten().tolist()
    return Intruders(idx, max_cos, U[:, idx].T.contiguous(), S[idx])


def _oriented(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, ΔW) of a PEFT LoRA layer in [out, in] layout (GPT-2 Conv1D stores [in, out])."""
    W = layer.get_base_layer().weight.detach()
    dW = layer.get_delta_weight(adapter).detach()
    if getattr(layer, "fan_in_fan_out", False):
        W, dW = W.T, dW.T
    return W, dW


def adapter_intruders(
    peft_model: torch.nn.Module,
    adapter: str,
    top_k: int = 10,
    epsilon: float = 0.5,
    base_cache: dict[str, torch.Tensor] | None = None,
) -> dict[str, Intruders]:
    """{module name: Intruders} for every LoRA layer of ``adapter``. Pass the same ``base_cache`` dict for every
    adapter of one base model: the base weights' SVDs are then computed once (they dominate the cost)."""
    from lorascope.models.lora_switch import lora_layers

    cache = {} if base_cache is None else base_cache
    out = {}
    for name, layer in lora_layers(peft_model, adapter).items():
        W, dW = _oriented(layer, adapter)
        if name not in cache:
            cache[name] = torch.linalg.svd(W.double(), full_matrices=False)[0]
        out[name] = intruder_dimensions(W, dW, top_k, epsilon, base_left=cache[name])
    return out


def writes_residual(module_name: str) -> bool:
    return module_name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS


def intruder_counts(found: dict[str, Intruders], adapter: str = "") -> pd.DataFrame:
    """Tidy counts: adapter, module, n_intruders, min max-|cos|, residual_writer."""
    return pd.DataFrame(
        [
            {
                "adapter": adapter,
                "module": m,
                "n_intruders": len(x.indices),
                "min_max_cos": float(x.max_cos.min()),
                "residual_writer": writes_residual(m),
            }
            for m, x in found.items()
        ]
    )


def residual_intruders(found: dict[str, Intruders], d_model: int) -> tuple[torch.Tensor, list[str]]:
    """Stacked residual-stream intruder vectors [n, d_model] of residual-writing modules and their labels."""
    vecs, labels = [], []
    for m, x in found.items():
        if writes_residual(m) and x.vectors.shape[1] == d_model:
            vecs.append(x.vectors)
            labels += [f"{m}#{i}" for i in x.indices]
    return (torch.cat(vecs) if vecs else torch.zeros(0, d_model, dtype=torch.float64)), labels


def align_features(
    decoder: torch.Tensor, vectors: torch.Tensor, labels: list[str], quantile: float = 0.99, top: int = 3
) -> pd.DataFrame:
    """For each intruder vector, the ``top`` decoder rows by |cos| (singular vectors have no sign), with
    ``aligned`` = |cos| above the random-dictionary threshold (family-wise over the vectors; |cos| over F atoms is
    treated as the signed maximum over 2F atoms, accurate to second order in the tail probability)."""
    from lorascope.geometry.families import random_match_threshold

    if vectors.shape[0] == 0:
        return pd.DataFrame(columns=["intruder", "feature", "abs_cos", "aligned"])
    D = decoder.double()
    D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    V = vectors.double() / vectors.double().norm(dim=1, keepdim=True)
    cos = (V @ D.T).abs()
    thr = random_match_threshold(D.shape[1], 2 * D.shape[0], V.shape[0], quantile)
    vals, idx = cos.topk(min(top, D.shape[0]), dim=1)
    rows = [
        {
            "intruder": labels[i],
            "feature": int(idx[i, j]),
            "abs_cos": float(vals[i, j]),
            "aligned": bool(vals[i, j] >= thr),
        }
        for i in range(V.shape[0])
        for j in range(vals.shape[1])
    ]
    out = pd.DataFrame(rows)
    out.attrs["threshold"] = thr
    return out


__all__ = [
    "RESIDUAL_WRITERS",
    "Intruders",
    "adapter_intruders",
    "align_features",
    "intruder_counts",
    "intruder_dimensions",
    "residual_intruders",
    "writes_residual",
]

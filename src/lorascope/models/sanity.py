"""Adapter sanity gate: is each adapter worth analysing, and do the adapters of one rank trend share a recipe?

Checks (each gives a :class:`SanityWarning` with a one-line message; ``exclude=True`` marks an adapter the study
must drop, with that line as the reason):

* **non-finite weights** (NaN/inf in any lora_A/lora_B: a diverged run) -> exclude;
* **no-op** (every module's update (α/r)·B·A is exactly zero — PEFT's default B = 0 init, never trained — or the
  measured Δ is negligible against the base residual) -> exclude;
* **did not learn** (held-out loss on its own task not below the base model's by ``min_gain``) -> warn;
* **different recipes** (target modules, layers, α/r, dropout, DoRA/rsLoRA, and from training metadata the data,
  steps, learning rate, batch size) among adapters entering one rank trend -> warn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lorascope.errors import LorascopeError

TRAINING_METADATA = "training_metadata.json"  # optional file beside adapter_config.json
CONFIG_FIELDS = (
    "target_modules",
    "layers_to_transform",
    "alpha_over_r",
    "lora_dropout",
    "use_dora",
    "use_rslora",
    "base_model_name_or_path",
)
METADATA_FIELDS = ("data", "steps", "lr", "batch_size", "max_length")


@dataclass(frozen=True)
class SanityWarning:
    adapter: str
    kind: str  # "non_finite" | "no_op" | "did_not_learn" | "recipe"
    message: str
    exclude: bool = False


def _module_pairs(weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module prefix: {"A": lora_A weight, "B": lora_B weight}} from PEFT parameter or file keys."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in weights.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key or key.endswith(f".{part}"):
                out.setdefault(key.split(f".{part}")[0], {})[part[-1]] = w
    return out


def update_norms(weights: Mapping[str, torch.Tensor], scaling: float = 1.0) -> dict[str, float]:
    """Frobenius norm of each module's LoRA update scaling·B·A (via traces of r×r Gram matrices, float64)."""
    norms = {}
    for module, ab in _module_pairs(weights).items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LorascopeError(f"LoRA module {module} lacks {missing}", fix="pass the adapter's complete weights")
        A, B = ab["A"].double(), ab["B"].double()
        sq = torch.trace((B.T @ B) @ (A @ A.T))
        norms[module] = abs(scaling) * math.sqrt(max(float(sq), 0.0)) if torch.isfinite(sq) else float("nan")
    return norms


def check_weights(adapter: str, weights: Mapping[str, torch.Tensor], scaling: float = 1.0) -> list[SanityWarning]:
    """Non-finite or all-zero LoRA weights (``weights``: PEFT parameter names or adapter file keys -> tensors)."""
    pairs = _module_pairs(weights)
    if not pairs:
        raise LorascopeError(f"adapter {adapter!r}: no lora_A/lora_B weights found", fix="pass the LoRA weights")
    bad = sorted(k for k, w in weights.items() if ("lora_A" in k or "lora_B" in k) and not torch.isfinite(w).all())
    if bad:
        return [
            SanityWarning(
                adapter,
                "non_finite",
                f"adapter {adapter!r} has NaN/inf weights in {len(bad)} "
                f"tensor(s) (first: {bad[0]}): the training diverged; excluded",
                exclude=True,
            )
        ]
    norms = update_norms(weights, scaling)
    if max(norms.values()) == 0.0:
        return [
            SanityWarning(
                adapter,
                "no_op",
                f"adapter {adapter!r} is a no-op: its update B·A is exactly zero "
                f"in all {len(norms)} modules (untrained B = 0?); excluded",
                exclude=True,
            )
        ]
    return []


def check_delta(adapter: str, delta_rms: float, base_rms: float, rel_tol: float = 1e-6) -> list[SanityWarning]:
    """Measured residual Δ negligible against the base residual (RMS ratio below ``rel_tol``) -> no-op."""
    if not math.isfinite(delta_rms):
        return [
            SanityWarning(
                adapter, "non_finite", f"adapter {adapter!r}: residual Δ is not finite; excluded", exclude=True
            )
        ]
    if delta_rms <= rel_tol * base_rms:
        return [
            SanityWarning(
                adapter,
                "no_op",
                f"adapter {adapter!r} changes nothing measurable: RMS Δ = "
                f"{delta_rms:.3g} vs base RMS {base_rms:.3g}; excluded",
                exclude=True,
            )
        ]
    return []


def check_learning(adapter: str, loss_base: float, loss_adapted: float, min_gain: float = 0.0) -> list[SanityWarning]:
    """Held-out response loss on the adapter's own task not below the base's by more than ``min_gain`` nats."""
    if not loss_adapted < loss_base - min_gain:
        return [
            SanityWarning(
                adapter,
                "did_not_learn",
                f"adapter {adapter!r} did not learn its task: held-out loss "
                f"{loss_adapted:.4f} vs base {loss_base:.4f} nats/token",
            )
        ]
    return []


def recipe_from_config(adapter_config: Mapping, training_metadata: Mapping | None = None) -> dict:
    """The fields of a training recipe that must agree across a rank trend (α/r rather than α: ranks differ)."""
    r = adapter_config.get("r")
    alpha = adapter_config.get("lora_alpha")
    tm = adapter_config.get("target_modules")
    recipe = {
        "target_modules": sorted(tm) if isinstance(tm, (list, tuple, set)) else tm,
        "layers_to_transform": adapter_config.get("layers_to_transform"),
        "alpha_over_r": float(alpha) / float(r) if r and alpha is not None else None,
        "lora_dropout": adapter_config.get("lora_dropout"),
        "use_dora": bool(adapter_config.get("use_dora", False)),
        "use_rslora": bool(adapter_config.get("use_rslora", False)),
        "base_model_name_or_path": adapter_config.get("base_model_name_or_path"),
    }
    meta = dict(training_metadata or {})
    recipe.update({k: meta[k] for k in METADATA_FIELDS if k in meta})
    return recipe


def recipe_from_folder(folder: str | Path) -> dict:
    """Recipe of a saved PEFT adapter: adapter_config.json plus, when present, ``training_metadata.json``."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise LorascopeError(f"{folder} has no adapter_config.json", fix="point at a saved PEFT adapter folder")
    meta_path = folder / TRAINING_METADATA
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    return recipe_from_config(json.loads(cfg_path.read_text()), meta)


def check_recipes(recipes: Mapping[str, Mapping]) -> list[SanityWarning]:
    """One warning per recipe field on which the adapters of one rank trend disagree (a field missing from some
    adapters' metadata is not compared)."""
    out = []
    for field in CONFIG_FIELDS + METADATA_FIELDS:
        have = {name: rec[field] for name, rec in recipes.items() if field in rec}
        values = {json.dumps(v, sort_keys=True, default=str) for v in have.values()}
        if len(have) >= 2 and len(values) > 1:
            shown = ", ".join(f"{n}={v!r}" for n, v in have.items())
            out.append(
                SanityWarning(
                    ",".join(have),
                    "recipe",
                    f"adapters in one rank trend differ in {field}: {shown}; the trend mixes rank with recipe",
                )
            )
    return out


def excluded(warnings: list[SanityWarning]) -> dict[str, str]:
    """{adapter: one-line reason} for every adapter the gate excludes."""
    out: dict[str, str] = {}
    for w in warnings:
        if w.exclude:
            out.setdefault(w.adapter, w.message)
    return out


__all__ = [
    "SanityWarning",
    "TRAINING_METADATA",
    "check_delta",
    "check_learning",
    "check_recipes",
    "check_weights",
    "excluded",
    "recipe_from_config",
    "recipe_from_folder",
    "update_norms",
]

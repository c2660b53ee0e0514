"""Module attribution: which adapted modules write each adapter-SAE feature's share of Δ at layer L.

Decomposition (exact by construction). Write block l as h_l = F_l(h_{l-1}) (block output, residual included) and
Δ_L = h^adapted_L − h^base_L. Telescoping over blocks,

    Δ_L = Σ_{l ≤ L} [F^adapted_l(h^a_{l-1}) − F^base_l(h^a_{l-1})]   (what the adapter writes in block l)
        + Σ_{l ≤ L} [F^base_l(h^a_{l-1}) − F^base_l(h^b_{l-1})]      (base blocks reacting to changed inputs)

The **direct write** of a LoRA module m in block l is the change of block l's output when only m's LoRA update is
switched on, with the block's input taken from the adapted forward pass:
d_{m,l} = F^{only m}_l(h^a_{l-1}) − F^base_l(h^a_{l-1}). For down_proj (Llama-style blocks) d is exactly the
LoRA output (α/r)·B·A·x, a residual write, with x the module's input when only m is on in its block; for o_proj it
is that residual write plus the same block's MLP response to it; for q/k/v/gate/up it is the update carried through
attention and/or the MLP (one-module ablation, nonlinearities kept; Gemma2's post-norms act on every write).
The **remainder** is Δ_L − Σ d: interactions between modules of
one block plus every indirect effect through later computation. A feature f with encoder row e_f (raw-Δ units)
gets contribution c_{f,m} = Σ_t w_{t,f} e_f·d_{m}(t), and remainder_f = Σ_t w_{t,f} e_f·Δ_L(t) − Σ_m c_{f,m}, so
shares plus remainder sum exactly (float64 sums) to the feature's linear pre-activation.

Direct-write attribution of a fine-tune to modules follows the direct-logit / residual-decomposition view of
Elhage et al. 2021 ("A Mathematical Framework for Transformer Circuits"), applied to LoRA deltas.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lorascope.errors import LorascopeError
from lorascope.models.lora_switch import LoraSwitch, block_lora_layers
from lorascope.models.residual import check_layers, decoder_blocks


class _Stop(Exception):
    pass


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def run_to_layer(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    record_inputs: bool = False,
) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """Residual stream after block ``layer`` [B, T, d] and (optionally) the (args, kwargs) every block 0..layer
    was called with, so single blocks can be re-run on the same inputs. The forward stops after ``layer``."""
    blocks = decoder_blocks(model)
    calls: list[tuple[tuple, dict]] = []
    out: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs):
        calls.append((args, kwargs))

    def post(_m, _args, output):
        out["h"] = _hidden(output).detach().clone()
        raise _Stop

    handles = [blocks[layer].register_forward_hook(post)]
    if record_inputs:
        handles += [blocks[i].register_forward_pre_hook(pre, with_kwargs=True) for i in range(layer + 1)]
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    try:
        model(**kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out["h"], calls


def rerun_block(block: torch.nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    """Block output for the recorded (args, kwargs)."""
    args, kwargs = call
    return _hidden(block(*args, **kwargs))


@dataclass
class ModuleAttribution:
    """Sums over the selected tokens (float64). ``modules[i]`` is ``"{layer}.{module path in the block}"``.

    contribution [F, M]: Σ_t w·e_f·d_m; total [F]: Σ_t w·e_f·Δ_L; delta_dot [M]: Σ_t d_m·Δ_L;
    delta_energy: Σ_t ‖Δ_L‖²; write_norm [M]: Σ_t ‖d_m‖.
    """

    adapter: str
    layer: int
    modules: list[str]
    contribution: torch.Tensor
    total: torch.Tensor
    delta_dot: torch.Tensor
    delta_energy: float
    write_norm: torch.Tensor
    n_tokens: int

    @property
    def remainder(self) -> torch.Tensor:
        """[F]: the part of each feature's projection not written directly by any module."""
        return self.total - self.contribution.sum(1)

    @property
    def shares(self) -> torch.Tensor:
        """[F, M] contribution / total (NaN where a feature's total is 0)."""
        return self.contribution / self.total.unsqueeze(1)

    def merge(self, other: ModuleAttribution) -> ModuleAttribution:
        """Sums over two token sets (e.g. two batches) of the same adapter, layer and features."""
        if (self.adapter, self.layer, self.modules) != (other.adapter, other.layer, other.modules):
            raise LorascopeError("cannot merge attributions of different adapters, layers or modules")
        return ModuleAttribution(
            self.adapter,
            self.layer,
            self.modules,
            self.contribution + other.contribution,
            self.total + other.total,
            self.delta_dot + other.delta_dot,
            self.delta_energy + other.delta_energy,
            self.write_norm + other.write_norm,
            self.n_tokens + other.n_tokens,
        )

    def table(self, feature_ids: list[int] | None = None) -> list[dict]:
        """Tidy rows (adapter, feature, module, contribution, share), one ``"remainder"`` row per feature."""
        ids = list(range(self.total.shape[0])) if feature_ids is None else list(feature_ids)
        rows = []
        for i, f in enumerate(ids):
            tot = float(self.total[i])
            parts = [(m, float(self.contribution[i, j])) for j, m in enumerate(self.modules)]
            parts.append(("remainder", float(self.remainder[i])))
            rows += [
                {
                    "adapter": self.adapter,
                    "layer": self.layer,
                    "feature": int(f),
                    "module": m,
                    "contribution": c,
                    "share": c / tot if tot else float("nan"),
                }
                for m, c in parts
            ]
        return rows

    def top_modules(self, n: int = 10) -> list[dict]:
        """Modules ranked by their share of Δ_L's energy, Σ_t d_m·Δ / Σ_t ‖Δ‖² (shares + remainder sum to 1)."""
        share = self.delta_dot / self.delta_energy if self.delta_energy > 0 else torch.zeros_like(self.delta_dot)
        order = torch.argsort(share, descending=True)[:n].tolist()
        return [
            {
                "adapter": self.adapter,
                "module": self.modules[j],
                "delta_share": float(share[j]),
                "mean_write_norm": float(self.write_norm[j]) / max(self.n_tokens, 1),
            }
            for j in order
        ]


def _check_inputs(encoder_rows: torch.Tensor, d: int, token_weights: torch.Tensor | None, n_sel: int) -> None:
    if encoder_rows.ndim != 2 or encoder_rows.shape[1] != d:
        raise LorascopeError(
            f"encoder_rows must be [F, {d}], got {tuple(encoder_rows.shape)}",
            fix="pass W_enc.T of the adapter SAE (in raw-Δ units)",
        )
    if token_weights is not None and tuple(token_weights.shape) != (n_sel, encoder_rows.shape[0]):
        raise LorascopeError(
            f"token_weights must be [{n_sel}, {encoder_rows.shape[0]}] (selected tokens × "
            f"features), got {tuple(token_weights.shape)}",
            fix="one weight per token and feature",
        )


def _counted_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """bool [B, T]: ``token_mask`` if given, else the attention mask (else every token)."""
    if token_mask is not None:
        return token_mask.bool()
    return attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)


def _linear_layers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The block's weight matrices as modules: LoRA base layers and plain linear / GPT-2 Conv1D layers (not the
    LoRA A/B factors)."""
    from transformers.pytorch_utils import Conv1D

    return [m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear | Conv1D) and "lora_" not in name]


@contextmanager
def reuse_unchanged_linears(block: torch.nn.Module) -> Iterator[None]:
    """Within it, every linear layer of ``block`` (:func:`_linear_layers`) keeps its first (input, output) and
    returns a copy of that output whenever it is called again with an equal input, instead of recomputing it.

    The block's single-module reruns then recompute only what the enabled module changes (e.g. with only
    ``down_proj`` on, every base weight sees the inputs of the rerun with none). Outputs are bitwise those of
    plain reruns: a linear layer is a deterministic function of its input."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = _linear_layers(block)
    saved = [m.__dict__.get("forward") for m in layers]

    def memo(mod: torch.nn.Module, forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hit = seen.get(id(mod))
        if args or kwargs or (hit is not None and not (hit[0].shape == x.shape and torch.equal(hit[0], x))):
            return forward(x, *args, **kwargs)
        if hit is None:
            out = forward(x)
            seen[id(mod)] = (x.clone(), out.clone())
            return out
        return hit[1].clone()

    try:
        for m, fwd in zip(layers, saved, strict=True):
            m.forward = functools.partial(memo, m, fwd or m.forward)
        yield
    finally:
        for m, fwd in zip(layers, saved, strict=True):
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd


def _module_writes(switch: LoraSwitch, block, call, modules: dict, mask: torch.Tensor):
    """Yields (module name, its direct write [N, d] float64 at the ``mask``ed tokens): block rerun on its recorded
    inputs ``call`` with only that LoRA module enabled, minus the rerun with none (weights whose inputs the module
    does not change are not recomputed: :func:`reuse_unchanged_linears`)."""
    with reuse_unchanged_linears(block):
        with switch.only(enabled=[]):
            base_out = rerun_block(block, call).double()
        for name, mod in modules.items():
            with switch.only(enabled=[mod]):
                write = (rerun_block(block, call).double() - base_out)[mask]  # [N, d]
            yield name, write


@torch.no_grad()
def attribute_features(
    peft_model: torch.nn.Module,
    adapter: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    encoder_rows: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> ModuleAttribution:
    """Direct-write decomposition of features' projections e_f·Δ_L over one batch (see the module docstring).

    ``encoder_rows`` [F, d]: one encoder direction per feature, in raw-Δ units. ``token_mask`` [B, T] bool picks the
    tokens that count (default: the attention mask, e.g. pass held-out response tokens minus scaffolding);
    ``token_weights`` [N_selected, F] weights them per feature (e.g. 1 where the feature fires; default 1).
    Costs 2 truncated forwards plus (1 + modules) re-runs of each block ≤ L.
    """
    layer = check_layers(peft_model, [layer])[0]
    blocks = decoder_blocks(peft_model)
    per_block = block_lora_layers(peft_model, adapter)
    mask = _counted_tokens(input_ids, attention_mask, token_mask)
    switch = LoraSwitch(peft_model, adapter)
    with switch.only():
        h_adapted, calls = run_to_layer(peft_model, input_ids, attention_mask, layer, record_inputs=True)
    with switch.only(enabled=[]):
        h_base, _ = run_to_layer(peft_model, input_ids, attention_mask, layer)
    delta = (h_adapted.double() - h_base.double())[mask]  # [N, d]
    E = encoder_rows.double()
    _check_inputs(E, delta.shape[1], token_weights, delta.shape[0])
    w = torch.ones(delta.shape[0], E.shape[0], dtype=torch.float64) if token_weights is None else token_weights.double()
    names, contrib, dots, norms = [], [], [], []
    for lyr in range(layer + 1):
        if not per_block[lyr]:
            continue
        for name, write in _module_writes(switch, blocks[lyr], calls[lyr], per_block[lyr], mask):
            names.append(f"{lyr}.{name}")
            contrib.append(((write @ E.T) * w).sum(0))
            dots.append((write * delta).sum())
            norms.append(write.norm(dim=1).sum())
    if not names:
        raise LorascopeError(
            f"adapter {adapter!r} adapts no module in blocks 0..{layer}",
            fix="choose a layer at or after the first adapted block",
        )
    total = ((delta @ E.T) * w).sum(0)
    return ModuleAttribution(
        adapter,
        layer,
        names,
        torch.stack(contrib, 1),
        total,
        torch.stack(dots),
        float((delta * delta).sum()),
        torch.stack(norms),
        int(delta.shape[0]),
    )


__all__ = ["ModuleAttribution", "attribute_features", "rerun_block", "run_to_layer"]

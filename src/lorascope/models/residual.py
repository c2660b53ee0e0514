"""Residual-stream capture: the output of decoder block L (the residual stream after block L).

The capture of the last block is taken *before* the final norm (``output_hidden_states[-1]`` is after it).
The forward pass stops right after the deepest captured block (a private exception raised from its hook),
which is exact for every captured layer and skips the rest of the network and the LM head.

PEFT mixed batches: pass ``adapter_names=["__base__", ..., "name", ...]`` and a PeftModel; the call goes
through the PeftModel's own forward (the inner model silently ignores ``adapter_names``). PEFT registers its
per-row adapter hooks inside a context manager that does not remove them when an exception passes through it
(peft 0.21), so after a truncated forward we remove every hook the call left behind (``_remove_new_hooks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorascope.errors import LorascopeError

# model_type values whose decoder block output is the residual stream, and where the blocks live.
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt2",
    "phi3",
    "olmo2",
    "granite",
)
_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h")
_NORM_PATHS = ("model.norm", "model.language_model.norm", "transformer.ln_f")


class _StopForward(Exception):
    """Raised from the hook of the deepest captured block to end the forward pass early."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _get_path(root: object, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _model_type(inner: torch.nn.Module) -> str:
    return str(getattr(getattr(inner, "config", None), "model_type", type(inner).__name__))


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of a supported causal LM (through a PeftModel wrapper)."""
    inner = unwrap_model(model)
    mtype = _model_type(inner)
    if mtype in SUPPORTED_MODEL_TYPES:
        for path in _BLOCK_PATHS:
            blocks = _get_path(inner, path)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
                return blocks
    raise LorascopeError(
        f"residual-stream capture does not support architecture {mtype!r} ({type(inner).__name__})",
        fix=f"use a decoder of type {', '.join(SUPPORTED_MODEL_TYPES)} "
        "(Llama, Mistral, Qwen2/3, Gemma/Gemma2/3, GPT-2 style)",
    )


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied after the last block (``model.norm`` / ``transformer.ln_f``)."""
    inner = unwrap_model(model)
    for path in _NORM_PATHS:
        norm = _get_path(inner, path)
        if isinstance(norm, torch.nn.Module):
            return norm
    raise LorascopeError(f"cannot find the final norm of {type(inner).__name__}", fix="use a supported decoder")


def num_layers(model: torch.nn.Module) -> int:
    return len(decoder_blocks(model))


def check_layers(model: torch.nn.Module, layers: Sequence[int]) -> list[int]:
    """Validated, sorted, de-duplicated layer indices (0-based block indices)."""
    n = num_layers(model)
    out = sorted({int(x) for x in layers})
    if not out:
        raise LorascopeError("no layers given", fix=f"choose layers in 0..{n - 1}")
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise LorascopeError(
            f"layer {bad[0]} is out of range: this model has {n} blocks", fix=f"choose layers in 0..{n - 1}"
        )
    return out


def _hook_ids(modules: Sequence[torch.nn.Module]) -> list[tuple[set, set]]:
    return [(set(m._forward_pre_hooks), set(m._forward_hooks)) for m in modules]


def _remove_new_hooks(modules: Sequence[torch.nn.Module], before: list[tuple[set, set]]) -> int:
    """Remove forward (pre-)hooks registered during a call that ended with an exception; returns how many."""
    removed = 0
    for m, (pre, post) in zip(modules, before, strict=True):
        for hooks, known in ((m._forward_pre_hooks, pre), (m._forward_hooks, post)):
            for key in [k for k in hooks if k not in known]:
                del hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed


@dataclass
class ResidualCapture:
    """Reusable capture of the residual stream at ``layers`` (validated once; hooks exist only in a call)."""

    model: torch.nn.Module
    layers: list[int]
    truncate: bool = True
    grouped: bool | None = None  # rows of several adapters: one forward per adapter (lorascope.models.grouped)

    def __post_init__(self) -> None:
        self.layers = check_layers(self.model, self.layers)
        self._blocks = decoder_blocks(self.model)
        self._modules = list(self.model.modules())

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Residual stream after each captured block: {layer: [B, T, d]} in the forward's dtype.

        ``adapter_names`` (one per row; ``"__base__"`` rows use the base model) runs the rows of each adapter as
        one forward with that adapter alone when they are contiguous (on CPU by default: ``grouped``), else as a
        PEFT mixed batch; the numbers are the same.
        """
        if adapter_names is not None:
            _check_mixed(self.model)
            from lorascope.models.grouped import adapter_runs, only_adapter

            runs = adapter_runs(self.model, adapter_names, self.grouped, self._modules)
            if runs is not None:
                parts = []
                for name, s, e in runs:
                    with only_adapter(self.model, name, self._modules):
                        att = attention_mask[s:e] if attention_mask is not None else None
                        parts.append(self(input_ids[s:e], att))
                return {L: torch.cat([p[L] for p in parts]) for L in self.layers}
        captured: dict[int, torch.Tensor] = {}
        deepest = self.layers[-1]

        def make_hook(layer: int):
            def hook(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                captured[layer] = hidden.detach().clone()
                if self.truncate and layer == deepest:
                    raise _StopForward

            return hook

        handles = [self._blocks[L].register_forward_hook(make_hook(L)) for L in self.layers]
        before = _hook_ids(self._modules)
        kwargs: dict = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if adapter_names is not None:
            kwargs["adapter_names"] = list(adapter_names)
        try:
            self.model(**kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            _remove_new_hooks(self._modules, before)
        missing = [L for L in self.layers if L not in captured]
        if missing:
            raise LorascopeError(
                f"block(s) {missing} did not run in the forward pass",
                fix="report this model architecture as unsupported",
            )
        return captured


def _check_mixed(model: torch.nn.Module) -> None:
    """Rows tagged by adapter need a PeftModel in eval mode (PEFT refuses mixed batches in training)."""
    if getattr(model, "get_base_model", None) is None:
        raise LorascopeError("adapter_names needs a PeftModel", fix="load adapters with load_adapters()")
    if model.training:
        raise LorascopeError("PEFT mixed batches need eval mode", fix="call model.eval() first")


def selected_logits(model: torch.nn.Module, mask: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Logits [n_sel, V] of a forward of ``model`` at the positions ``mask`` [B, T] selects (row-major order),
    with the output head applied only there (a forward pre-hook on the head), not at every position: the head of
    a small model is a large part of its forward (SmolLM2-135M: 28M of 134M parameters), and a loss or a KL only
    reads some positions. A head that is itself a LoRA layer gets every position (its adapter rows must line
    up with the batch), then the selected ones are taken. ``forward_kwargs`` go to the model; with
    ``adapter_names`` the rows run as :meth:`ResidualCapture.__call__` runs them (then every other keyword must be
    a tensor with one row per name)."""
    names = forward_kwargs.get("adapter_names")
    if names is not None:
        _check_mixed(model)
        from lorascope.models.grouped import adapter_runs, only_adapter

        runs = adapter_runs(model, names)
        if runs is not None:
            rest = {k: v for k, v in forward_kwargs.items() if k != "adapter_names"}
            parts = []
            for name, s, e in runs:
                with only_adapter(model, name):
                    parts.append(selected_logits(model, mask[s:e], **{k: v[s:e] for k, v in rest.items()}))
            return torch.cat(parts)
    head = unwrap_model(model).get_output_embeddings()
    selects = head is not None and not hasattr(head, "lora_A")
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][mask], *args[1:])) if selects else None
    try:
        logits = model(**forward_kwargs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if selects else logits[mask]


def capture_residuals(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    adapter_names: Sequence[str] | None = None,
    truncate: bool = True,
) -> dict[int, torch.Tensor]:
    """One-shot :class:`ResidualCapture`: {layer: residual stream after block ``layer``, [B, T, d]}."""
    return ResidualCapture(model, list(layers), truncate)(input_ids, attention_mask, adapter_names)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ResidualCapture",
    "capture_residuals",
    "check_layers",
    "decoder_blocks",
    "final_norm",
    "num_layers",
    "selected_logits",
    "unwrap_model",
]

"""Run a PeftModel with one adapter switched on in a chosen subset of its LoRA layers (and off elsewhere).

The analyses of what an adapter writes (module attribution, steering) need forward passes in which the LoRA update
of only some modules is applied. PEFT's public ``set_adapter``/``enable_adapters`` also flip ``requires_grad`` of
the adapter weights, so this context manager sets each LoRA layer's active-adapter list directly (a layer with an
empty list computes exactly its base layer) and restores every layer's previous state on exit. Merged or
non-vanilla (DoRA and other variants) adapters are refused: their update is not an additive ``B A x`` term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from lorascope.errors import LorascopeError
from lorascope.models.residual import decoder_blocks


def lora_layers(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """{qualified module name: LoRA layer} of every layer that holds ``adapter`` (vanilla, unmerged LoRA only)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
            if mod.merged:
                raise LorascopeError(f"adapter {adapter!r} is merged into {name}", fix="unmerge it (or reload)")
            if adapter in getattr(mod, "lora_variant", {}):
                raise LorascopeError(
                    f"{name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA), not plain B·A·x",
                    fix="module attribution and steering support vanilla LoRA adapters",
                )
            out[name] = mod
    if not out:
        raise LorascopeError(
            f"the model holds no LoRA layers of adapter {adapter!r}",
            fix="load the adapter with load_adapters() and pass its name",
        )
    return out


def block_lora_layers(model: torch.nn.Module, adapter: str) -> list[dict[str, torch.nn.Module]]:
    """Per decoder block, {name relative to the block: LoRA layer} of ``adapter`` (empty dict where none)."""
    return [
        {name: mod for name, mod in block.named_modules() if _holds(mod, adapter)} for block in decoder_blocks(model)
    ]


def _holds(mod: torch.nn.Module, adapter: str) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {})


class LoraSwitch:
    """Switches one adapter on in chosen LoRA layers of a model (:meth:`only`); the model's LoRA layers are found
    once, at construction, so that many switches (a module-by-module attribution makes one per module and block)
    do not each walk the whole module tree."""

    def __init__(self, model: torch.nn.Module, adapter: str):
        from peft.tuners.lora import LoraLayer

        self.adapter = adapter
        self.layers = lora_layers(model, adapter)
        self._every = [m for m in model.modules() if isinstance(m, LoraLayer)]

    @contextmanager
    def only(self, enabled: Iterable[torch.nn.Module] | None = None) -> Iterator[None]:
        """Within the block, the adapter is active in the LoRA layers ``enabled`` (None = all of them) and no
        adapter is active in any other LoRA layer; plain (non mixed-batch) forwards then compute that hybrid."""
        on = set(map(id, self.layers.values())) if enabled is None else set(map(id, enabled))
        with set_active(self._every, lambda m: [self.adapter] if id(m) in on else []):
            yield


@contextmanager
def set_active(layers: Iterable[torch.nn.Module], active: Callable[[torch.nn.Module], list[str]]) -> Iterator[None]:
    """Within it each PEFT tuner layer in ``layers`` has the active adapters ``active(layer)`` (enabled); every
    layer's previous active list and enabled flag come back on exit."""
    saved = [(m, m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m, _, _ in saved:
            m._active_adapter = active(m)
            m._disable_adapters = False
        yield
    finally:
        for m, was, disabled in saved:
            m._active_adapter = was
            m._disable_adapters = disabled


def lora_only(model: torch.nn.Module, adapter: str, enabled: Iterable[torch.nn.Module] | None = None):
    """Within the block, ``adapter`` is active in the LoRA layers ``enabled`` (None = all of them) and no adapter is
    active in any other LoRA layer; plain (non mixed-batch) forwards of ``model`` then compute that hybrid. (One
    switch; for many, build a :class:`LoraSwitch` once.)"""
    return LoraSwitch(model, adapter).only(enabled)


__all__ = ["LoraSwitch", "block_lora_layers", "lora_layers", "lora_only", "set_active"]

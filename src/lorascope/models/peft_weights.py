"""Reading a PEFT LoRA adapter's weights by module name (no model needed)."""

from __future__ import annotations

from pathlib import Path

import torch

# modules whose output is added to the residual stream at the end of a block's MLP: Llama/Gemma/Qwen, GPT-2
RESIDUAL_WRITERS = ("mlp.down_proj", "mlp.c_proj")


def lora_update(adapter_dir: str | Path, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) of the LoRA on the map that writes into the residual stream at block ``layer`` (the MLP's down
    projection), or None when the adapter has none there. PEFT stores B [out, r] and A [r, in], for GPT-2's
    Conv1D too; B @ A is the update of that map's weight."""
    from safetensors.torch import load_file

    f = Path(adapter_dir) / "adapter_model.safetensors"
    if not f.is_file():
        return None
    sd = load_file(str(f))
    for mod in RESIDUAL_WRITERS:
        a = [k for k in sd if f".{layer}.{mod}.lora_A" in k]
        b = [k for k in sd if f".{layer}.{mod}.lora_B" in k]
        if a and b:
            return sd[b[0]].float(), sd[a[0]].float()
    return None

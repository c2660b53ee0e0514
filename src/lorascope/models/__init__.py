"""Everything that knows about transformers and PEFT: base models, LoRA adapters, residual-stream capture."""

from lorascope.models.evaluate import BASE, generate, held_out_loss
from lorascope.models.loading import LoadedModel, embedded_gguf_path, load_base
from lorascope.models.lora import LoraSettings, LoraTrainResult, load_adapters, save_adapter, train_lora
from lorascope.models.residual import (
    ResidualCapture,
    capture_residuals,
    check_layers,
    decoder_blocks,
    final_norm,
)

__all__ = [
    "BASE",
    "LoadedModel",
    "LoraSettings",
    "LoraTrainResult",
    "embedded_gguf_path",
    "generate",
    "held_out_loss",
    "load_adapters",
    "load_base",
    "save_adapter",
    "train_lora",
    "ResidualCapture",
    "capture_residuals",
    "check_layers",
    "decoder_blocks",
    "final_norm",
]

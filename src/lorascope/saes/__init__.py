"""SAEs: one interface (base.SAE), a registry by architecture name, a trainer over any batch iterator, and
loaders for the dictionaries people already have. Never imports transformers."""

from lorascope.saes import batchtopk, jumprelu, paper_a, relu, sasa, topk  # noqa: F401  (register the architectures)
from lorascope.saes.base import (
    SAE,
    SAEConfig,
    TrainContext,
    TrainOutput,
    create_sae,
    known_architectures,
    register,
    sae_class,
)
from lorascope.saes.formats import load_sae, save_sae
from lorascope.saes.trainer import TrainerConfig, TrainResult, evaluate_sae, train_sae

__all__ = [
    "SAE",
    "SAEConfig",
    "TrainContext",
    "TrainOutput",
    "TrainResult",
    "TrainerConfig",
    "create_sae",
    "evaluate_sae",
    "known_architectures",
    "load_sae",
    "register",
    "sae_class",
    "save_sae",
    "train_sae",
]

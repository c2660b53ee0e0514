"""SAEs: one interface (base.SAE), a registry by architecture name, a trainer over any batch iterator, and
loaders for the dictionaries people already have. Never imports transformers."""

from lorascope.saes import batchtopk, jumprelu, paper_a, relu, sasa, topk  # noqa: F401  (register the architectures)
from lorascope.saes.base import (
    SAE,
    SAEConfig,
    SAESettings,
    TrainContext,
    TrainOutput,
    create_sae,
    known_architectures,
    parse_settings,
    register,
    sae_class,
    settings_class,
)
from lorascope.saes.batchtopk import BatchTopKSettings
from lorascope.saes.formats import load_sae, save_sae
from lorascope.saes.jumprelu import JumpReLUSettings
from lorascope.saes.paper_a import PaperASettings
from lorascope.saes.relu import ReLUSettings
from lorascope.saes.sasa import SASASettings
from lorascope.saes.topk import TopKSettings
from lorascope.saes.trainer import TrainerConfig, TrainResult, evaluate_sae, train_sae

__all__ = [
    "SAE",
    "BatchTopKSettings",
    "JumpReLUSettings",
    "PaperASettings",
    "ReLUSettings",
    "SAEConfig",
    "SAESettings",
    "SASASettings",
    "TopKSettings",
    "TrainContext",
    "TrainOutput",
    "TrainResult",
    "TrainerConfig",
    "create_sae",
    "evaluate_sae",
    "known_architectures",
    "load_sae",
    "parse_settings",
    "register",
    "sae_class",
    "save_sae",
    "settings_class",
    "train_sae",
]

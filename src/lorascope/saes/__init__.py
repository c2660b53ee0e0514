"""SAEs: one interface (base.SAE), a registry by architecture name, a trainer over any batch iterator, and
loaders for the dictionaries people already have. Never imports transformers."""

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

__all__ = ["SAE", "SAEConfig", "TrainContext", "TrainOutput", "create_sae", "known_architectures", "register",
           "sae_class"]

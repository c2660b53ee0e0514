"""Delta activations h_Δ = h_adapted − h_base of the residual stream: extraction (one mixed-batch forward for base
and every adapter), a sharded resumable store, a seeded streaming reader with a by-document held-out split, and
per-layer statistics computed while extracting."""

from lorascope.activations.extract import FORWARD_DTYPES, ExtractConfig, adapter_fingerprints, extract, tokenize_docs
from lorascope.activations.full import FullExtraction, extract_full
from lorascope.activations.reader import (
    KINDS,
    SPLITS,
    ActivationReader,
    ActivationStore,
    Batch,
    PairedRows,
    ReadOrder,
    open_store,
)
from lorascope.activations.split import HeldOutSplit
from lorascope.activations.stats import DeltaStats
from lorascope.activations.store import DELTA_DEFINITION, finalize_store
from lorascope.activations.tokens import TOKEN_MODES, TokenSelection, select_positions

__all__ = [
    "DELTA_DEFINITION",
    "FORWARD_DTYPES",
    "KINDS",
    "SPLITS",
    "TOKEN_MODES",
    "ActivationReader",
    "ActivationStore",
    "Batch",
    "DeltaStats",
    "ExtractConfig",
    "FullExtraction",
    "HeldOutSplit",
    "PairedRows",
    "ReadOrder",
    "TokenSelection",
    "adapter_fingerprints",
    "extract",
    "extract_full",
    "finalize_store",
    "open_store",
    "select_positions",
    "tokenize_docs",
]

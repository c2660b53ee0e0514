"""The held-out split as records (lorascope.activations.split): which of a store's documents an SAE trained on,
which ones the study evaluates on, and the check that a reference SAE never saw the evaluation documents.

A document is identified by the content hash of its token ids (:func:`lorascope.activations.split.content_hash`
of a ``TokenizedExample``), so the same text gets the same hash in every store of the same tokenizer.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from lorascope.activations.split import HeldOutSplit, OverlapCheck, check_no_overlap, content_hash


def doc_hashes(store, docs_mask: torch.Tensor) -> list[str]:
    """Content hashes of the store's documents selected by ``docs_mask`` [n_docs]."""
    return [
        content_hash(SimpleNamespace(input_ids=store.doc_tokens(i)))
        for i, keep in enumerate(docs_mask.tolist())
        if keep
    ]


def sae_split_record(store, held_out_fraction: float, split_seed: int) -> dict[str, Any]:
    """The "split" record of an SAE trained on the store's train split (its training documents)."""
    train = store.split_docs("train", held_out_fraction, split_seed)
    return HeldOutSplit(held_out_fraction, split_seed).record(train_docs=doc_hashes(store, train))


def eval_split_record(store, held_out_fraction: float, split_seed: int) -> dict[str, Any]:
    """The "split" record of the study's evaluation documents (the store's held-out split)."""
    held = store.split_docs("held_out", held_out_fraction, split_seed)
    return HeldOutSplit(held_out_fraction, split_seed).record(eval_docs=doc_hashes(store, held))


def check_reference(
    reference, store, held_out_fraction: float, split_seed: int, allow_overlap: bool = False
) -> OverlapCheck:
    """Refuse (one line naming the overlap) a reference SAE whose recorded training documents include this
    study's held-out documents; "unknown" when the SAE carries no split record (e.g. a downloaded SAE)."""
    return check_no_overlap(
        reference.cfg.metadata,
        {"split": eval_split_record(store, held_out_fraction, split_seed)},
        "reference SAE",
        allow_overlap=allow_overlap,
    )


def derived_init_seed(seed: int, layer: int, kind: str, adapter: str | None) -> int:
    """The weight-initialisation seed of an SAE trained outside the study (train-sae, train-saes-distributed):
    derived from (seed, layer, kind, adapter), as the study derives its own, so SAEs of different layers, kinds or
    adapters never start from the same random decoder (a shared start inflates their MMCS for as long as training
    has not moved them far)."""
    from lorascope.io import stable_hash

    return int(stable_hash({"seed": seed, "layer": layer, "kind": kind, "adapter": adapter or ""}, 8), 16)

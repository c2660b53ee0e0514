"""The held-out split as records (lorascope.activations.split): which of a store's documents an SAE trained on,
which ones the study evaluates on, and the check that a reference SAE never saw the evaluation documents.

A document is identified by the content hash of its token ids (:func:`lorascope.activations.split.content_hash`
of a ``TokenizedExample``), so the same text gets the same hash in every store of the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorascope.activations.split import (
    HeldOutSplit,
    OverlapCheck,
    check_no_overlap,
    content_hash,
    eval_exclusion_record,
)


def study_holdout(cfg) -> HeldOutSplit:
    """The study's one held-out split: ``data.held_out_fraction`` of the documents, chosen with ``seed``."""
    return HeldOutSplit(cfg.data.held_out_fraction, cfg.seed)


def doc_hashes(store, docs_mask: torch.Tensor) -> list[str]:
    """Content hashes of the store's documents selected by ``docs_mask`` [n_docs] (the identity the store's split
    uses: sha256 of the token ids)."""
    return [h for h, keep in zip(store.doc_hashes, docs_mask.tolist(), strict=True) if keep]


def sae_split_record(store, holdout: HeldOutSplit) -> dict[str, Any]:
    """The "split" record of an SAE trained on the store's train split (its training documents)."""
    return holdout.record(train_docs=doc_hashes(store, store.split_docs("train", holdout)))


def eval_split_record(store, holdout: HeldOutSplit) -> dict[str, Any]:
    """The "split" record of the study's evaluation documents (the store's held-out split), with the number of
    documents the store excludes from evaluation (e.g. LoRA training texts)."""
    rec = holdout.record(eval_docs=doc_hashes(store, store.split_docs("held_out", holdout)))
    rec["n_excluded_from_eval"] = int(store.eval_exclusions.sum())
    return rec


def check_reference(reference, store, holdout: HeldOutSplit, allow_overlap: bool = False) -> OverlapCheck:
    """Refuse (one line naming the overlap) a reference SAE whose recorded training documents include this
    study's held-out documents; "unknown" when the SAE carries no split record (e.g. a downloaded SAE)."""
    return check_no_overlap(
        reference.cfg.metadata,
        {"split": eval_split_record(store, holdout)},
        "reference SAE",
        allow_overlap=allow_overlap,
    )


def lora_exclusions(
    store, examples: Sequence[Any], lora_train: Sequence[Any], trained: Sequence[str], unknown: Sequence[str]
) -> dict[str, Any]:
    """The store's "split" record: its documents whose text is also a LoRA training example.

    Matched by :func:`content_hash` of the ``Example`` (instruction, input, output / turns / text): the text
    level, independent of how fine-tuning and extraction render and truncate it. ``examples`` are the activation
    examples (store documents map to them by ``doc_id``); recorded are the *store* identities (content hashes of
    the token ids) of the matching documents, so every copy of a matching text is excluded. ``trained``: the
    fine-tunes ``lora_train`` trained; ``unknown``: fine-tunes whose training data is unknown (loaded ones)."""
    lora = {content_hash(e) for e in lora_train}
    matching = {e.id for e in examples if content_hash(e) in lora}
    docs = [h for doc_id, h in zip(store.doc_ids, store.doc_hashes, strict=True) if doc_id in matching]
    reason = f"LoRA training examples of {', '.join(trained)} (data.finetune)" if trained else ""
    return eval_exclusion_record(docs, reason, unknown)


def derived_init_seed(seed: int, layer: int, kind: str, adapter: str | None) -> int:
    """The weight-initialisation seed of an SAE trained outside the study (train-sae, train-saes-distributed):
    derived from (seed, layer, kind, adapter), as the study derives its own, so SAEs of different layers, kinds or
    adapters never start from the same random decoder (a shared start inflates their MMCS for as long as training
    has not moved them far)."""
    from lorascope.io import stable_hash

    return int(stable_hash({"seed": seed, "layer": layer, "kind": kind, "adapter": adapter or ""}, 8), 16)

"""One held-out split, defined once: which documents are held out, recorded where SAEs and stores are saved, and
checked before an SAE is evaluated on a store.

Rule: a document is held out when int(sha256(f"{seed}:{content_hash}")[:8], 16) / 0xFFFFFFFF < fraction, where
``content_hash`` is the sha256 of the document's *content* (NFC-normalised, stripped fields joined by U+001F), not
of its id: the same text is on the same side in every dataset, file order and id scheme, and a document that
appears twice (or in both the LoRA training data and the activation data) is recognised as the same document.

Records (JSON-able dicts, stored in SAE metadata and store manifests under "split"): the rule, fraction and seed,
and the sorted 16-hex prefixes of the content hashes of the documents used for training (``train_docs``) and for
evaluation (``eval_docs``). :func:`check_no_overlap` compares an SAE's ``train_docs`` with a store's ``eval_docs``
and raises one line naming the overlap. 64-bit prefixes: the chance of any false collision among 10⁵ documents
is ~3·10⁻¹⁰.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from lorascope.errors import LorascopeError

SPLIT_RULE = "held out iff int(sha256(f'{seed}:{content_sha256}')[:8], 16) / 0xFFFFFFFF < fraction"
RECORD_VERSION = 1
DOC_IDENTITY = "content_hash of the document's token ids in the store"
PREFIX = 16  # hex characters of a content hash kept in records


def content_hash(doc: Any) -> str:
    """sha256 hex of a document's content: an ``Example`` (instruction, input, output, and its chat turns or
    plain text when it has them), a ``TokenizedExample`` (its token ids), a str, or a sequence of strings / ints."""
    if hasattr(doc, "instruction"):
        parts: Sequence[Any] = [doc.instruction, getattr(doc, "input", ""), getattr(doc, "output", "")]
        # chat turns and plain text enter only when present: instruction examples keep their hashes
        parts += [f"{role}\x1e{text}" for role, text in getattr(doc, "messages", ()) or ()]
        if getattr(doc, "text", None) is not None:
            parts += ["\x1dtext", doc.text]
    elif hasattr(doc, "input_ids"):
        parts = [" ".join(str(int(t)) for t in doc.input_ids)]
    elif isinstance(doc, str):
        parts = [doc]
    elif isinstance(doc, Sequence):
        parts = [str(p) for p in doc]
    else:
        raise LorascopeError(
            f"cannot hash a document of type {type(doc).__name__}",
            fix="pass an Example, a TokenizedExample, a string or a list of strings",
        )
    text = "\x1f".join(unicodedata.normalize("NFC", str(p)).strip() for p in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class HeldOutSplit:
    """The split: ``fraction`` of documents held out, chosen by content hash and ``seed``."""

    fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise LorascopeError(f"held_out_fraction must be in [0, 1), got {self.fraction}", fix="e.g. 0.2")

    def is_held_out(self, doc_content_hash: str) -> bool:
        h = hashlib.sha256(f"{self.seed}:{doc_content_hash}".encode()).hexdigest()
        return int(h[:8], 16) / 0xFFFFFFFF < self.fraction

    def partition(self, docs: Sequence[Any]) -> tuple[list[int], list[int]]:
        """(train indices, held-out indices) of ``docs`` (any objects :func:`content_hash` accepts)."""
        train, held = [], []
        for i, d in enumerate(docs):
            (held if self.is_held_out(content_hash(d)) else train).append(i)
        return train, held

    def record(self, train_docs: Iterable[Any] = (), eval_docs: Iterable[Any] = ()) -> dict:
        """The JSON record to store under "split" (documents given as objects or as content-hash strings)."""
        return {
            "version": RECORD_VERSION,
            "rule": SPLIT_RULE,
            "fraction": self.fraction,
            "seed": self.seed,
            "train_docs": _prefixes(train_docs),
            "eval_docs": _prefixes(eval_docs),
        }


def _prefixes(docs: Iterable[Any]) -> list[str]:
    return sorted({(d if _is_hash(d) else content_hash(d))[:PREFIX] for d in docs})


def _is_hash(d: Any) -> bool:
    return isinstance(d, str) and len(d) in (PREFIX, 64) and all(c in "0123456789abcdef" for c in d)


def eval_exclusion_record(docs: Iterable[Any], reason: str, unknown: Sequence[str] = ()) -> dict:
    """The "split" record of an activation store: documents never to be held out (``exclude_from_eval``, as
    content-hash prefixes of the store's documents), why, and the fine-tunes whose training data is unknown (so
    nothing could be excluded for them)."""
    return {
        "version": RECORD_VERSION,
        "rule": SPLIT_RULE,
        "doc_identity": DOC_IDENTITY,
        "exclude_from_eval": _prefixes(docs),
        "exclude_reason": reason,
        "training_data_unknown": sorted(unknown),
    }


def dedupe_against(held_out: Sequence[Any], training: Iterable[Any]) -> tuple[list[int], list[int]]:
    """(kept, dropped) indices of ``held_out`` documents: dropped are those whose content also appears in
    ``training`` (e.g. the LoRA's training documents when ``data.finetune`` and ``data.activations`` coincide),
    and repeats of an earlier held-out document."""
    seen = {content_hash(d) for d in training}
    kept, dropped = [], []
    for i, d in enumerate(held_out):
        h = content_hash(d)
        (dropped if h in seen else kept).append(i)
        seen.add(h)
    return kept, dropped


class OverlapCheck(NamedTuple):
    """``status``: "ok", "unknown" (a record is missing) or "overlap" (only with ``allow_overlap``)."""

    status: str
    n_overlap: int
    message: str


def check_no_overlap(
    sae_meta: Mapping[str, Any], store_meta: Mapping[str, Any], sae_name: str = "SAE", allow_overlap: bool = False
) -> OverlapCheck:
    """Refuse to evaluate an SAE on documents it was trained on.

    ``sae_meta["split"]["train_docs"]`` vs ``store_meta["split"]["eval_docs"]`` (records from
    :meth:`HeldOutSplit.record`). Overlap raises one line naming it unless ``allow_overlap`` (then status
    "overlap", for the report to flag). A missing record gives status "unknown" with a message to print.
    """
    sae_split, store_split = sae_meta.get("split"), store_meta.get("split")
    if not sae_split or not store_split:
        missing = "the SAE" if not sae_split else "the store"
        return OverlapCheck(
            "unknown",
            0,
            f"{sae_name}: no split record in {missing}; its training documents "
            "cannot be checked against the evaluation documents",
        )
    train, evals = set(sae_split.get("train_docs", [])), set(store_split.get("eval_docs", []))
    both = sorted(train & evals)
    if not both:
        return OverlapCheck("ok", 0, "")
    msg = (
        f"{sae_name} was trained on {len(both)} of the {len(evals)} evaluation documents "
        f"(content hashes {', '.join(both[:3])}{', …' if len(both) > 3 else ''})"
    )
    if not allow_overlap:
        raise LorascopeError(
            msg, fix="use an SAE trained on other documents, or allow the overlap explicitly (the report will flag it)"
        )
    return OverlapCheck("overlap", len(both), msg)


__all__ = [
    "SPLIT_RULE",
    "HeldOutSplit",
    "OverlapCheck",
    "check_no_overlap",
    "content_hash",
    "dedupe_against",
    "eval_exclusion_record",
]

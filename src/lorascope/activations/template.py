"""Chat-template scaffolding: positions that are the same text in (almost) every document, and the
first-positions bias control.

A chat template puts the same tokens into every document: SmolLM2's template opens each conversation with a fixed
system prompt ("You are a helpful AI assistant named SmolLM, trained by Hugging Face") and wraps every turn in role
markers. Their residual deltas are the same context repeated N times, so they dominate "top-activating contexts" of
delta dictionaries while saying nothing about the adapter. Two rules mark a position as scaffolding:

1. **shared prefix**: the document's tokens up to and including the position are identical in at least
   ``min_fraction`` of the documents (the system prompt and the opening role marker);
2. **repeated prompt n-gram**: in the prompt part of a document (before ``response_start``), the position is
   covered by an n-gram of ``window + 1`` tokens (a token and its ``window`` left neighbours) that occurs in at least
   ``min_fraction`` of the documents (role markers between turns, such as ``<|im_end|>\\n<|im_start|>assistant``).
   Response tokens are never matched by this rule, so a learned fixed reply opening (the behaviour under study)
   is not removed.

The first-positions control follows the activation-difference lens of Minder et al. 2025 ("Narrow finetuning leaves
clearly readable traces in activation differences"): the mean Δ at each of the first positions across documents,
which can be reported and subtracted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorascope.errors import LorascopeError


@dataclass
class TemplateExclusion:
    """Per-document exclusion masks (True = scaffolding) and what they removed, for the manifest."""

    masks: list[torch.Tensor]
    min_fraction: float
    window: int
    spans: list[tuple[str, int]] = field(default_factory=list)  # (decoded span, number of documents)

    @property
    def n_excluded(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    @property
    def n_positions(self) -> int:
        return int(sum(m.numel() for m in self.masks))

    def describe(self) -> dict:
        """JSON-ready record of the rule and what it excluded."""
        return {
            "rule": (
                f"exclude positions whose prefix is identical in >= {self.min_fraction:.0%} of documents, and "
                f"prompt positions covered by a {self.window + 1}-token n-gram that occurs in >= "
                f"{self.min_fraction:.0%} of documents"
            ),
            "excluded_positions": self.n_excluded,
            "total_positions": self.n_positions,
            "excluded_spans": [{"text": text, "documents": n} for text, n in self.spans],
        }


def _shared_prefix_lengths(docs: Sequence[Sequence[int]], need: int) -> list[int]:
    """For each document, the longest prefix that at least ``need`` documents share exactly (a counted trie)."""
    node_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node; node 0 is the empty prefix
    counts: list[int] = [0]
    paths = []
    for ids in docs:
        node, path = 0, []
        for t in ids:
            key = (node, int(t))
            if key not in node_of:
                node_of[key] = len(counts)
                counts.append(0)
            node = node_of[key]
            counts[node] += 1
            path.append(node)
        paths.append(path)
    out = []
    for path in paths:
        n = 0
        while n < len(path) and counts[path[n]] >= need:
            n += 1
        out.append(n)
    return out


def _ngram_keys(ids: Sequence[int], window: int) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in ids[max(0, p - window) : p + 1]) for p in range(len(ids))]


def _repeated_ngram_masks(
    docs: Sequence[Sequence[int]], prompt_ends: Sequence[int], window: int, need: int
) -> list[torch.Tensor]:
    keys = [_ngram_keys(ids[:end], window) for ids, end in zip(docs, prompt_ends, strict=True)]
    doc_counts: Counter = Counter()
    for ks in keys:
        doc_counts.update(set(ks))
    masks = []
    for ids, ks in zip(docs, keys, strict=True):
        m = torch.zeros(len(ids), dtype=torch.bool)
        for p, k in enumerate(ks):
            # a full-length n-gram occurring in enough documents marks every position it covers
            if len(k) == window + 1 and doc_counts[k] >= need:
                m[p - window : p + 1] = True
        masks.append(m)
    return masks


def _runs(ids: Sequence[int], mask: torch.Tensor) -> list[tuple[int, ...]]:
    runs, cur = [], []
    for t, m in zip(ids, mask.tolist(), strict=True):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(tuple(cur))
            cur = []
    if cur:
        runs.append(tuple(cur))
    return runs


def detect_template_positions(
    docs: Sequence[Sequence[int]],
    response_starts: Sequence[int] | None = None,
    min_fraction: float = 0.9,
    window: int = 2,
    tokenizer=None,
    max_spans: int = 10,
) -> TemplateExclusion:
    """Scaffolding masks for tokenized documents (lists of token ids); see the module docstring for the rules.

    ``response_starts``: index of each document's first response token (rule 2 looks only before it; None means
    rule 2 is off, as for plain text). ``tokenizer`` (optional) decodes the excluded spans for the record.
    """
    if not 0.5 < min_fraction <= 1.0:
        raise LorascopeError(f"min_fraction must be in (0.5, 1], got {min_fraction}", fix="e.g. 0.9")
    if window < 1:
        raise LorascopeError(f"window must be >= 1, got {window}", fix="e.g. 4")
    if len(docs) < 2:
        raise LorascopeError(
            f"template detection needs at least 2 documents, got {len(docs)}",
            fix="pass the whole corpus (or skip template exclusion)",
        )
    need = max(2, int(-(-min_fraction * len(docs) // 1)))  # ceil, and never a single document
    prefix = _shared_prefix_lengths(docs, need)
    masks = [torch.arange(len(ids)) < n for ids, n in zip(docs, prefix, strict=True)]
    if response_starts is not None:
        ngram = _repeated_ngram_masks(docs, response_starts, window, need)
        masks = [a | b for a, b in zip(masks, ngram, strict=True)]
    span_docs: Counter = Counter()
    for ids, m in zip(docs, masks, strict=True):
        span_docs.update(set(_runs(ids, m)))
    spans = [
        (tokenizer.decode(list(s)) if tokenizer is not None else " ".join(map(str, s)), n)
        for s, n in span_docs.most_common(max_spans)
    ]
    return TemplateExclusion(masks, min_fraction, window, spans)


def pad_masks(masks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack per-document masks into a right-padded bool [B, length] (padding is False)."""
    out = torch.zeros(len(masks), length, dtype=torch.bool)
    for i, m in enumerate(masks):
        n = min(len(m), length)
        out[i, :n] = m[:n]
    return out


def template_activation_share(codes: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Per feature, the fraction of its activation mass on excluded (scaffolding) positions: ``codes`` [N, F]
    (non-negative activations), ``excluded`` bool [N]. Features above ~0.5 fire mainly on the template and should
    be flagged rather than ranked first; NaN for a feature that never fires."""
    if codes.ndim != 2 or excluded.shape != (codes.shape[0],):
        raise LorascopeError(
            f"codes [N, F] and excluded [N] expected, got {tuple(codes.shape)} and {tuple(excluded.shape)}",
            fix="one exclusion flag per activation row",
        )
    a = codes.double().clamp_min(0)
    total = a.sum(0)
    return torch.where(total > 0, a[excluded.bool()].sum(0) / total, torch.full_like(total, float("nan")))


@dataclass
class PositionMeans:
    """Mean Δ at each of the first positions: ``mean`` [P, d], ``count`` [P] documents; ``norm`` = ‖mean‖ [P]."""

    mean: torch.Tensor
    count: torch.Tensor

    @property
    def norm(self) -> torch.Tensor:
        return self.mean.norm(dim=-1)


class FirstPositionMeans:
    """Streaming per-position mean of Δ over documents for positions 0..P-1 (float64 accumulation)."""

    def __init__(self, n_positions: int, d: int):
        if n_positions < 1:
            raise LorascopeError(f"n_positions must be >= 1, got {n_positions}", fix="e.g. 8")
        self.sum = torch.zeros(n_positions, d, dtype=torch.float64)
        self.count = torch.zeros(n_positions, dtype=torch.long)

    def update(self, delta: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """``delta`` [B, T, d] (documents left-aligned), ``attention_mask`` [B, T] (1 = real token)."""
        p = min(self.sum.shape[0], delta.shape[1])
        valid = attention_mask[:, :p].bool()
        self.sum[:p] += (delta[:, :p].double() * valid.unsqueeze(-1)).sum(0)
        self.count[:p] += valid.sum(0)

    def result(self) -> PositionMeans:
        mean = self.sum / self.count.clamp_min(1).unsqueeze(-1)
        return PositionMeans(mean.float(), self.count.clone())


def first_position_means(delta: torch.Tensor, attention_mask: torch.Tensor, n_positions: int) -> PositionMeans:
    """Mean Δ per position for the first ``n_positions`` positions of a batch [B, T, d]."""
    acc = FirstPositionMeans(n_positions, delta.shape[-1])
    acc.update(delta, attention_mask)
    return acc.result()


def subtract_position_means(delta: torch.Tensor, means: PositionMeans) -> torch.Tensor:
    """Δ [B, T, d] minus the per-position mean at the first P positions (later positions unchanged)."""
    out = delta.clone()
    p = min(means.mean.shape[0], delta.shape[1])
    out[:, :p] -= means.mean[:p].to(out.dtype)
    return out


__all__ = [
    "FirstPositionMeans",
    "PositionMeans",
    "TemplateExclusion",
    "detect_template_positions",
    "first_position_means",
    "pad_masks",
    "subtract_position_means",
    "template_activation_share",
]

"""Which token positions of a batch become activation rows.

Rule (recorded verbatim in every manifest): a position is kept when it is a real token (not padding), lies in
the requested part of the document (``all`` / ``prompt`` / ``response``), is not among the first
``skip_first`` positions of its document, and its *base* residual norm is at most ``max_norm_factor`` times the
median base norm of the batch's candidate positions at every captured layer. The last two exclude BOS tokens and
attention sinks, whose residual norms are orders of magnitude above the rest (SmolLM2's first chat-template
token reaches ~25,000) and would dominate every delta statistic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lorascope.errors import LorascopeError

TOKEN_MODES = ("all", "prompt", "response")


@dataclass(frozen=True)
class TokenSelection:
    tokens: str = "all"
    skip_first: int = 1
    max_norm_factor: float | None = 10.0  # None or 0 disables the norm rule

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_MODES:
            raise LorascopeError(f"unknown token selection {self.tokens!r}", fix="use all, prompt or response")
        if self.skip_first < 0:
            raise LorascopeError(f"skip_first must be >= 0, got {self.skip_first}", fix="e.g. 1 (drops BOS)")
        if self.max_norm_factor is not None and self.max_norm_factor < 0:
            raise LorascopeError(
                f"max_norm_factor must be >= 0, got {self.max_norm_factor}",
                fix="e.g. 10, or 0 to disable the outlier-norm rule",
            )

    def describe(self) -> dict:
        rule = f"keep non-padding {self.tokens} tokens at position >= {self.skip_first}" + (
            f" whose base residual norm is <= {self.max_norm_factor} x the batch median of candidate "
            "positions at every captured layer"
            if self.max_norm_factor
            else ""
        )
        return {**asdict(self), "rule": rule}


def candidate_mask(attention_mask: torch.Tensor, response_start: torch.Tensor, sel: TokenSelection) -> torch.Tensor:
    """Positions allowed before the norm rule: bool [B, T] from attention_mask [B, T] and response_start [B]."""
    pos = torch.arange(attention_mask.shape[1]).unsqueeze(0)
    mask = attention_mask.bool() & (pos >= sel.skip_first)
    if sel.tokens == "prompt":
        mask &= pos < response_start.unsqueeze(1)
    elif sel.tokens == "response":
        mask &= pos >= response_start.unsqueeze(1)
    return mask


def outlier_mask(base_norms: dict[int, torch.Tensor], candidates: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Candidate positions whose base norm [B, T] exceeds ``factor`` x the candidates' median at any layer."""
    out = torch.zeros_like(candidates)
    if not factor or not candidates.any():
        return out
    for norms in base_norms.values():
        median = norms[candidates].median()
        out |= candidates & (norms > factor * median)
    return out


def select_positions(
    attention_mask: torch.Tensor,
    response_start: torch.Tensor,
    base_norms: dict[int, torch.Tensor],
    sel: TokenSelection,
    template: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Kept positions, bool [B, T], and counts: ``tokens`` (non-padding), ``skipped_first``, ``other_part``
    (outside the requested prompt/response part), ``excluded_norm`` and ``selected``; with ``template`` (bool
    [B, T], chat-template scaffolding from :func:`lorascope.activations.template.detect_template_positions`) those
    candidates are dropped too and counted as ``excluded_template``."""
    real = attention_mask.bool()
    pos = torch.arange(attention_mask.shape[1]).unsqueeze(0)
    part = candidate_mask(attention_mask, response_start, sel)
    cand = part if template is None else part & ~template.bool()
    excl = outlier_mask(base_norms, cand, sel.max_norm_factor)
    keep = cand & ~excl
    first = real & (pos < sel.skip_first)
    counts = {
        "tokens": int(real.sum()),
        "skipped_first": int(first.sum()),
        "other_part": int((real & ~first & ~part).sum()),
        "excluded_norm": int(excl.sum()),
        "selected": int(keep.sum()),
    }
    if template is not None:
        counts["excluded_template"] = int((part & template.bool()).sum())
    return keep, counts


__all__ = ["TOKEN_MODES", "TokenSelection", "candidate_mask", "outlier_mask", "select_positions"]
